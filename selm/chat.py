"""Prompts as chat messages, and how they become token ids.

A prompt is a string (one user turn) or a list of ``{"role", "content"}`` messages ending with a
user turn (multi-turn allowed). Tokenisation applies the tokenizer's chat template. Tokenizers
without a template use a documented plain fallback::

    User: <content>\n\nAssistant: <response><eos>

(system turns render as "System: ...", earlier assistant turns as "Assistant: ...").
"""

from __future__ import annotations

from typing import Any, Sequence

from selm.io import InputError

ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


def normalize_prompt(prompt: Any, where: str = "prompt") -> Messages:
    """A string or a message list -> a validated message list ending with a user turn."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError(f"{where}: empty prompt")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise InputError(f"{where}: expected a string or a non-empty list of chat messages")
    out = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"{where}[{i}]: expected a message {{role, content}}")
        if m["role"] not in ROLES:
            raise InputError(f"{where}[{i}].role: {m['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise InputError(f"{where}[{i}].content: expected a string")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise InputError(f"{where}: the last message must be a user turn, got {out[-1]['role']!r}")
    return out


def response_text_of(response: Any, where: str = "response") -> str:
    """A response is a string, or an assistant message, or a one-message list (TRL's format)."""
    if isinstance(response, str):
        return response
    if isinstance(response, dict) and response.get("role") == "assistant" and isinstance(response.get("content"), str):
        return response["content"]
    if isinstance(response, list) and response and isinstance(response[-1], dict):
        last = response[-1]
        if last.get("role") == "assistant" and isinstance(last.get("content"), str):
            return last["content"]
    raise InputError(f"{where}: expected a string or an assistant message")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def plain_prompt(messages: Messages) -> str:
    """The documented fallback for a tokenizer without a chat template (see the module docstring),
    up to the assistant's header; the policy and a reward model without a template both read it."""
    parts = [f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages]
    return "".join(parts) + "Assistant:"


def prompt_text(tokenizer, messages: Messages) -> str:
    """The text the model sees before its response (with the generation prompt)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return plain_prompt(messages)


def response_suffix_text(tokenizer, messages: Messages, response: str, prompt: str | None = None) -> str:
    """The text that follows the prompt when the model answers `response`, end-of-turn included."""
    if prompt is None:
        prompt = prompt_text(tokenizer, messages)
    if has_chat_template(tokenizer):
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": response}], tokenize=False
        )
        if full.startswith(prompt):
            return full[len(prompt):]
    eos = tokenizer.eos_token or ""
    return " " + response + eos if not has_chat_template(tokenizer) else response + eos


def encode_prompt(tokenizer, messages: Messages) -> list[int]:
    text = prompt_text(tokenizer, messages)
    # A chat template writes its own BOS; the fallback gets the tokenizer's special tokens.
    return tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


def truncate_prompt(ids: list[int], max_prompt_length: int | None) -> list[int]:
    """A prompt's token ids cut from the LEFT to max_prompt_length (the latest turn matters most):
    the one rule for training (train.max_prompt_length) and for generation from the same prompts,
    so the policy is trained on the prompt it answered."""
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        return ids[-max_prompt_length:]
    return ids


def encode_response(
    tokenizer, messages: Messages, response: str, prompt: str | None = None, stop_ids: Sequence[int] = (),
    finished: bool = True,
) -> list[int]:
    """Response token ids, ending with the end-of-turn token. Whatever a template writes after it
    (e.g. a newline) is dropped: generation stops at that token, so training must too. A response
    that was cut at the generation limit (finished=False) ends before the end-of-turn token: the
    model never chose to stop there."""
    ids = tokenizer(response_suffix_text(tokenizer, messages, response, prompt), add_special_tokens=False)["input_ids"]
    stop = set(stop_ids)
    for i, t in enumerate(ids):
        if t in stop:
            return ids[: i + int(finished)] or ids[: i + 1]
    return ids


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: EOS plus the template's end-of-turn token (e.g. <|im_end|>)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    probe = [{"role": "user", "content": "hi"}]
    marker = "\u2603"
    suffix = response_suffix_text(tokenizer, probe, marker)
    tail = suffix.split(marker, 1)[-1]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for t in tail_ids:
        if t in special:
            ids.add(int(t))
            break
    return sorted(ids)


def decode_response(tokenizer, ids: Sequence[int], stop_ids: Sequence[int]) -> str:
    """Cut generated ids at the first end-of-turn token and decode without special tokens."""
    stop = set(stop_ids)
    out = []
    for t in ids:
        if int(t) in stop:
            break
        out.append(int(t))
    return tokenizer.decode(out, skip_special_tokens=True).strip()
