"""Models: the description of every architecture (groups of coupled slices), the MLP view the statistics
use, the weight surgery that cuts a plan, the saved formats and ``modeling_minigpt.py`` (with the trust
rule that accepts it by SHA-256).
"""
