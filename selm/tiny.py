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
