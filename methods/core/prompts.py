"""Turning conversation turns into prompt token ids, the same way for every method."""

from __future__ import annotations

from typing import Any


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids for the next assistant turn, through the model's own chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        return list(ids)
    text = "".join(
        f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n\n" for m in messages
    )
    return tokenizer(text + "Assistant:", add_special_tokens=True)["input_ids"]


def stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """EOS ids from both the tokenizer and the generation config (chat models often differ)."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(ids)
