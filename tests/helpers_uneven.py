"""Run under a launcher by tests/test_uneven.py: `python -m helpers_uneven MODEL OUT N...` trains the
tiny model on OUT/pairs_N.jsonl into OUT/N for each N, in one launch (each training stage builds its
own engine, as iterations of a run do). Settings come from SELM_TEST_SETS (space-separated KEY=VALUE)."""

import os
import sys
from pathlib import Path

from selm.cli import main as _cli  # noqa: F401 -- the CLI's import side effects, as under `selm`
from selm.config import load_config
from selm.stages.train import run_train


def train_all(model: Path, out: Path, counts: list[int]) -> None:
    cfg = load_config(None, os.environ["SELM_TEST_SETS"].split())
    for n in counts:
        run_train(cfg, out / f"pairs_{n}.jsonl", model, out / str(n))


if __name__ == "__main__":
    train_all(Path(sys.argv[1]), Path(sys.argv[2]), [int(n) for n in sys.argv[3:]])
    sys.stdout.flush()
    os._exit(0)  # as selm.cli.main under a launcher: no interpreter teardown of gloo's threads
