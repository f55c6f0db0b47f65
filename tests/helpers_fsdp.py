"""A few AdamW steps of a DPO loss on the tiny model, plain (one process) or under FSDP2 (torchrun),
for tests/test_fsdp.py. Each step takes the same global batch whatever the world size: each rank
its share, in micro-batches (gradient accumulation); writes OUT/result.json (losses, gradient norms,
FSDP units) and OUT/model (a Hugging Face folder), and can save or resume a sharded checkpoint.

    python tests/helpers_fsdp.py MODEL OUT [--steps 4] [--save-at 2] [--resume CKPT]
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from selm import dist, fsdp
from selm.io import AtomicDir, atomic_write_json
from selm.objective.logprobs import ResponseLogps, TokenizedExample, batch_logps, collate_padded
from selm.objective.losses import dpo_loss

GLOBAL_BATCH, MICRO_BATCHES, MAX_NORM = 4, 2, 0.5


def examples(step: int, vocab: int) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(step)

    def ids(lo, hi):
        return torch.randint(3, vocab, (int(torch.randint(lo, hi, (), generator=g)),), generator=g).tolist()

    return [TokenizedExample(ids(4, 12), [ids(2, 9), ids(2, 9)]) for _ in range(GLOBAL_BATCH)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--save-at", type=int)
    ap.add_argument("--resume", type=Path)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model)
    module = ResponseLogps(model, segments=False)
    world, rank = dist.world_size(), dist.rank()
    if world > 1:
        fsdp.shard_model(module)
    optimizer = torch.optim.AdamW(module.parameters(), lr=5e-3)
    start = fsdp.load_sharded(a.resume, module, optimizer)["step"] if a.resume else 0
    losses, norms = [], []
    for step in range(start, a.steps):
        share = examples(step, model.config.vocab_size)[rank::world]
        size = len(share) // MICRO_BATCHES
        total = torch.zeros(())
        for i in range(MICRO_BATCHES):
            if world > 1:
                fsdp.set_gradient_sync(module, i == MICRO_BATCHES - 1)
            lp = batch_logps(module, collate_padded(share[i * size:(i + 1) * size], 0))
            zero = torch.zeros_like(lp["chosen"])
            loss = dpo_loss(lp["chosen"], lp["rejected"], zero, zero, beta=0.1)[0].sum() / len(share)
            loss.backward()
            total += loss.detach()
        norms.append(float(fsdp.clip_grad_norm(module, MAX_NORM)))
        losses.append(float(sum(dist.all_gather(float(total)))) / world)
        optimizer.step()
        optimizer.zero_grad()
        if a.save_at == step + 1:
            fsdp.save_sharded(a.out / "ckpt", module, optimizer, {"step": step + 1})
    state = fsdp.full_state_dict(module, prefix="model.") if world > 1 else {
        k.removeprefix("model."): v for k, v in module.state_dict().items()}
    if dist.is_main():
        with AtomicDir(a.out / "model") as tmp:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        atomic_write_json(a.out / "result.json", {"losses": losses, "grad_norms": norms, "units": fsdp.units(module),
                                                  "world": world})
    dist.barrier()
    dist.close()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    # As selm.cli.main under a launcher: gloo's threads, destroyed in the interpreter's teardown,
    # intermittently abort the process ("terminate called without an active exception").
    os._exit(0)
