"""The rank stage: the exact artifact set, scores in candidate order, stats, skip/fail semantics
(nothing half-written on failure), and that an API key never reaches a file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selm.config import Config, RankConfig
from selm.io import InputError, read_json, read_jsonl
from selm.stages.rank import run_rank
from selm.engines.ranker_base import RankerError

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _helpers_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def _record(i: int, text: str | None = None) -> dict:
    return {"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": text or f"question {i}"}],
            "candidates": ["a" * (i % 3 + 1), "bbbb", "cc"], "sources": ["sample", "sample", "greedy"],
            "exploration": "cc"}


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _cfg(on_error="fail", fn="helpers_rank:length_score") -> Config:
    return Config(rank=RankConfig(kind="callable", callable=fn, on_error=on_error))


def test_rank_stage_writes_scores_and_stats(tmp_path):
    records = [_record(i) for i in range(11)]  # more than one call's worth (8 prompts per call)
    gen = _write(tmp_path / "generations.jsonl", records)
    out = tmp_path / "rank"
    stats = run_rank(_cfg(), gen, out)
    assert sorted(p.name for p in out.iterdir()) == ["DONE.json", "scores.jsonl", "stats.json"]
    rows = read_jsonl(out / "scores.jsonl")
    assert [r["prompt_id"] for r in rows] == [f"p{i}" for i in range(11)]
    for rec, row in zip(records, rows):
        assert row == {**rec, "scores": [float(len(c)) for c in rec["candidates"]]}
    assert read_json(out / "stats.json") == stats
    assert stats["prompts"] == stats["scored"] == 11 and stats["skipped"] == 0
    assert stats["mean_score_by_source"]["greedy"] == 2.0
    sample = [len(r["candidates"][0]) for r in records] + [4] * 11
    assert stats["mean_score_by_source"]["sample"] == pytest.approx(sum(sample) / len(sample))
    assert stats["candidates_per_prompt"] == {"min": 3, "max": 3, "mean": 3.0}
    assert read_json(out / "DONE.json")["scored"] == 11

    again = run_rank(_cfg(), gen, tmp_path / "rank2")  # a pure function of its inputs
    assert again == stats
    assert (tmp_path / "rank2" / "scores.jsonl").read_bytes() == (out / "scores.jsonl").read_bytes()


def test_skip_counts_and_omits_failing_prompts(tmp_path):
    records = [_record(i) for i in range(6)]
    records[1] = _record(1, "NAN please")
    records[4] = _record(4, "RAISE please")
    out = tmp_path / "rank"
    stats = run_rank(_cfg("skip"), _write(tmp_path / "g.jsonl", records), out)
    assert [r["prompt_id"] for r in read_jsonl(out / "scores.jsonl")] == ["p0", "p2", "p3", "p5"]
    assert stats["scored"] == 4 and stats["skipped"] == 2 and stats["prompts"] == 6
    reasons = {s["prompt_id"]: s["reason"] for s in stats["skipped_prompts"]}
    assert reasons == {"p1": "rank: prompt_id 'p1': non-finite score nan",
                       "p4": "rank.callable: 'helpers_rank:length_score' raised ValueError: boom (prompt_id 'p4')"}
    assert read_json(out / "stats.json")["skipped_prompts"] == stats["skipped_prompts"]


@pytest.mark.parametrize("text,message", [
    ("NAN", "rank: prompt_id 'p9': non-finite score nan"),
    ("SHORT", "rank: prompt_id 'p9': 2 scores for 3 candidates"),
])
def test_fail_names_the_prompt_and_writes_nothing(tmp_path, text, message):
    records = [_record(i) for i in range(12)]
    records[9] = _record(9, text)
    out = tmp_path / "rank"
    with pytest.raises(RankerError) as e:
        run_rank(_cfg("fail"), _write(tmp_path / "g.jsonl", records), out)
    assert str(e.value) == message
    assert list(out.iterdir()) == []  # no DONE.json, no scores.jsonl, no temporaries


def test_skipping_every_prompt_is_an_error(tmp_path):
    records = [_record(i, "NAN") for i in range(3)]
    out = tmp_path / "rank"
    with pytest.raises(RankerError, match=r"^rank: every prompt failed \(3 skipped\); first error: .*'p0'"):
        run_rank(_cfg("skip"), _write(tmp_path / "g.jsonl", records), out)
    assert list(out.iterdir()) == []


def test_bad_input_names_the_line(tmp_path):
    bad = _record(1)
    del bad["candidates"]
    gen = _write(tmp_path / "g.jsonl", [_record(0), bad])
    with pytest.raises(InputError, match=r"g\.jsonl:2: missing field 'candidates'"):
        run_rank(_cfg(), gen, tmp_path / "rank")
    gen = _write(tmp_path / "g.jsonl", [_record(0), _record(0)])
    with pytest.raises(InputError, match=r"g\.jsonl:2: duplicate prompt_id 'p0'"):
        run_rank(_cfg(), gen, tmp_path / "rank")
    gen = _write(tmp_path / "g.jsonl", [{**_record(0), "prompt": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(InputError, match=r"g\.jsonl:1: prompt: the last message must be a user turn"):
        run_rank(_cfg(), gen, tmp_path / "rank")


def test_evaluate_judge_key_and_ranker_cfg(tmp_path):
    cfg = _cfg(fn="no_such_module_xyz:f")
    judge = RankConfig(kind="pairwise", callable="helpers_rank:table_pairwise")
    records = [{**_record(0), "candidates": ["a", "b", "c"]}]
    stats = run_rank(cfg, _write(tmp_path / "g.jsonl", records), tmp_path / "ev", ranker_cfg=judge, key="evaluate.judge")
    assert stats["ranker"] == "pairwise"
    assert read_jsonl(tmp_path / "ev" / "scores.jsonl")[0]["scores"] == pytest.approx([0.6, 0.55, 0.35])
    with pytest.raises(RankerError, match=r"^rank\.callable: cannot import"):
        run_rank(cfg, tmp_path / "g.jsonl", tmp_path / "rank")


def test_http_judge_key_never_reaches_a_file(tmp_path, monkeypatch):
    """One prompt's request fails with a server that echoes the Authorization header; under
    on_error: skip its reason lands in stats.json, redacted."""
    from helpers_rank import JudgeServer

    secret = "sk-rank-stage-secret"
    monkeypatch.setenv("SELM_TEST_JUDGE_KEY", secret)

    def reply(body, headers, n):
        if "ECHO" in body["messages"][1]["content"]:
            return 400, f"invalid request for {headers.get('Authorization')}", 0
        return 200, f"Rating: [[{len(body['messages'][1]['content']) % 10 + 1}]]", 0

    server = JudgeServer(reply)
    try:
        cfg = Config(rank=RankConfig(kind="http_judge", url=server.url, judge_model="j", on_error="skip",
                                     api_key_env="SELM_TEST_JUDGE_KEY", max_retries=0))
        records = [_record(0), _record(1, "ECHO"), _record(2)]
        out = tmp_path / "rank"
        stats = run_rank(cfg, _write(tmp_path / "g.jsonl", records), out)
    finally:
        server.close()
    assert stats["scored"] == 2 and [s["prompt_id"] for s in stats["skipped_prompts"]] == ["p1"]
    assert "Bearer ***" in stats["skipped_prompts"][0]["reason"]
    assert all(server_headers.get("Authorization") == f"Bearer {secret}" for _, server_headers in server.requests)
    for f in out.iterdir():
        assert secret not in f.read_text(), f.name
