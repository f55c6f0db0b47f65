"""Config loading/validation, prompt and pair loading, splitting, and the pair stage."""

import json
from pathlib import Path

import pytest

from selm.config import ConfigError, describe_options, load_config, save_config
from selm.data import load_pairs, load_prompts, split_prompts
from selm.io import InputError
from selm.stages.pair import pair_record, run_pair

# Six rows in the exact schema of UltraFeedback-binarized (made-up content), kept in tests/data/
SHARED = Path(__file__).resolve().parent / "data" / "ultrafeedback_binarized_sample.jsonl"
ROOT = Path(__file__).resolve().parents[1]


def test_yaml_overrides_and_round_trip(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  alpha: 1e-3\n  beta: 0.05\nloop:\n  iterations: 2\n  learning_rates: [5e-7, 1e-7]\n")
    cfg = load_config(y, ["train.alpha=0", "seed=7"])
    assert cfg.train.alpha == 0.0 and cfg.train.beta == 0.05 and cfg.seed == 7
    assert cfg.lr_for_iteration(2) == 1e-7
    assert cfg.alpha_for_iteration(2) == 0.0  # train.alpha when loop.alphas is unset
    cfg2 = load_config(y, ["loop.alphas=[0, 1e-4]"])
    assert [cfg2.alpha_for_iteration(t) for t in (1, 2)] == [0.0, 1e-4]
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("override,message", [
    ("train.alpah=1", r"train.alpah: unknown key \(did you mean 'alpha'\?\)"),
    ("train.beta=abc", r"train.beta: expected a number, got 'abc'"),
    ("train.beta=0", r"train.beta: must be > 0"),
    ("train.loss=hinge", r"train.loss: 'hinge' is not one of"),
    ("loop.learning_rates=[1e-6]", r"loop.learning_rates: has 1 values, loop.iterations is 3"),
    ("loop.alphas=[0, 1e-3]", r"loop.alphas: has 2 values, loop.iterations is 3"),
    ("loop.alphas=[0, -1e-3, 0]", r"loop.alphas: every value must be >= 0"),
    ("evaluate.judge.batch_size=0", r"evaluate.judge.batch_size: must be >= 1"),
    ('evaluate.judge.endpoint.extra_body={"model": "x"}', r"evaluate.judge.endpoint.extra_body: model is set by selm itself"),
    ("rank.endpoint.extra_body=5", r"rank.endpoint.extra_body: expected a mapping, got 5"),
    ("rank.endpoint.extra_body={a: .nan}", r"rank.endpoint.extra_body: must be plain JSON"),
    # An old spelling's error names the key it now is.
    ("rank.extra_body=5", r"rank.endpoint.extra_body: expected a mapping, got 5"),
    ("mtbench.timeout_s=0", r"mtbench.judge.timeout_s: must be > 0"),
    ("train.max_prompt_length=2000", r"train.max_length: must be greater than train.max_prompt_length"),
    ("bogus=1", r"bogus: unknown key"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("train:\n  alpha: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(y)


def test_every_option_is_documented():
    rows = describe_options()
    assert len(rows) > 40
    assert all(doc for _, _, _, doc in rows), [k for k, _, _, d in rows if not d]


def test_ultrafeedback_rows_load_as_they_are():
    prompts = load_prompts(SHARED)
    assert len(prompts) == 6
    first = json.loads(SHARED.read_text().splitlines()[0])
    assert prompts[0]["prompt_id"] == first["prompt_id"]
    assert prompts[0]["prompt"] == [{"role": "user", "content": first["prompt"]}]
    assert prompts[0]["chosen"] == first["chosen"][-1]["content"]
    # The same rows are valid DPO pairs (alpha = 0, no exploration needed).
    pairs = load_pairs(SHARED, need_exploration=False)
    assert pairs[0].rejected == first["rejected"][-1]["content"]


def test_parquet_and_datasets_folder(tmp_path):
    import datasets

    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r", "exploration": "e"} for i in range(3)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    for src in (tmp_path / "p.parquet", tmp_path / "folder"):
        pairs = load_pairs(src, need_exploration=True)
        assert [p.prompt[0]["content"] for p in pairs] == ["p0", "p1", "p2"]


@pytest.mark.parametrize("line,message", [
    ("{not json", r"bad.jsonl:2: invalid JSON"),
    ('{"prompt": "a", "chosen": "b"}', r"bad.jsonl:2: missing field 'rejected'"),
    ('{"prompt": [{"role": "bot", "content": "a"}], "chosen": "b", "rejected": "c"}', r"bad.jsonl:2: field 'prompt'\[0\].role"),
    ('{"prompt": "a", "chosen": 5, "rejected": "c"}', r"bad.jsonl:2: field 'chosen': expected a string"),
])
def test_bad_pair_rows_name_file_and_line(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok", "chosen": "b", "rejected": "c"}\n' + line + "\n")
    with pytest.raises(InputError, match=message):
        load_pairs(p, need_exploration=False)


def test_split_disjoint_slices_and_held_out():
    prompts = [{"prompt_id": str(i)} for i in range(23)]
    slices, held = split_prompts(prompts, iterations=3, eval_size=5, max_prompts=None, slices="disjoint",
                                 shuffle=True, seed=1, has_eval_file=False)
    ids = [r["prompt_id"] for s in slices for r in s]
    assert [len(s) for s in slices] == [6, 6, 6] and len(held) == 5
    assert len(set(ids)) == 18 and not set(ids) & {r["prompt_id"] for r in held}
    again, _ = split_prompts(prompts, iterations=3, eval_size=5, max_prompts=None, slices="disjoint",
                             shuffle=True, seed=1, has_eval_file=False)
    assert again == slices
    every, _ = split_prompts(prompts, iterations=2, eval_size=3, max_prompts=None, slices="all", shuffle=False,
                             seed=0, has_eval_file=False)
    assert every[0] == every[1] and len(every[0]) == 20


def test_pair_best_vs_worst_ties_dropped(tmp_path):
    rec = {"prompt_id": "a", "prompt": [{"role": "user", "content": "q"}], "candidates": ["x", "y", "z"],
           "sources": ["sample", "sample", "greedy"], "exploration": "z", "scores": [0.2, 0.9, -1.0]}
    p = pair_record(rec, 0.0)
    assert p["chosen"] == [{"role": "assistant", "content": "y"}]
    assert p["rejected"] == [{"role": "assistant", "content": "z"}]
    assert p["exploration"] == [{"role": "assistant", "content": "z"}] and p["source_rejected"] == "greedy"
    assert pair_record({**rec, "scores": [1.0, 1.0, 1.0]}, 0.0) is None
    assert pair_record(rec, 1.9) is None  # margin 1.9 is not above min_margin
    scores = tmp_path / "scores.jsonl"
    scores.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "prompt_id": "b", "scores": [3, 3, 3]}) + "\n")
    stats = run_pair(scores, tmp_path / "pair", min_margin=0.0)
    assert stats["pairs"] == 1 and stats["ties_dropped"] == 1
    assert sorted(x.name for x in (tmp_path / "pair").iterdir()) == ["DONE.json", "pairs.jsonl"]
    # The output is itself a valid pairs file for the training stage.
    assert load_pairs(tmp_path / "pair" / "pairs.jsonl", need_exploration=True)[0].chosen == "y"


def test_pair_rejects_non_finite_scores(tmp_path):
    scores = tmp_path / "scores.jsonl"
    scores.write_text('{"prompt_id": "a", "prompt": [], "candidates": ["x", "y"], "exploration": "x", "scores": [1, NaN]}\n')
    with pytest.raises(InputError, match=r"scores.jsonl:1: non-finite score \(prompt_id a\)"):
        run_pair(scores, tmp_path / "pair", min_margin=0.0)
    assert not (tmp_path / "pair" / "DONE.json").exists()
