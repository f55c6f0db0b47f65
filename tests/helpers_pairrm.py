"""A tiny PairRM checkpoint for tests (tests alone use it, so it lives here and not in selm/tiny.py,
which selm/models.py imports: selm/engines/pairrm.py -> models.py -> tiny.py would loop back)."""

from __future__ import annotations

from pathlib import Path

from selm.tiny import build_tiny_tokenizer


def save_tiny_pairrm(path: str | Path, seed: int = 0, layout: str = "hf", hidden_size: int = 32) -> Path:
    """A randomly initialised PairRM-shaped checkpoint (DeBERTa-v2 encoder + pairwise head) with the
    byte tokenizer plus [CLS]/[SEP] and PairRM's four marker tokens, for tests.

    layout "hf": config.json is the DeBERTa-v2 config with PairRM's extra keys (llm-blender/PairRM-hf).
    layout "blender": config.json is llm-blender's RankerConfig (llm-blender/PairRM); its backbone is
    DeBERTa-v3-large, so a test must shrink selm.engines.pairrm.DEBERTA_V3_LARGE to this size.
    """
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import DebertaV2Config

    from selm.engines.pairrm import MARKERS, build_pairrm_module
    from selm.io import AtomicDir, atomic_write_text

    path = Path(path)
    tok = build_tiny_tokenizer(chat_template=False)
    tok.add_special_tokens({"cls_token": "[CLS]", "sep_token": "[SEP]"})
    tok.add_tokens(list(MARKERS), special_tokens=True)
    ids = {m: tok.convert_tokens_to_ids(m) for m in MARKERS}
    config = DebertaV2Config(**tiny_deberta_config(hidden_size), vocab_size=len(tok))
    config.update({"n_tasks": 1, "drop_out": 0.05, "source_prefix_id": ids[MARKERS[0]],
                   "cand1_prefix_id": ids[MARKERS[1]], "cand2_prefix_id": ids[MARKERS[2]],
                   "cand_prefix_id": ids[MARKERS[3]]})
    torch.manual_seed(seed)
    module = build_pairrm_module(config, n_tasks=1, dropout=0.05)
    with AtomicDir(path) as tmp:
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(Path(tmp) / "model.safetensors"))
        tok.save_pretrained(tmp)
        if layout == "hf":
            config.save_pretrained(tmp)
        else:
            atomic_write_text(Path(tmp) / "config.json", json.dumps({
                "ranker_type": "pairranker", "model_type": "deberta", "model_name": "microsoft/deberta-v3-large",
                "source_maxlength": 1224, "candidate_maxlength": 412, "n_tasks": 1, "drop_out": 0.05}))
    return path


def tiny_deberta_config(hidden_size: int = 32) -> dict:
    """A DeBERTa-v3-style encoder (relative attention, shared keys, p2c|c2p) at toy size; weights drawn
    wider than usual so that a random model tells candidates apart clearly."""
    return dict(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * hidden_size,
                hidden_act="gelu", max_position_embeddings=512, type_vocab_size=0, relative_attention=True,
                initializer_range=0.2, max_relative_positions=-1, position_buckets=32, norm_rel_ebd="layer_norm", share_att_key=True,
                pos_att_type=["p2c", "c2p"], position_biased_input=False, layer_norm_eps=1e-7, pad_token_id=0)
