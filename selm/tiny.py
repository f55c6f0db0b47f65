"""A tiny Llama (well under 1M parameters) and a byte-level tokenizer, built locally.

Tests, configs/tiny.yaml and the CI suite use these so that nothing is downloaded. The tokenizer
is byte-level BPE with no merges (every UTF-8 byte is a token) plus ChatML special tokens and a
ChatML chat template, the same format SmolLM2-Instruct uses.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(sorted(byte_alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")] + (
            [] if chat_template else ["<|im_end|>"]
        ),
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def build_tiny_model(vocab_size: int, seed: int = 0, hidden_size: int = 64, layers: int = 2,
                     num_heads: int = 4, num_kv_heads: int = 2):
    """num_heads=1, num_kv_heads=1 gives a head dimension of 64, the smallest vLLM's attention
    kernels accept (the default, 4 heads of 16, is faster on CPU under transformers)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model


def save_tiny(path: str | Path, seed: int = 0, chat_template: bool = True, num_heads: int = 4,
              num_kv_heads: int = 2) -> Path:
    """Build the tiny model + tokenizer and save them (atomically) as a Hugging Face folder."""
    from selm.io import AtomicDir

    path = Path(path)
    tok = build_tiny_tokenizer(chat_template=chat_template)
    model = build_tiny_model(len(tok), seed=seed, num_heads=num_heads, num_kv_heads=num_kv_heads)
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    with AtomicDir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return path


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

    from selm.engines.pairrm import MARKERS, _build_module
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
    module = _build_module(config, n_tasks=1, dropout=0.05)
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
