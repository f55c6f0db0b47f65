"""What the training stage (selm/stages/train.py) is built from, one concern per module:

- engine.py: the only place that knows which engine runs (one process, DDP, DeepSpeed ZeRO-3, FSDP2):
  creating it, wrapping the model, syncing gradients, the gradient norm, resume checkpoints, the
  final model folder, and handing memory back;
- plan.py: which examples each optimizer step and each forward pass uses, the optimizer, the schedule;
- reference.py: the reference log-probs, computed once and cached in the stage folder;
- metrics.py: per-step statistics over every process, metrics.jsonl, loggers, divergence.
"""
