"""Test settings: offline, one CPU thread (OpenMP spin-waiting makes small ops far slower with 2
threads on a busy machine; see docs/performance.md, "Threads"), and shared tiny-model fixtures built locally."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama + ChatML byte tokenizer (read-only: copy it before training in place)."""
    from selm.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture
def judge_server():
    """`judge_server(reply)` starts an OpenAI-compatible judge on 127.0.0.1 (tests/helpers_rank.py:
    JudgeServer; `reply(body, headers, n) -> (status, text, delay)`), closed after the test."""
    from helpers_rank import JudgeServer  # tests/ is on sys.path under pytest

    servers = []

    def start(reply):
        servers.append(JudgeServer(reply))
        return servers[-1]

    yield start
    for s in servers:
        s.close()
