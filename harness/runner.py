"""The runner's unit of work: a shard of examples through every method on one device.

``run_shard`` is a plain function over plain inputs (examples, decoders, a sink), so a
scheduler such as Ray can later spread shards over GPUs and machines unchanged. Methods
are interleaved per example, and their order rotates from one example to the next, so
slow machine drift and warm-cache effects fall on every method alike.

With ``repeats`` > 1 every method decodes each example that many times, the rounds
interleaved and rotated too, and the record kept is the round with the median time per
token: a whole real run (its tokens, steps and times together), not a blend. On a shared
machine whose speed drifts by tens of percent over seconds, this is what makes a ratio
near 1.0 decidable without multiplying the examples.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import zlib

from methods.core.decoder import Decoder, GenConfig
from methods.core.prompts import encode_conversation
from methods.core.timing import timed
from tasks.base import Example


@dataclass
class ShardSettings:
    max_new_tokens: int
    stop_ids: Sequence[int]
    max_context: int | None  # prompts that cannot fit prompt + max_new_tokens are skipped
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    repeats: int = 1  # timed rounds per (example, method); the median round is kept

    def gen_config(self, example: Example, turn: int) -> GenConfig:
        """Sampling is seeded per (run seed, example, turn): reproducible, and the same for every method."""
        seed = zlib.crc32(f"{self.seed}|{example.task}|{example.id}|{turn}".encode())
        return GenConfig(self.max_new_tokens, tuple(self.stop_ids), self.temperature, self.top_p, seed)


def label_of(decoder: Decoder) -> str:
    return getattr(decoder, "label", None) or decoder.name


def run_example(decoder: Decoder, example: Example, tokenizer: Any, settings: ShardSettings) -> dict[str, Any]:
    """Decode every turn of ``example``; later turns follow this method's own earlier answers."""
    device = decoder.engine.device
    messages: list[dict[str, str]] = []
    turns: list[dict[str, Any]] = []
    for turn_no, user_text in enumerate(example.turns):
        messages.append({"role": "user", "content": user_text})
        prompt_ids = encode_conversation(tokenizer, messages)
        if settings.max_context is not None and len(prompt_ids) + settings.max_new_tokens > settings.max_context:
            return _record(example, decoder, turns, skipped=(
                f"prompt of {len(prompt_ids)} tokens + {settings.max_new_tokens} new exceeds the "
                f"model context of {settings.max_context}"))
        config = settings.gen_config(example, turn_no)
        decoder.reserve(len(prompt_ids), config.max_new_tokens)  # cache growth outside the clock
        gen, seconds = timed(lambda: decoder.generate(prompt_ids, config), device)
        text = tokenizer.decode(gen.tokens, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": text})
        turns.append({
            "prompt_tokens": len(prompt_ids),
            "tokens": gen.tokens,
            "text": text,
            "wall_time": seconds,
            "accepted": gen.accepted,
            "draft_sizes": gen.draft_sizes,
            "processed": gen.processed,
            "draft_depths": gen.draft_depths,
            "accepted_drafts": gen.accepted_drafts,
            "step_times": [round(t, 7) for t in gen.step_times],
            "draft_time": sum(gen.draft_times) if gen.draft_times else None,
            "verify_time": sum(gen.verify_times) if gen.verify_times else None,
            "stopped_by": gen.stopped_by,
            "host_syncs": gen.host_syncs,
        })
    return _record(example, decoder, turns)


def _record(example: Example, decoder: Decoder, turns: list[dict[str, Any]], skipped: str | None = None) -> dict[str, Any]:
    return {
        "task": example.task,
        "example_id": example.id,
        "category": example.category,
        "method": label_of(decoder),
        "method_name": decoder.name,
        "reference": example.reference,
        "skipped": skipped,
        "turns": turns,
        "new_tokens": sum(len(t["tokens"]) for t in turns),
        "target_forwards": sum(len(t["accepted"]) for t in turns),
        "wall_time": sum(t["wall_time"] for t in turns),
    }


def median_round(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median time per new token (the lower middle for an even count).

    Ranked per token, so a round whose output differs in length (bf16 numerics under another
    draft shape) is compared fairly; the other rounds' times are kept beside it for the record.
    """
    if len(rounds) == 1:
        return rounds[0]
    ranked = sorted(rounds, key=lambda r: r["wall_time"] / max(r["new_tokens"], 1))
    kept = dict(ranked[(len(ranked) - 1) // 2])
    kept["repeats"] = {"wall_times": [r["wall_time"] for r in rounds], "new_tokens": [r["new_tokens"] for r in rounds]}
    return kept


def warm_up(decoders: Sequence[Decoder], example: Example, tokenizer: Any, settings: ShardSettings, rounds: int) -> None:
    """Uncounted generations first: allocator, kernels and caches settle before timing starts."""
    short = ShardSettings(min(settings.max_new_tokens, 16), settings.stop_ids, settings.max_context,
                          settings.temperature, settings.top_p, settings.seed)
    warm = Example(example.id, example.category, example.turns[:1], task=example.task)
    for _ in range(rounds):
        for decoder in decoders:
            run_example(decoder, warm, tokenizer, short)


def run_shard(
    examples: Sequence[Example],
    decoders: Sequence[Decoder],
    tokenizer: Any,
    settings: ShardSettings,
    emit: Callable[[dict[str, Any]], None],
    done: Collection[tuple[str, str, str]] = (),
    on_progress: Callable[[], None] | None = None,
    start: int = 0,
) -> None:
    """Run every (example, method) not in ``done``, handing each finished record to ``emit``.

    ``start`` is the position of ``examples[0]`` in the whole run, so a scheduler that hands
    out one example at a time keeps the same method rotation as one process running them all.
    """
    repeats = max(1, settings.repeats)
    for i, example in enumerate(examples, start=start):
        rounds: dict[str, list[dict[str, Any]]] = {}
        for r in range(repeats):
            shift = (i + r) % len(decoders)
            last = r == repeats - 1
            for decoder in [*decoders[shift:], *decoders[:shift]]:
                label = label_of(decoder)
                if (example.task, example.id, label) not in done:
                    rounds.setdefault(label, []).append(run_example(decoder, example, tokenizer, settings))
                    if last:  # emitted at once, so an interruption loses at most this example's unfinished methods
                        emit(median_round(rounds.pop(label)))
                if last and on_progress is not None:
                    on_progress()

