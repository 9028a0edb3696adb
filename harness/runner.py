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

``run_load`` is the unit of work under load (``--concurrency``): for each level, each method
serves every example of the shard as one request (its first turn) in continuous batches
(``methods.core.batch.serve``), the methods alternating batch by batch, and each request's
record says what it generated and when.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import zlib

import numpy as np

from methods.core.batch import LoadRun, Request, Served, serve
from methods.core.decoder import Decoder, GenConfig, Generation
from methods.core.fitting import guard_delta
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


def generation_turn(gen: Generation, prompt_len: int, text: str, wall_time: float,
                    host_syncs: int | None) -> dict[str, Any]:
    """A turn's record from its generation: the per-step lists and times every metric reads, the same
    for a request decoded alone and one served under load."""
    return {
        "prompt_tokens": prompt_len,
        "tokens": gen.tokens,
        "text": text,
        "wall_time": wall_time,
        "accepted": gen.accepted,
        "draft_sizes": gen.draft_sizes,
        "processed": gen.processed,
        "draft_depths": gen.draft_depths,
        "accepted_drafts": gen.accepted_drafts,
        "step_times": [round(t, 7) for t in gen.step_times],
        "draft_time": sum(gen.draft_times) if gen.draft_times else None,
        "verify_time": sum(gen.verify_times) if gen.verify_times else None,
        "stopped_by": gen.stopped_by,
        "host_syncs": host_syncs,
    }


def run_example(decoder: Decoder, example: Example, tokenizer: Any, settings: ShardSettings) -> dict[str, Any]:
    """Decode every turn of ``example``; later turns follow this method's own earlier answers."""
    device = decoder.engine.device
    messages: list[dict[str, str]] = []
    turns: list[dict[str, Any]] = []
    guard_before = decoder.guard_counts()
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
        turns.append(generation_turn(gen, len(prompt_ids), text, seconds, gen.host_syncs))
    return {**_record(example, decoder, turns), **guarded(guard_delta(guard_before, decoder.guard_counts()))}


def guarded(counts: dict[str, int] | None) -> dict[str, Any]:
    """A record's ``guard`` field: the rate guard's plain and drafted steps in its generations
    (the manifest sums them per method); nothing for a method without a guard."""
    return {"guard": counts} if counts is not None else {}


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



LOAD_WARMUP_TOKENS = 8  # a warm-up serve's answers: enough for every step shape to run once


def poisson_arrivals(count: int, rate: float | None, seed: int, level: int) -> list[float | None]:
    """Seconds after the start at which ``count`` requests arrive: None for a closed loop (``rate``
    None: a request arrives when a slot takes it); otherwise a Poisson stream of ``rate`` per
    second, its first request at 0.

    Seeded from the run seed and the level, so every method at a level serves the same
    arrivals (equal work), and a rerun serves them again.
    """
    if rate is None or count == 0:
        return [None] * count
    gaps = np.random.default_rng([seed, level]).exponential(1.0 / rate, size=count)
    return [0.0, *np.cumsum(gaps[:-1]).tolist()]


def load_summary(run: LoadRun, request_rate: float | None) -> dict[str, Any]:
    """What one (method, level) batch did as a whole, carried by each of its records: the report
    reads a level's throughput and per-step figures from it, not from the records' sums, since
    the requests overlap in time. Step figures count batched passes only (prefills are apart)."""
    steps = len(run.batch_sizes)
    described = run.decoder.describe() if run.decoder is not None else {}
    return {
        "wall_time": run.wall_time,
        "output_tokens": run.output_tokens,
        "throughput": run.throughput,
        "requests": len(run.served),
        "request_rate": request_rate,
        "steps": steps,
        "mean_batch": sum(run.batch_sizes) / steps if steps else 0.0,
        "processed_per_step": sum(run.step_tokens) / steps if steps else 0.0,
        "accepted_per_step": sum(run.step_accepted) / steps if steps else 0.0,
        "memory": dict(run.memory),
        "choice": {k: described[k] for k in ("draft_size", "fitted", "tree") if k in described},
        **guarded(run.guard),
    }


def load_turn(prompt_len: int, served: Served, text: str) -> dict[str, Any]:
    """A request's turn: ``run_example``'s fields, plus its times under load.

    ``wall_time`` is the request's latency: from its arrival (in a closed loop, when a slot took
    it; in an open loop, the wait for a slot included) to its last token. Step times are the
    batched passes the request was part of (each shared with the batch), after its own prefill.
    """
    gen: Generation = served.generation
    return {
        **generation_turn(gen, prompt_len, text, served.latency, None),  # host syncs: not counted in the batched loop
        "ttft": served.time_to_first_token,
        "tpot": served.time_per_output_token,
        "arrival": served.arrival,
        "admitted": served.admitted,
        "first_token": served.first_token,
        "finished": served.finished,
    }


