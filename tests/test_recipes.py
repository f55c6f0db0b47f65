"""The shipped recipes (configs/recipes/*.yaml): the authors' settings, the launch command in each
header, and one iteration of each recipe's loop on the tiny model with only the model, data, ranker
and sizes swapped."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from selm import loop
from selm.config import ConfigError, check_for_loop, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "recipes"
SAMPLE = ROOT / "tests" / "data" / "ultrafeedback_binarized_sample.jsonl"

# The authors' settings (paper, their train_*.sh and recipes/*/selm_config_full.yaml).
EXPECTED = {
    "zephyr-7b": dict(model="HuggingFaceH4/mistral-7b-sft-beta", total_batch=256, iterations=4,
                      alphas=[0.0, 1e-3, 1e-3, 1e-3], lrs=[5e-7, 5e-7, 5e-7, 1e-7]),
    "llama3-8b-instruct": dict(model="meta-llama/Meta-Llama-3-8B-Instruct", total_batch=128, iterations=3,
                               alphas=[1e-4] * 3, lrs=[5e-7, 3e-7, 1e-7]),
    "phi3-mini": dict(model="microsoft/Phi-3-mini-4k-instruct", total_batch=128, iterations=3,
                      alphas=[1e-3] * 3, lrs=[5e-7, 3e-7, 1e-7]),
}
# Swapped for CI: the model, the data, the ranker, the sizes, and the generation engine (vLLM needs GPUs).
TINY = ["model.name_or_path=tiny", f"data.prompts={SAMPLE}", "rank.kind=callable",
        "rank.callable=selm.toy_judges:letters_ranker", "generate.backend=hf", "generate.max_new_tokens=12",
        "train.batch_size=1", "train.grad_accum=2"]


def test_every_recipe_is_listed():
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_has_the_authors_settings(name):
    path = RECIPES / f"{name}.yaml"
    cfg, want = load_config(path), EXPECTED[name]
    assert cfg.model.name_or_path == want["model"]
    t = cfg.train
    assert (t.beta, t.lr_scheduler, t.warmup_ratio, t.epochs) == (0.01, "cosine", 0.1, 1)
    assert (cfg.train.max_length, cfg.train.max_prompt_length, cfg.train.bf16) == (1024, 512, True)
    assert cfg.loop.iterations == want["iterations"]
    assert [cfg.alpha_for_iteration(t) for t in range(1, want["iterations"] + 1)] == want["alphas"]
    assert [cfg.lr_for_iteration(t) for t in range(1, want["iterations"] + 1)] == want["lrs"]
    g = cfg.generate
    assert (g.backend, g.num_samples, g.exploration, g.exploration_as_candidate, g.use_dataset_pair,
            g.max_new_tokens) == ("vllm", 0, "greedy", True, True, 1024)
    assert cfg.rank.kind == "pairrm" and cfg.seed == 42
    assert (cfg.data.slices, cfg.data.shuffle) == ("disjoint", False)  # the authors' consecutive slices
    # The total batch is batch_size x grad_accum x the 8 processes of the named ZeRO-3 config.
    text = path.read_text()
    launch = "accelerate launch --config_file configs/accelerate/zero3.yaml -m selm.cli run"
    assert f"{launch} configs/recipes/{name}.yaml" in text
    zero3 = yaml.safe_load((ROOT / "configs" / "accelerate" / "zero3.yaml").read_text())
    assert zero3["deepspeed_config"]["zero_stage"] == 3
    assert cfg.train.batch_size * cfg.train.grad_accum * zero3["num_processes"] == want["total_batch"]
    assert re.search(rf"Total batch {want['total_batch']} = batch_size {cfg.train.batch_size} x grad_accum "
                     rf"{cfg.train.grad_accum} x 8 GPUs", text)
    # What the user must supply is refused by name until supplied.
    with pytest.raises(ConfigError, match=r"^data\.prompts: required"):
        check_for_loop(cfg)
    with pytest.raises(ConfigError, match=r"^rank\.model: required when rank\.kind is 'pairrm'"):
        check_for_loop(load_config(path, [f"data.prompts={SAMPLE}"]))
    check_for_loop(load_config(path, [f"data.prompts={SAMPLE}", "rank.model=/some/PairRM"]))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_runs_one_iteration_on_the_tiny_model(name, tmp_path):
    cfg = load_config(RECIPES / f"{name}.yaml", TINY)
    out = tmp_path / name
    loop.check_config(cfg, out, allow_change=False)
    for stage in loop.ITERATION_STAGES:
        loop.run_stage(cfg, out, 1, stage)
    gens = [json.loads(l) for l in (out / "iter_1/generate/generations.jsonl").read_text().splitlines()]
    # The authors' candidate set: the greedy response and the dataset's own pair.
    assert gens and all(g["sources"] == ["greedy", "dataset_chosen", "dataset_rejected"] for g in gens)
    slices = json.loads((out / "data" / "DONE.json").read_text())["train_slices"]
    assert len(slices) == EXPECTED[name]["iterations"] and len(gens) == slices[0]
    done = json.loads((out / "iter_1/train/DONE.json").read_text())
    assert done["alpha"] == EXPECTED[name]["alphas"][0]
    assert done["learning_rate"] == EXPECTED[name]["lrs"][0]
    assert done["pairs"] == len(gens)


def test_the_recipes_guide_commands_name_each_recipe_and_its_launch():
    """The commands of docs/recipes.md (the README's "Recipes", moved there) launch every recipe under
    the ZeRO-3 config, and the keys they set are exactly what the recipes leave to the user."""
    section = (ROOT / "docs" / "recipes.md").read_text()
    commands = re.findall(r"accelerate launch --config_file (\S+) -m selm\.cli run (\S+) \\\n\s+(.*)", section)
    assert sorted(Path(c[1]).stem for c in commands) == sorted(EXPECTED)
    for zero3, recipe, rest in commands:
        assert zero3 == "configs/accelerate/zero3.yaml" and (ROOT / recipe).is_file()
        sets = re.findall(r"--set (\S+)", rest)
        assert sorted(s.split("=")[0] for s in sets) == ["data.prompts", "data.split", "rank.model"]
        check_for_loop(load_config(ROOT / recipe, sets))
        assert f"run {recipe}" in (ROOT / recipe).read_text()


def test_a_missing_pairrm_folder_stops_the_run_before_generation(tmp_path, capsys):
    from selm.cli import main

    out = tmp_path / "run"
    rc = main(["run", str(RECIPES / "phi3-mini.yaml"), "--output-dir", str(out), "--set", f"data.prompts={SAMPLE}",
               "--set", f"rank.model={tmp_path / 'no_such_PairRM'}", "--set", "model.name_or_path=tiny"])
    assert rc == 2
    assert "rank.model: " in capsys.readouterr().err
    assert not (out / "iter_1").exists()
