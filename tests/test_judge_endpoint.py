"""One judge-endpoint section (EndpointConfig) for rank.endpoint, evaluate.judge.endpoint,
pairwise.judge.endpoint and mtbench.judge: its settings reach the HTTP requests of each use, each
use keeps its own default timeout, and the old keys (rank.url, mtbench.judge_url, ...) still work in
YAML, --set, saved run configs and constructors, with one deprecation line per old key and process.
(pairwise and mtbench through their commands: tests/test_eval_pairwise.py, tests/test_mtbench.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from selm import config as config_module
from selm import loop, run_changes
from selm.cli import main
from selm.config import (Config, ConfigError, EndpointConfig, MTBenchConfig, RankConfig, config_to_dict,
                         load_config, load_saved_config)
from selm.engines.ranker_base import RankerError
from selm.stages.evaluate import gold_scores
from selm.stages.rank import run_rank

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    """Each test sees the deprecation lines of its own process as if it were the first."""
    monkeypatch.setattr(config_module, "_WARNED", set())


def _warnings(capsys) -> list[str]:
    return [l for l in capsys.readouterr().err.splitlines() if "deprecated" in l]


OLD_YAML = """
rank: {kind: http_judge, url: "http://r/v1", judge_model: rj, timeout_s: 5, extra_body: {a: 1}, max_concurrency: 2}
evaluate: {judge: {kind: http_judge, url: "http://e/v1", judge_model: ej, api_key_env: MY_KEY, max_retries: 0}}
mtbench: {judge_url: "http://m/v1", judge_model: mj, judge_extra_body: {b: 2}, timeout_s: 7}
"""


def test_old_yaml_keys_map_to_the_endpoint_sections_with_one_line_each(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(OLD_YAML)
    cfg = load_config(tmp_path / "c.yaml", ["pairwise.judge.judge_model=pj"])
    assert cfg.rank.endpoint == EndpointConfig(url="http://r/v1", model="rj", timeout_s=5.0, extra_body={"a": 1},
                                               max_concurrency=2)
    assert cfg.evaluate.judge.endpoint == EndpointConfig(url="http://e/v1", model="ej", api_key_env="MY_KEY",
                                                         max_retries=0)
    assert cfg.mtbench.judge == EndpointConfig(url="http://m/v1", model="mj", extra_body={"b": 2}, timeout_s=7.0)
    assert cfg.pairwise.judge.endpoint.model == "pj" and cfg.pairwise.judge.kind == "llm_pairwise"
    lines = _warnings(capsys)
    assert "selm: warning: rank.url is deprecated; use rank.endpoint.url" in lines
    assert "selm: warning: rank.judge_model is deprecated; use rank.endpoint.model" in lines
    assert "selm: warning: evaluate.judge.api_key_env is deprecated; use evaluate.judge.endpoint.api_key_env" in lines
    assert "selm: warning: mtbench.judge_extra_body is deprecated; use mtbench.judge.extra_body" in lines
    assert "selm: warning: pairwise.judge.judge_model is deprecated; use pairwise.judge.endpoint.model" in lines
    assert len(lines) == len(set(lines)) == 5 + 4 + 4 + 1  # one per old key
    load_config(tmp_path / "c.yaml")
    assert _warnings(capsys) == []  # once per process


def test_old_and_new_keys_together_the_later_wins_and_the_new_layout_is_saved(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("rank: {endpoint: {url: 'http://new/v1', model: m}}\n")
    cfg = load_config(tmp_path / "c.yaml", ["rank.url=http://set/v1", "mtbench.judge.model=x", "mtbench.timeout_s=9"])
    assert (cfg.rank.endpoint.url, cfg.rank.endpoint.model) == ("http://set/v1", "m")
    assert (cfg.mtbench.judge.model, cfg.mtbench.judge.timeout_s) == ("x", 9.0)
    saved = config_to_dict(cfg)
    assert "url" not in saved["rank"] and saved["rank"]["endpoint"]["url"] == "http://set/v1"
    assert "judge_url" not in saved["mtbench"] and saved["mtbench"]["judge"]["timeout_s"] == 9.0
    assert len(_warnings(capsys)) == 2


def test_old_constructor_keywords_map_to_the_section(capsys):
    rc = RankConfig(kind="http_judge", url="http://r/v1", judge_model="rj", timeout_s=5.0, extra_body={"a": 1})
    assert rc.endpoint == EndpointConfig(url="http://r/v1", model="rj", timeout_s=5.0, extra_body={"a": 1})
    mt = MTBenchConfig(judge_url="http://m/v1", judge_model="mj", max_retries=1)
    assert mt.judge == EndpointConfig(url="http://m/v1", model="mj", max_retries=1, timeout_s=120.0)
    both = RankConfig(endpoint=EndpointConfig(url="http://a/v1", max_retries=0), judge_model="j")
    assert (both.endpoint.url, both.endpoint.model, both.endpoint.max_retries) == ("http://a/v1", "j", 0)
    lines = _warnings(capsys)
    assert "selm: warning: RankConfig(url=...) is deprecated; use RankConfig(endpoint=EndpointConfig(url=...))" in lines
    assert len(lines) == 4 + 3  # RankConfig url, judge_model, timeout_s, extra_body; MTBenchConfig three
    with pytest.raises(ConfigError, match="endpoint.timeout_s: must be > 0"):
        RankConfig(timeout_s=0)


def test_each_use_keeps_its_default_timeout():
    cfg = Config()
    assert cfg.rank.endpoint.timeout_s == cfg.evaluate.judge.endpoint.timeout_s == 60.0
    assert cfg.pairwise.judge.endpoint.timeout_s == 60.0 and cfg.mtbench.judge.timeout_s == 120.0
    # A section given in part, old or new spelling, keeps its use's default.
    for override in ("mtbench.judge.url=http://m/v1", "mtbench.judge_url=http://m/v1"):
        assert load_config(None, [override]).mtbench.judge.timeout_s == 120.0
    for override in ("pairwise.judge.endpoint.url=http://p/v1", "evaluate.judge.url=http://e/v1"):
        loaded = load_config(None, [override])
        assert loaded.pairwise.judge.endpoint.timeout_s == loaded.evaluate.judge.endpoint.timeout_s == 60.0


def _section(cfg: Config, key: str) -> RankConfig:
    return cfg.rank if key == "rank" else cfg.evaluate.judge


def _score(cfg: Config, key: str, tmp_path: Path) -> None:
    """One prompt through the code path the loop uses for `key`: the rank stage or the gold judge."""
    prompt = [{"role": "user", "content": "hi"}]
    if key == "rank":
        tmp_path.mkdir(exist_ok=True)
        gen = tmp_path / "g.jsonl"
        gen.write_text(json.dumps({"prompt_id": "p0", "prompt": prompt, "candidates": ["a", "bb"],
                                   "exploration": "a"}) + "\n")
        run_rank(cfg, gen, tmp_path / "rank")
    else:
        gold_scores(cfg, [prompt], ["a"])


@pytest.mark.parametrize("key", ["rank", "evaluate.judge"])
def test_the_endpoint_settings_reach_the_requests(key, judge_server, tmp_path, monkeypatch):
    monkeypatch.setenv("SELM_TEST_ENDPOINT_KEY", "sk-endpoint-1")
    server = judge_server(lambda body, headers, n: (200, "[[7]]", 0))
    cfg = load_config(None, [f"{key}.kind=http_judge", f"{key}.endpoint.url={server.url}", f"{key}.endpoint.model=jm",
                             f"{key}.endpoint.extra_body={{chat_template_kwargs: {{enable_thinking: false}}}}",
                             f"{key}.endpoint.api_key_env=SELM_TEST_ENDPOINT_KEY"])
    _score(cfg, key, tmp_path)
    assert server.requests
    for body, headers in server.requests:
        assert body["model"] == "jm" and body["chat_template_kwargs"] == {"enable_thinking": False}
        assert headers["Authorization"] == "Bearer sk-endpoint-1"
    # The timeout and retries are the section's: a judge slower than timeout_s fails after max_retries + 1 tries.
    slow = judge_server(lambda body, headers, n: (200, "[[7]]", 1.0))
    cfg = load_config(None, [f"{key}.kind=http_judge", f"{key}.endpoint.url={slow.url}", f"{key}.endpoint.model=jm",
                             f"{key}.endpoint.timeout_s=0.2", f"{key}.endpoint.max_retries=0",
                             f"{key}.endpoint.max_concurrency=1"])
    with pytest.raises(RankerError) as e:
        _score(cfg, key, tmp_path / "slow")
    assert str(e.value).startswith(f"{key}.endpoint.url: {slow.url}/chat/completions: timed out after 0.2 s (1 attempt")


@pytest.mark.parametrize("key", ["rank", "evaluate.judge"])
def test_a_missing_url_or_model_names_the_new_key(key, tmp_path):
    cfg = load_config(None, [f"{key}.kind=http_judge", f"{key}.endpoint.url=http://127.0.0.1:9/v1"])
    with pytest.raises(RankerError, match=rf"^{key}\.endpoint\.model: required when {key}\.kind is 'http_judge'"):
        _score(cfg, key, tmp_path)
    cfg = load_config(TINY, [f"{key}.kind=http_judge", f"{key}.endpoint.model=m"])
    with pytest.raises(ConfigError, match=rf"^{key}\.endpoint\.url: required when {key}\.kind is 'http_judge'"):
        loop.check_config(cfg, tmp_path / "run", allow_change=False)


def _old_spelling(saved: dict) -> dict:
    """A saved config as selm wrote it before the endpoint section (rank.url, mtbench.judge_url, ...)."""
    out = json.loads(json.dumps(saved))
    for section in (out["rank"], out["evaluate"]["judge"]):
        ep = section.pop("endpoint")
        section.update({"url": ep.pop("url"), "judge_model": ep.pop("model"), **ep})
    ep = out["mtbench"].pop("judge")
    out["mtbench"].update({"judge_url": ep.pop("url"), "judge_model": ep.pop("model"),
                           "judge_extra_body": ep.pop("extra_body"), **ep})
    return out


def test_resuming_a_run_saved_with_the_old_keys_is_no_config_change(tmp_path, capsys):
    sets = ["rank.kind=http_judge", "rank.endpoint.url=http://127.0.0.1:9/v1", "rank.endpoint.model=j",
            "rank.endpoint.extra_body={a: 1}", "mtbench.judge.url=http://127.0.0.1:9/v1"]
    cfg = load_config(TINY, sets)
    out = tmp_path / "run"
    loop.check_config(cfg, out, allow_change=False)
    old = _old_spelling(yaml.safe_load((out / "config.yaml").read_text()))
    assert "url" in old["rank"] and "judge_url" in old["mtbench"] and "endpoint" not in old["rank"]
    (out / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    before = (out / "config.yaml").read_bytes()
    loop.check_config(cfg, out, allow_change=False)  # the same settings: no "different config" refusal
    assert (out / "config.yaml").read_bytes() == before and not (out / "config_changes.log").exists()
    # Readers of the run folder take the old spelling as it is, without telling the user off for it.
    assert load_saved_config(out / "config.yaml") == cfg
    assert main(["status", str(out)]) == 0
    assert _warnings(capsys) == []
    # A real change to an old-spelt key is still one, named by its new key.
    with pytest.raises(ConfigError, match=r"rank\.endpoint\.model: 'j' -> 'k'"):
        loop.check_config(load_config(TINY, sets + ["rank.endpoint.model=k"]), out, allow_change=False)


def test_endpoint_settings_that_change_only_speed_do_not_redo_the_rank_stage():
    base = load_config(None, ["rank.kind=http_judge", "rank.endpoint.url=http://a/v1", "rank.endpoint.model=m"])
    quiet = load_config(None, ["rank.kind=http_judge", "rank.endpoint.url=http://a/v1", "rank.endpoint.model=m",
                               "rank.endpoint.timeout_s=5", "rank.endpoint.max_retries=0",
                               "rank.endpoint.max_concurrency=1", "rank.endpoint.api_key_env=OTHER"])
    assert run_changes.stage_settings(base, 1, "rank") == run_changes.stage_settings(quiet, 1, "rank")
    other = load_config(None, ["rank.kind=http_judge", "rank.endpoint.url=http://a/v1", "rank.endpoint.model=n"])
    assert run_changes.stage_settings(other, 1, "rank")["rank.endpoint.model"] == "n"
    assert run_changes.stage_settings(base, 1, "rank")["rank.endpoint.extra_body"] == {}


def test_a_study_saved_with_the_old_keys_is_the_same_study():
    from selm.studies.study import same_study

    spec = {"title": "t", "arms": [{"name": "a", "overrides": []}], "seeds": [0],
            "base": {"rank": {"kind": "http_judge", "endpoint": {"url": "http://a/v1", "model": "m"}}}}
    saved = {**spec, "base": {"rank": {"kind": "http_judge", "url": "http://a/v1", "judge_model": "m"}}}
    assert same_study(saved, spec) and same_study(spec, spec)
    assert not same_study({**saved, "base": {"rank": {"kind": "http_judge", "url": "http://b/v1", "judge_model": "m"}}},
                          spec)