def run_load(
    examples: Sequence[Example],
    decoders: Sequence[Decoder],
    tokenizer: Any,
    settings: ShardSettings,
    levels: Sequence[int],
    request_rate: float | None,
    emit: Callable[[dict[str, Any]], None],
    done: Collection[tuple[str, ...]] = (),
    on_progress: Callable[[], None] | None = None,
    warmup: int = 1,
) -> None:
    """Serve ``examples`` at each concurrency level through every method, emitting one record per
    (example, method, level) not in ``done``.

    Each example is one request: its first turn (a later turn follows the method's own
    answer, which under load would make the requests differ between methods; mt_bench's
    second turn is not sent). Every method at a level serves the same requests with the same
    arrivals (``poisson_arrivals``), so its throughput over vanilla's is a speedup on equal
    work. Each decoder is fitted to the level once (``Decoder.under_load``) and warmed up
    uncounted on a short serve first (``_fit_level``).

    In a closed loop the requests are cut into chunks of one batch (``level`` requests) and
    the methods take turns chunk by chunk, the order rotating with the level and the chunk,
    as ``run_shard`` interleaves them example by example: a machine whose speed drifts over
    seconds then shifts every method alike, and ``harness.metrics.load_frame`` pairs each
    chunk with vanilla's. Each slot's decoder goes on from chunk to chunk
    (``serve(slots_from=...)``). A record carries its chunk's summary (``load``). An open
    loop's arrivals span the whole stream, so there each method serves it as one batch.

    Resume: a (method, level) whose records are all done is skipped; otherwise all its chunks
    are served again (the load must be the one measured) and only the records not yet done
    are emitted. Prompts that cannot fit ``settings.max_context`` are skipped, as
    ``run_example`` skips them, and recorded as skipped.
    """
    prompts = [encode_conversation(tokenizer, [{"role": "user", "content": e.turns[0]}]) for e in examples]
    too_long = [settings.max_context is not None and len(p) + settings.max_new_tokens > settings.max_context
                for p in prompts]
    served_examples = [i for i, skip in enumerate(too_long) if not skip]
    for li, level in enumerate(levels):
        arrivals = poisson_arrivals(len(served_examples), request_rate, settings.seed, level)
        requests = [Request(prompts[i], settings.gen_config(examples[i], 0), arrival)
                    for i, arrival in zip(served_examples, arrivals)]
        shift = li % len(decoders)
        pending = [d for d in [*decoders[shift:], *decoders[:shift]]
                   if any((e.task, e.id, label_of(d), level) not in done for e in examples)]
        fitted = {label_of(d): _fit_level(d, requests, settings, level, warmup) for d in pending}
        size = max(1, len(requests) if request_rate is not None else level)
        chunks = [list(range(i, i + size)) for i in range(0, len(requests), size)]
        runs: dict[str, list[LoadRun]] = {label: [] for label in fitted}
        for c, chunk in enumerate(chunks):
            turn = c % max(1, len(pending))
            for decoder in [*pending[turn:], *pending[:turn]]:
                label = label_of(decoder)
                before = runs[label][-1] if runs[label] else None
                runs[label].append(serve(fitted[label], [requests[k] for k in chunk], level, adapt=False,
                                         slots_from=before))
        for decoder in pending:
            label = label_of(decoder)
            records = _level_records(decoder, examples, prompts, too_long, served_examples, chunks, runs[label],
                                     tokenizer, settings, level, request_rate)
            for i, e in enumerate(examples):
                if (e.task, e.id, label, level) not in done:
                    emit(records[i])
        if on_progress is not None:
            for _ in decoders:
                for _ in examples:
                    on_progress()


def _fit_level(decoder: Decoder, requests: Sequence[Request], settings: ShardSettings, level: int,
               warmup: int) -> Decoder:
    """The decoder fitted to ``level`` sequences, warmed up uncounted on a short serve."""
    fitted = decoder.under_load(level)
    if requests:
        warm = [Request(r.prompt_ids, GenConfig(min(settings.max_new_tokens, LOAD_WARMUP_TOKENS), r.config.stop_ids,
                                                r.config.temperature, r.config.top_p, r.config.seed))
                for r in requests[:level]]
        for _ in range(warmup):
            serve(fitted, warm, level, adapt=False)
    return fitted


def _level_records(decoder: Decoder, examples: Sequence[Example], prompts: Sequence[Sequence[int]],
                   too_long: Sequence[bool], served_examples: Sequence[int], chunks: Sequence[Sequence[int]],
                   runs: Sequence[LoadRun], tokenizer: Any, settings: ShardSettings, level: int,
                   request_rate: float | None) -> list[dict[str, Any]]:
    """One (method, level): every example's record, in example order, each with its chunk's summary
    (``chunk``: the task and id of the chunk's first request, the key pairing it with vanilla's)."""
    place: dict[int, tuple[Served, dict[str, Any]]] = {}
    for chunk, run in zip(chunks, runs):
        first = examples[served_examples[chunk[0]]]
        summary = {**load_summary(run, request_rate), "chunk": f"{first.task}:{first.id}"}
        for k, one in zip(chunk, run.served):
            place[served_examples[k]] = (one, summary)
    records = []
    for i, (example, prompt, skip) in enumerate(zip(examples, prompts, too_long)):
        if skip:
            record = _record(example, decoder, [], skipped=(
                f"prompt of {len(prompt)} tokens + {settings.max_new_tokens} new exceeds the "
                f"model context of {settings.max_context}"))
        else:
            one, summary = place[i]
            text = tokenizer.decode(one.generation.tokens, skip_special_tokens=True)
            record = _record(example, decoder, [load_turn(len(prompt), one, text)])
            record["load"] = summary
        record["concurrency"] = level
        records.append(record)
    return records
