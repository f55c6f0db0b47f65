"""Every numeric config key refuses NaN and infinity, and negative or zero values where they mean
nothing, with the key named -- walked over `describe_options`, so a new numeric key is covered
(and must be listed below if zero is a valid value for it)."""

import pytest

from selm.config import ConfigError, describe_options, load_config

NUMERIC = [key for key, tp, _, _ in describe_options()
           if any(t in tp.split("|") for t in ("int", "float", "list[float]"))]

# Keys for which 0 is a meaningful value, with any overrides it needs (e.g. a greedy-only setup for
# a zero temperature). Every other numeric key must refuse 0.
ZERO_OK = {
    "seed": [], "data.eval_size": [], "generate.num_samples": [],
    "generate.temperature": ["generate.num_samples=0"], "rank.endpoint.max_retries": [], "evaluate.judge.endpoint.max_retries": [],
    "pair.min_margin": [], "pair.missing_eos_penalty": [], "train.alpha": [], "train.warmup_ratio": [],
    "train.weight_decay": [], "train.adam_beta1": [], "train.adam_beta2": [], "train.max_grad_norm": [],
    "train.save_every_steps": [], "evaluate.temperature": [], "train.lora.r": [], "train.lora.dropout": [],
    "mtbench.temperature": [], "mtbench.judge.max_retries": [],
    "report.exploration_prompts": [],
    "pairwise.temperature": [], "pairwise.seed": [], "pairwise.judge.endpoint.max_retries": [],
}


def _value(key: str, text: str) -> str:
    # loop.learning_rates is a list with one value per iteration (3 by default).
    return f"[{text}, {text}, {text}]" if key == "loop.learning_rates" else text


def test_the_walk_covers_every_section():
    sections = {k.split(".")[0] for k in NUMERIC}
    assert {"seed", "data", "generate", "rank", "pair", "train", "loop", "evaluate"} <= sections
    assert len(NUMERIC) >= 35, NUMERIC
    assert set(ZERO_OK) <= set(NUMERIC)


@pytest.mark.parametrize("key", NUMERIC)
@pytest.mark.parametrize("text", ["nan", ".nan", "inf", "-inf", ".inf", "1e999"])
def test_non_finite_values_are_refused_with_the_key(key, text):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={_value(key, text)}"])
    assert str(e.value).startswith(key), str(e.value)


@pytest.mark.parametrize("key", NUMERIC)
def test_negative_values_are_refused_with_the_key(key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={_value(key, '-1')}"])
    assert str(e.value).startswith(key), str(e.value)


@pytest.mark.parametrize("key", NUMERIC)
def test_zero_is_refused_unless_meaningful(key):
    overrides = [f"{key}={_value(key, '0')}"]
    if key in ZERO_OK:
        cfg = load_config(None, ZERO_OK[key] + overrides)
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == 0
    else:
        with pytest.raises(ConfigError) as e:
            load_config(None, overrides)
        assert str(e.value).startswith(key), str(e.value)


def test_the_reported_cases_are_refused():
    with pytest.raises(ConfigError, match=r"^train\.beta: must be a finite number, got 'nan'"):
        load_config(None, ["train.beta=nan"])
    with pytest.raises(ConfigError, match=r"^train\.learning_rate: must be a finite number"):
        load_config(None, ["train.learning_rate=inf"])
    with pytest.raises(ConfigError, match=r"^loop\.learning_rates\[1\]: must be a finite number"):
        load_config(None, ["loop.iterations=2", "loop.learning_rates=[1e-6, .nan]"])
    # Finite values in range still load, as numbers.
    assert load_config(None, ["train.beta=0.1", "train.learning_rate=5e-7"]).train.learning_rate == 5e-7
