"""FSDP2 on CPU (selm/fsdp.py): `torchrun --nproc_per_node 2` (gloo) of tests/helpers_fsdp.py, a few
AdamW steps of a DPO loss on the tiny model with gradient accumulation, against the same steps in
one process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from test_distributed import BIN, WEIGHT_TOL, env, free_port

HELPER = Path(__file__).resolve().parent / "helpers_fsdp.py"


def helper(*args, world=1):
    launch = [str(BIN / "torchrun"), "--nproc_per_node", str(world), "--master_addr", "127.0.0.1",
              "--master_port", str(free_port())] if world > 1 else [sys.executable]
    proc = subprocess.run([*launch, str(HELPER), *map(str, args)], env={**env(), "SELM_DIST_TIMEOUT_MINUTES": "2"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from selm.tiny import save_tiny

    tmp = tmp_path_factory.mktemp("fsdp")
    model = save_tiny(tmp / "tiny")
    helper(model, tmp / "one")
    helper(model, tmp / "two", "--save-at", 2, world=2)  # a sharded checkpoint after step 2 of 4
    return model, tmp / "one", tmp / "two"


@pytest.mark.slow
def test_fsdp2_training_equals_one_process_with_one_unit_per_decoder_layer(runs):
    model, one, two = runs
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()  # the tied LM head saved once, as a plain state dict has it
    for k in a:
        assert_close(b[k], a[k], **WEIGHT_TOL, msg=k)
    assert any((a[k] - load_file(model / "model.safetensors")[k]).abs().max() > 1e-3 for k in a)  # it trained
    r1, r2 = result(one), result(two)
    assert r2["world"] == 2 and r1["losses"] == pytest.approx(r2["losses"], rel=1e-5)
    # The whole model's gradient norm (a partial DTensor made full), not one rank's share; above the
    # clipping threshold, so clipping sharded gradients is exercised too.
    assert r1["grad_norms"] == pytest.approx(r2["grad_norms"], rel=1e-5) and min(r1["grad_norms"]) > 0.5
    assert r2["units"] == ["", "model.model.layers.0", "model.model.layers.1"]  # the root, and each layer


@pytest.mark.slow
def test_sharded_checkpoint_resumes_in_fresh_processes_to_the_same_weights(runs, tmp_path):
    model, _, two = runs
    assert sorted(p.name for p in (two / "ckpt").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                                  "extra.json"]  # one shard file per rank
    helper(model, tmp_path / "resumed", "--resume", two / "ckpt", world=2)
    a, b = weights(two), weights(tmp_path / "resumed")
    for k in a:
        assert_close(b[k], a[k], atol=1e-7, rtol=0, msg=k)  # optimizer moments and step came back too
    assert result(tmp_path / "resumed")["losses"] == result(two)["losses"][2:]


@pytest.mark.slow
def test_the_full_state_dict_is_a_plain_hugging_face_folder(runs):
    from transformers import AutoModelForCausalLM

    _, _, two = runs
    m = AutoModelForCausalLM.from_pretrained(two / "model")
    w = weights(two)
    assert_close(m.model.embed_tokens.weight.detach(), w["model.embed_tokens.weight"])
    assert m.lm_head.weight is m.model.embed_tokens.weight  # still tied


def test_a_checkpoint_holding_an_arbitrary_object_is_not_unpickled(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from selm.fsdp import _weights_only_planner

    dcp.save({"hyper": {"when": Path("/x")}}, checkpoint_id=tmp_path / "c")  # one process: no group needed
    with pytest.raises(CheckpointException) as failed:
        dcp.load({"hyper": {"when": None}}, checkpoint_id=tmp_path / "c", planner=_weights_only_planner())
    assert "Weights only load failed" in repr(failed.value.failures)
    dcp.save({"hyper": {"lr": 0.5, "betas": (0.9, 0.99)}}, checkpoint_id=tmp_path / "ok")
    state = {"hyper": {"lr": 0.0, "betas": (0.0, 0.0)}}
    dcp.load(state, checkpoint_id=tmp_path / "ok", planner=_weights_only_planner())
    assert state == {"hyper": {"lr": 0.5, "betas": (0.9, 0.99)}}


def test_layer_classes_come_from_the_model_or_a_named_list(tmp_path):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from selm.fsdp import decoder_layer_classes
    from selm.objective.logprobs import ResponseLogps
    from selm.tiny import build_tiny_model

    module = ResponseLogps(build_tiny_model(300), segments=False)
    assert decoder_layer_classes(module) == {LlamaDecoderLayer}  # from the inner model's _no_split_modules
    with pytest.raises(ValueError, match="no submodule of ResponseLogps is one of \\['LlamaLayer'\\]"):
        decoder_layer_classes(module, ["LlamaLayer"])
