"""Hub ids for models and datasets (selm/hub.py): downloaded on first use at the configured revision,
never with HF_HUB_OFFLINE=1, by the main rank first under several ranks. No network: the hub
library's snapshot_download and datasets' load_dataset are replaced by recorders that hand back
locally built folders and rows."""

import json

import pytest

from selm import dist, hub
from selm.config import ModelConfig, RankConfig
from selm.io import InputError


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


@pytest.fixture
def downloads(monkeypatch):
    """snapshot_download recorder: `folders[name]` is what it returns; a name not there is 'missing'."""
    import huggingface_hub

    state = {"calls": [], "folders": {}}

    def snapshot_download(repo_id, revision=None, local_files_only=False, allow_patterns=None, **kw):
        state["calls"].append({"repo_id": repo_id, "revision": revision, "local_files_only": local_files_only,
                               "allow_patterns": allow_patterns})
        if repo_id not in state["folders"]:
            raise FileNotFoundError(f"{repo_id} is not in the cache")
        return str(state["folders"][repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return state


def test_a_hub_model_is_downloaded_at_its_revision(online, downloads, tiny_model_dir):
    from selm.models import check_model_source, materialize_model

    downloads["folders"]["HuggingFaceH4/mistral-7b-sft-beta"] = tiny_model_dir
    cfg = ModelConfig(name_or_path="HuggingFaceH4/mistral-7b-sft-beta", revision="v1.0")
    check_model_source(cfg)
    assert materialize_model(cfg) == tiny_model_dir
    assert len(downloads["calls"]) == 2
    for call in downloads["calls"]:
        assert call["repo_id"] == "HuggingFaceH4/mistral-7b-sft-beta" and call["revision"] == "v1.0"
        assert not call["local_files_only"] and "*.safetensors" in call["allow_patterns"]
        assert "*.bin" not in call["allow_patterns"]  # pickled weights are never fetched
    downloads["calls"].clear()
    with pytest.raises(InputError) as e:
        materialize_model(ModelConfig(name_or_path="org/absent"))
    assert str(e.value).startswith("model.name_or_path: 'org/absent' is not a local folder, and downloading it")
    assert "\n" not in str(e.value)


def test_offline_reads_the_cache_only_with_one_line(monkeypatch, downloads, tiny_model_dir):
    from selm.models import materialize_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    downloads["folders"]["org/cached"] = tiny_model_dir
    assert materialize_model(ModelConfig(name_or_path="org/cached")) == tiny_model_dir
    with pytest.raises(InputError) as e:
        materialize_model(ModelConfig(name_or_path="org/absent", revision="main"))
    assert str(e.value) == ("model.name_or_path: 'org/absent' is not a local folder nor a model in the local Hugging "
                            "Face cache (HF_HUB_OFFLINE=1: nothing is downloaded)")
    assert [c["local_files_only"] for c in downloads["calls"]] == [True, True]


def test_reward_model_and_pairrm_by_hub_id(online, downloads, tmp_path):
    from selm.engines.pairrm import load_pairrm
    from selm.engines.rankers import RewardModelRanker
    from selm.engines.registry import build_ranker
    from helpers_pairrm import save_tiny_pairrm
    from test_rankers import _save_reward_model

    downloads["folders"]["org/rm"] = _save_reward_model(tmp_path / "rm", None)
    downloads["folders"]["llm-blender/PairRM-hf"] = save_tiny_pairrm(tmp_path / "pairrm")
    ranker = build_ranker(RankConfig(kind="reward_model", model="org/rm", revision="abc123"))
    assert isinstance(ranker, RewardModelRanker)
    load_pairrm(RankConfig(kind="pairrm", model="llm-blender/PairRM-hf", revision="v2"), "evaluate.judge")
    assert [(c["repo_id"], c["revision"], c["local_files_only"]) for c in downloads["calls"]] == [
        ("org/rm", "abc123", False), ("llm-blender/PairRM-hf", "v2", False)]


def test_the_main_rank_downloads_first(online, downloads, monkeypatch, tiny_model_dir):
    downloads["folders"]["org/m"] = tiny_model_dir
    events = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "barrier", lambda: events.append("barrier"))
    import huggingface_hub

    inner = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: (events.append("download"), inner(*a, **k))[1])
    for rank, want in (("0", ["download", "barrier"]), ("1", ["barrier", "download"])):
        events.clear()
        monkeypatch.setenv("RANK", rank)
        hub.model_snapshot("org/m", "model.name_or_path")
        assert events == want, rank


# --------------------------------------------------------------------------------------------
# Datasets

UF_ROWS = [{"prompt": f"question {i}?", "prompt_id": f"p{i}",
            "chosen": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": "bad"}]}
           for i in range(6)]


@pytest.fixture
def hub_datasets(monkeypatch):
    """load_dataset recorder returning an UltraFeedback-binarized-like DatasetDict (or one split)."""
    import datasets

    calls = []

    def load_dataset(name, split=None, revision=None, **kw):
        calls.append((name, split, revision))
        dd = datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(UF_ROWS[:2]),
                                   "train_prefs": datasets.Dataset.from_list(UF_ROWS)})
        return dd if split is None else dd[split]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_prompts_by_hub_dataset_id_and_split(online, hub_datasets):
    from selm.data import load_prompts

    rows = load_prompts("HuggingFaceH4/ultrafeedback_binarized", split="train_prefs", revision="r1")
    assert [r["prompt_id"] for r in rows] == [f"p{i}" for i in range(6)]
    assert hub_datasets == [("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "r1")]
    with pytest.raises(InputError, match="several splits"):  # as for a folder: refused, not guessed
        load_prompts("HuggingFaceH4/ultrafeedback_binarized")


def test_offline_never_loads_a_hub_dataset(monkeypatch, hub_datasets):
    from selm.data import load_prompts

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError) as e:
        load_prompts("HuggingFaceH4/ultrafeedback_binarized", split="train_prefs")
    assert "HF_HUB_OFFLINE=1" in str(e.value) and "\n" not in str(e.value)
    assert hub_datasets == []


def test_a_run_config_names_a_hub_dataset(online, hub_datasets):
    from selm.config import load_config
    from selm.data import split_from_config

    cfg = load_config(None, ["data.prompts=HuggingFaceH4/ultrafeedback_binarized", "data.split=train_prefs",
                             "data.revision=r2", "loop.iterations=2", "data.eval_size=2"])
    slices, held = split_from_config(cfg)
    assert sum(map(len, slices)) + len(held) == 6
    assert hub_datasets == [("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "r2")]


def test_train_pairs_by_hub_dataset_id(online, hub_datasets, tmp_path, tiny_model_dir):
    from selm.cli import main

    model = tmp_path / "start"
    import shutil

    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "out"
    rc = main(["train", "--pairs", "HuggingFaceH4/ultrafeedback_binarized", "--model", str(model),
               "--output-dir", str(out), "--set", "data.split=train_prefs", "--set", "train.alpha=0",
               "--set", "train.batch_size=2", "--set", "train.max_length=64", "--set", "train.max_prompt_length=32"])
    assert rc == 0
    assert hub_datasets == [("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", None)]
    rows = [json.loads(l) for l in (out / "hub_pairs.jsonl").read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == [f"p{i}" for i in range(6)]
    assert (out / "model" / "config.json").is_file()
