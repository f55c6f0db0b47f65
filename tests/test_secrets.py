"""The judge's API key never reaches a run folder or the console: a whole `selm run` of the tiny config
with an HTTP judge (training ranker and gold judge) on a local server, then every file under the
run folder (config, environment.json, metrics, TensorBoard events, markers, the report) and the
captured stdout/stderr are searched for the key, plain and base64-encoded. And a judge that refuses
the key, echoing the Authorization header in its reply, fails the run without the key in the
message or FAILED.json."""

import base64
import secrets
import subprocess
from pathlib import Path

import pytest

from helpers_rank import JudgeServer
from test_loop import TINY, env, selm_cmd

KEY_ENV = "SELM_TEST_LEAK_KEY"


def _forms(key: str) -> list[bytes]:
    """The key and its base64 (standard and URL-safe) at each of the three byte alignments it could
    sit at inside a longer encoded string (e.g. "Bearer <key>"): the stretch every such encoding contains."""
    forms = [key.encode()]
    for pad in range(3):
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            forms.append(enc(b"x" * pad + key.encode()).rstrip(b"=")[4:-4])
    return forms


def _leaks(out: Path, texts: list[str], key: str) -> list[str]:
    """Where any form of the key occurs: files under `out` and the captured outputs."""
    found = []
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10  # the run wrote what it should; a search of nothing would pass
    for path in files:
        data = path.read_bytes()
        found += [f"{path.relative_to(out)}: {f!r}" for f in _forms(key) if f in data]
    for i, text in enumerate(texts):
        found += [f"output {i}: {f!r}" for f in _forms(key) if f in text.encode()]
    return found


def _judge_settings(url: str) -> list[str]:
    args = []
    for section in ("rank", "evaluate.judge"):
        args += ["--set", f"{section}.kind=http_judge", "--set", f"{section}.endpoint.url={url}",
                 "--set", f"{section}.endpoint.model=judge-1", "--set", f"{section}.endpoint.api_key_env={KEY_ENV}"]
    return args + ["--set", "loop.iterations=1"]


@pytest.mark.slow
def test_a_whole_run_with_a_keyed_judge_writes_the_key_nowhere(tmp_path):
    key = "sk-leak-" + secrets.token_urlsafe(24)
    seen = []

    def reply(body, headers, n):
        seen.append(headers.get("Authorization"))
        return 200, f"Rating: [[{len(body['messages'][1]['content']) % 10 + 1}]]", 0

    server = JudgeServer(reply)
    try:
        out = tmp_path / "run"
        run = subprocess.run(selm_cmd("run", TINY, "--output-dir", out, *_judge_settings(server.url)),
                             env={**env(), KEY_ENV: key}, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        report = subprocess.run(selm_cmd("report", out), env={**env(), KEY_ENV: key}, capture_output=True,
                                text=True, timeout=300)
        status = subprocess.run(selm_cmd("status", out), env={**env(), KEY_ENV: key}, capture_output=True,
                                text=True, timeout=300)
    finally:
        server.close()
    assert report.returncode == 0 and status.returncode == 0, report.stderr[-2000:] + status.stderr[-2000:]
    assert seen and set(seen) == {f"Bearer {key}"}  # the key was sent, on every request
    assert (out / "report.md").is_file() and (out / "iter_1" / "train" / "DONE.json").is_file()
    assert _leaks(out, [run.stdout, run.stderr, report.stdout, report.stderr, status.stdout, status.stderr], key) == []


@pytest.mark.slow
@pytest.mark.parametrize("section", ["rank", "evaluate.judge"])
def test_a_judge_refusing_the_key_fails_without_showing_it(tmp_path, section):
    key = "sk-leak-" + secrets.token_urlsafe(24)

    def reply(body, headers, n):
        return 401, f"invalid API key in header: Authorization: {headers.get('Authorization')}", 0

    server = JudgeServer(reply)
    try:
        out = tmp_path / "run"
        settings = _judge_settings(server.url)
        if section == "rank":  # the gold judge stays the toy one: the run reaches the training ranker
            settings = settings[:8] + settings[16:]
        run = subprocess.run(selm_cmd("run", TINY, "--output-dir", out, *settings, "--set", f"{section}.max_retries=0"),
                             env={**env(), KEY_ENV: key}, capture_output=True, text=True, timeout=600)
    finally:
        server.close()
    assert run.returncode == 2, run.stderr[-3000:]
    failed = list(out.rglob("FAILED.json"))
    stage = "rank" if section == "rank" else "evaluate"
    assert [p.parent.name for p in failed] == [stage]
    assert "HTTP 401" in failed[0].read_text() and "Bearer ***" in failed[0].read_text()
    assert "HTTP 401" in run.stderr and "Bearer ***" in run.stderr
    assert _leaks(out, [run.stdout, run.stderr], key) == []
