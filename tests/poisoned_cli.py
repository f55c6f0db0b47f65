"""`selm` with one NaN injected into training, for launcher tests (accelerate, torchrun) where a
test cannot monkeypatch the ranks: `python -m poisoned_cli TERM ARGS...` (tests/ on PYTHONPATH) runs
`selm ARGS` with loss/TERM of the second example of the main rank's second micro-batch set to NaN.
POISON_RANK=R poisons rank R's instead; POISON_DETACHED=1 poisons the reported value only, not the
loss the gradient comes from, so that rank alone sees it (the other ranks' gradients stay finite)."""

import os
import sys

import selm.stages.train as train_mod
from selm import dist
from selm.cli import main

KEYS = {"explore": "loss_explore", "dpo": "loss_pair"}


def poison(term: str) -> None:
    real, calls = train_mod.preference_objective, []

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2 and dist.rank() == int(os.environ.get("POISON_RANK", "0")):
            key = KEYS[term]
            out[key] = out[key].detach().clone() if os.environ.get("POISON_DETACHED") == "1" else out[key].clone()
            out[key][1] = float("nan")
            if os.environ.get("POISON_DETACHED") != "1":
                out["loss"] = out["loss_pair"] + out["loss_explore"]
        return out

    train_mod.preference_objective = poisoned


if __name__ == "__main__":
    poison(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
