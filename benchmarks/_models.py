"""Models the benchmarks build locally, so that nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

from selm.tiny import build_tiny_tokenizer


def save_smollm2_shaped(path: str | Path) -> Path:
    """A randomly initialised Llama with SmolLM2-135M's shape (hence its compute per token) and the
    tiny byte tokenizer: realistic timing for benchmarks with nothing downloaded. Random weights
    almost never end their turn, so generation runs to max_new_tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
