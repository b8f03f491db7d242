"""minigpt: contextual pruning of Hugging Face causal LMs (placeholder, filled in below)."""
