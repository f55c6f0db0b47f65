#!/usr/bin/env bash
# selm's GPU check kit: one command, under 9 minutes on one CUDA GPU; PASS/FAIL per check and a
# summary (the checks are in scripts/gpu_check.py). Without a CUDA GPU it is a dry run that lists
# the checks it skipped and exits 0.
#   scripts/gpu_check.sh [--workdir DIR] [--only CHECK ...]
# PYTHON picks the interpreter (default: python); it needs selm's dependencies and vllm.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec timeout --signal=INT 540 "${PYTHON:-python}" "$here/gpu_check.py" "$@"
