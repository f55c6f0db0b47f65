#!/usr/bin/env bash
# Quick start, command 1: set up (first run only) and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/selm demo --output-dir runs/demo "$@"
