#!/usr/bin/env bash
# Side by side: wall time and peak RSS of the training stage (SmolLM2-135M, batch 8) in several
# settings, alternating, 2 repeats. Wall time covers the whole child: model load, reference pass,
# 3 steps (the first two are the same work in every setting, so differences are the steps').
#
#   bash benchmarks/memory_ab.sh [--bf16] ["name|memory.py options" ...]
#
# Without settings: the default (max_forward_tokens "auto": 1024 tokens per forward pass on a CPU), one
# pass per micro-batch (max_forward_tokens=null, the default before), the default with release_memory,
# and low-memory (release_memory + gradient checkpointing): the BENCHMARKS.md table. --bf16: bf16
# autocast (needs a CPU with bf16 instructions to be fast); fp32 otherwise.
cd "$(dirname "$0")/.."
precision=""
if [ "$1" = "--bf16" ]; then precision="--bf16"; shift; fi
if [ $# -eq 0 ]; then
  set -- "default|" "one pass per micro-batch|--set train.max_forward_tokens=null" \
         "default+release_memory|--set train.release_memory=true" \
         "low-memory|--set train.release_memory=true --set train.gradient_checkpointing=true"
fi
for r in 0 1; do
  for v in "$@"; do
    name=${v%%|*}; args=${v#*|}
    s=$(date +%s.%N)
    out=$(HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory.py --model smollm2 --steps 3 $precision $args 2>&1 | grep "peak RSS")
    e=$(date +%s.%N)
    echo "repeat $r $name: wall $(echo "$e - $s" | bc) s; $out"
  done
done
