"""Who am I, how many are we, wait, gather: the one place that knows about several processes.

selm runs the same under `python -m selm.cli ...` (one process) and under a launcher that starts N
(`torchrun --nproc_per_node N`, `accelerate launch`): the launcher sets RANK / WORLD_SIZE /
LOCAL_RANK, and the first collective call joins the process group (gloo on CPU, nccl on CUDA).
Every rank runs every stage; generate, rank and evaluate split their batches across ranks and the
main rank merges and writes; file bookkeeping (wiping, done-markers) is the main rank's alone and the
others wait for it. With one process every function here is a no-op or the identity.

A rank that fails exits (the CLI turns errors into an exit status), and the launcher then stops the
others, so a failure does not leave the rest waiting at a barrier.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def _group():
    """The default process group, joined on first use (None with one process)."""
    if world_size() == 1:
        return None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        # A long timeout: ranks wait at barriers while the main rank writes a big checkpoint.
        minutes = float(os.environ.get("SELM_DIST_TIMEOUT_MINUTES", "60"))
        dist.init_process_group(backend, timeout=timedelta(minutes=minutes))
    return dist.group.WORLD


def join() -> None:
    """Join the process group now, also with one process (FSDP2's device mesh needs a group);
    torchrun's variables say where to meet."""
    if _group() is None:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", world_size=1, rank=0)


def barrier() -> None:
    """Wait until every rank gets here."""
    if _group() is not None:
        import torch.distributed as dist

        # Through a gathered object rather than dist.barrier(): on nccl a bare barrier needs a
        # device guess, and an object collective works on every backend.
        dist.all_gather_object([None] * world_size(), None)


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if _group() is None:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: T) -> T:
    """The main rank's `obj` on every rank."""
    if _group() is None:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def main_first():
    """The main rank runs the block first (e.g. converting or writing a model folder); the others run
    it once it is done, and then find the work already there."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def shard(items: Sequence[T], *, rank_: int | None = None, world: int | None = None) -> list[T]:
    """This rank's share: items rank, rank + world, ... (round robin, so shares differ by <= 1)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return list(items[r::w])


def merged(part: dict) -> dict:
    """The union of every rank's `part` (keys are disjoint: each rank filled its own share), on every
    rank; with one process, `part` itself."""
    if world_size() == 1:
        return part
    out: dict = {}
    for p in all_gather(part):
        out.update(p)
    return out


def close() -> None:
    """Leave the process group, if this process joined one (a clean exit, without warnings)."""
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
