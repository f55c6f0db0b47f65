#!/usr/bin/env bash
# Side by side: wall time and peak RSS of the training stage (SmolLM2-135M, batch 8, bf16) in the
# default, release_memory and low-memory (release_memory + gradient checkpointing) settings,
# alternating, 2 repeats. Wall time covers the whole child: model load, reference pass, 3 steps.
cd "$(dirname "$0")/.."
for r in 0 1; do
  for v in "default|" "release_memory|--set train.release_memory=true" \
           "low-memory|--set train.release_memory=true --set train.gradient_checkpointing=true"; do
    name=${v%%|*}; args=${v#*|}
    s=$(date +%s.%N)
    out=$(HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory.py --model smollm2 --steps 3 --bf16 $args 2>&1 | grep "peak RSS")
    e=$(date +%s.%N)
    echo "repeat $r $name: wall $(echo "$e - $s" | bc) s; $out"
  done
done
