"""Self-distillation data for draft heads (Medusa, FIRP): the model's own greedy answers.

Draft heads should predict what *this* model will say, so the training text is the
model's greedy continuation of training prompts, not the dataset's human answers.
Generation is batched for speed (left padding, ``model.generate``); because batched
low-precision generation can disagree with a teacher-forced pass on a few percent of
tokens, training targets are always taken from a teacher-forced pass over the final
sequence (see ``teacher_features``), which is exactly what verification will check.

Only training files are accepted: evaluation files (XSum/GSM8K test, MT-bench) are
refused, so shipped heads can never have seen a benchmark prompt.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import gzip
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from base.errors import UserError
from methods.core.prompts import encode_conversation
from tasks.sources import read_jsonl

EVAL_FILES = ("xsum/test.jsonl", "gsm8k/test.jsonl", "mt_bench/question.jsonl", "spec_bench/question.jsonl")


def prompt_from_row(row: dict[str, Any]) -> str | None:
    """One user prompt from a row of a known training format."""
    if "passage" in row and "question" in row:  # BoolQ
        question = str(row["question"]).strip().rstrip("?") + "?"
        return f"{row['passage']}\n\nBased on the passage above, {question[0].lower() + question[1:]}"
    if "question" in row:  # GSM8K train
        return str(row["question"])
    if "prompt" in row:
        return str(row["prompt"])
    if isinstance(row.get("turns"), list) and row["turns"]:
        return str(row["turns"][0])
    return None


def file_prompts(files: Sequence[Path], *, seed: int, allow_eval: bool = False) -> list[tuple[str, str | None]]:
    """Every row's prompt with its passage (BoolQ rows; None for the others), shuffled exactly as
    training shuffles them: the held-out split replays this order to know which prompts training
    selected, and the passage, because several BoolQ questions share one."""
    rows: list[tuple[str, str | None]] = []
    for path in files:
        posix = Path(path).resolve().as_posix()
        if not allow_eval and any(posix.endswith(e) for e in EVAL_FILES):
            raise UserError(f"{path} is an evaluation file; train only on training data "
                            "(e.g. gsm8k/train.jsonl, boolq/dev.jsonl), or pass --allow-eval-data")
        if not Path(path).is_file():
            raise UserError(f"{path}: no such file")
        for lineno, row in read_jsonl(Path(path)):
            text = prompt_from_row(row)
            if text is None:
                raise UserError(f"{path}:{lineno}: no prompt field (expected question, passage+question, "
                                "prompt or turns)")
            passage = row.get("passage") if "question" in row else None
            rows.append((text, _passage_key(passage) if isinstance(passage, str) else None))
    random.Random(seed).shuffle(rows)  # mix the files so every batch and the val split see both
    return rows


def load_prompts(files: Sequence[Path], *, limit: int | None, seed: int, allow_eval: bool = False) -> list[str]:
    prompts = [text for text, _ in file_prompts(files, seed=seed, allow_eval=allow_eval)]
    return prompts[:limit] if limit else prompts


def _passage_key(passage: str) -> str:
    return " ".join(passage.split())


BUNDLE_DIR = Path(__file__).with_name("distilled")
"""Distilled answers and self-written requests committed with the project (``python -m
harness.distill bundle`` writes them from the local cache). A distillation takes hours on a
small CPU and a machine's cache does not outlive it; the bundle lets the next machine continue,
and every method trained later reads the same answers. Only model output is bundled: answers are
keyed by a digest of the encoded prompt, so no prompt from a data file is stored."""


def prompt_key(ids: Sequence[int]) -> str:
    """The key of an encoded prompt in the answer stores: a digest, not the text or the ids."""
    return hashlib.sha256(json.dumps([int(i) for i in ids]).encode()).hexdigest()[:24]


def _identity_name(identity: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return f"{identity['model']}-{digest}"


@torch.no_grad()
def generate_continuations(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                           batch_size: int, max_prompt_tokens: int, stop_ids: Sequence[int],
                           partial: Path | None = None,
                           known: dict[str, list[int]] | None = None,
                           on_batch: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """[{"ids": prompt + greedy answer, "prompt_len": n}], generated in left-padded batches.

    With ``partial``, finished batches are saved there after each batch and skipped on a
    rerun, so a long distillation can be stopped (a session's end, Ctrl-C) and resumed.
    ``known`` maps prompt keys (``prompt_key``) to answers an earlier distillation already
    generated with the same settings; those are reused, so growing ``--limit`` only pays for the
    new prompts. ``on_batch`` receives each finished batch's answers (to store them as they come).
    """
    from tqdm import tqdm

    encoded = [encode_conversation(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    encoded = [e for e in encoded if len(e) <= max_prompt_tokens]
    keys = [prompt_key(e) for e in encoded]
    reused = [{"ids": e + known[k], "prompt_len": len(e)} for e, k in zip(encoded, keys) if known and k in known]
    if reused:
        print(f"Reusing {len(reused)} answers from earlier distillations", file=sys.stderr)
        encoded = [e for e, k in zip(encoded, keys) if k not in known]  # type: ignore[operator]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths pad less
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop = set(stop_ids)
    data: list[dict[str, Any]] = []
    first = 0
    pending = hashlib.sha256(json.dumps(encoded).encode()).hexdigest()[:16]  # the batches are over these prompts
    if partial is not None and partial.is_file():
        try:
            saved = torch.load(partial)
            if saved.get("pending", pending) != pending:
                raise ValueError("the prompts left to answer changed since this partial file was written")
            data, first = saved["data"], saved["next_batch"]
            print(f"Resuming self-distillation at batch {first} ({partial})", file=sys.stderr)
        except Exception:  # noqa: BLE001 - a torn or stale partial file only costs the batches in it
            data, first = [], 0
    starts = list(enumerate(range(0, len(order), batch_size)))
    for b, start in tqdm(starts[first:], desc="self-distilling", file=sys.stderr, total=len(starts), initial=first):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             eos_token_id=sorted(stop))
        batch = []
        for row, i in enumerate(idx):
            answer = out[row, width:].tolist()
            cut = next((j + 1 for j, tok in enumerate(answer) if tok in stop), len(answer))
            if cut:
                batch.append({"ids": encoded[i] + answer[:cut], "prompt_len": len(encoded[i])})
        data.extend(batch)
        if on_batch is not None:
            on_batch(batch)
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            tmp = partial.with_suffix(".tmp")
            torch.save({"data": data, "next_batch": b + 1, "pending": pending}, tmp)
            tmp.replace(partial)
    return reused + data


# Self-written prompts: the benchmarks are chat, summaries, translation, QA and maths,
# while the training files are maths and yes/no questions. The model is asked for requests
# across these task kinds and topics (written here, not taken from any dataset).
TASK_KINDS = (
    "summarise a passage that you include in the request", "translate a few sentences you include",
    "answer a factual question", "explain a concept simply", "write a short story or poem",
    "write or improve an email", "solve a maths word problem", "write or fix a short piece of code",
    "give practical advice", "compare two options", "brainstorm a list of ideas",
    "rewrite a paragraph you include in another tone", "plan an event or a trip",
    "summarise a news article you include", "continue a conversation about a hobby",
)
TOPICS = (
    "cooking", "world history", "physics", "personal finance", "travel", "health and fitness",
    "programming", "music", "sports", "law", "biology", "climate", "literature", "small business",
    "education", "films", "gardening", "space", "psychology", "cars", "art", "economics",
    "parenting", "technology news", "languages",
)
REQUEST_TEMPLATE = ("Write one realistic message that a user might send to an AI assistant. Task: {kind}. "
                    "Topic: {topic}. Include any text the task needs. Reply with the message only.")


# Summary requests: XSum asks for a summary of a long article, and the drafts accept
# least there. Passages of the training files (BoolQ's, never an evaluation file) become
# summary requests through these instructions, written here and varied so the heads learn
# to summarise, not one wording.
SUMMARY_TEMPLATES = (
    "Summarize the following passage in one sentence.\n\n{passage}",
    "Write a one-sentence summary of this text:\n\n{passage}",
    "Give a short summary of the following article.\n\nArticle: {passage}",
    "What is the main point of this passage? Answer in a sentence or two.\n\n{passage}",
    "Read the text below and sum it up briefly.\n\nText: {passage}",
    "Summarise this for a busy reader in two sentences:\n\n{passage}",
    "Explain in a few sentences what the following passage says.\n\n{passage}",
    "TL;DR of the following, in one sentence:\n\n{passage}",
)


def _summary_draw(files: Sequence[Path], count: int, seed: int) -> tuple[list[str], random.Random]:
    """The passages ``summary_requests`` summarises, and its generator, ready for the template choices."""
    passages: dict[str, None] = {}
    for path in files:
        for _, row in read_jsonl(Path(path)):
            if isinstance(row.get("passage"), str) and row["passage"].strip():
                passages.setdefault(_passage_key(row["passage"]))
    if not passages:
        raise UserError("--summary-prompts needs a training file with passages (e.g. boolq/dev.jsonl)")
    rng = random.Random(seed + 2)
    return rng.sample(sorted(passages), min(count, len(passages))), rng


def summary_requests(files: Sequence[Path], count: int, *, seed: int) -> list[str]:
    """``count`` summary requests over distinct passages of the files' rows that have one
    (BoolQ), each with a seeded choice of ``SUMMARY_TEMPLATES``."""
    chosen, rng = _summary_draw(files, count, seed)
    return [rng.choice(SUMMARY_TEMPLATES).format(passage=p) for p in chosen]


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())[:80]


def _read_written(path: Path | None) -> dict[str, Any] | None:
    try:
        saved = json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else None
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and isinstance(saved.get("prompts"), list) else None


def self_prompts_bundle(model_name: str, *, seed: int, dtype: str, bundle_dir: Path | None = None) -> Path:
    """The bundled copy of the requests ``self_written_prompts`` writes for this model, seed and dtype
    (they do not depend on the files, the limit or the count: a longer run extends the same stream)."""
    identity = {"model": Path(model_name).name, "seed": seed, "dtype": dtype, "kind": "self-prompts"}
    return (bundle_dir or BUNDLE_DIR) / f"{_identity_name(identity)}.self-prompts.json"


@torch.no_grad()
def self_written_prompts(model: Any, tokenizer: Any, count: int, *, seed: int, cache: Path,
                         batch_size: int = 16, max_new_tokens: int = 160,
                         temperature: float = 0.9, bundle: Path | None = None,
                         identity: dict[str, Any] | None = None) -> list[str]:
    """``count`` distinct user requests written by the model itself (sampled, deduplicated),
    cached in ``cache`` and resumable batch by batch like the distillation. ``bundle`` is a
    committed copy of the same stream (``BUNDLE_DIR``): whichever of the two went further is
    continued. ``identity`` (model, seed, dtype) is saved beside the requests, for ``bundle_local_cache``."""
    from methods.core.prompts import encode_conversation, stop_token_ids

    saved: dict[str, Any] = {"prompts": [], "batches": 0}
    for found in (_read_written(bundle), _read_written(cache)):
        if found is not None and found.get("batches", 0) >= saved["batches"]:
            saved = found
    saved = {**(identity or {}), **saved}
    prompts: list[str] = saved["prompts"]
    seen = {_normalised(p) for p in prompts}
    rng = random.Random(seed)
    for _ in range(saved["batches"] * batch_size):  # replay the draws of finished batches
        rng.choice(TASK_KINDS), rng.choice(TOPICS)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop = sorted(set(stop_token_ids(tokenizer, model)))
    batches, limit = saved["batches"], 20 * (count // batch_size + 1)
    while len(prompts) < count and batches < limit:
        asks = [REQUEST_TEMPLATE.format(kind=rng.choice(TASK_KINDS), topic=rng.choice(TOPICS))
                for _ in range(batch_size)]
        encoded = [encode_conversation(tokenizer, [{"role": "user", "content": a}]) for a in asks]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(encoded):
            ids[row, width - len(e):] = torch.tensor(e)
            mask[row, width - len(e):] = 1
        torch.manual_seed(seed * 7919 + batches)
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=0.95,
                             pad_token_id=pad, eos_token_id=stop)
        for row in range(len(encoded)):
            answer = out[row, width:].tolist()
            cut = next((j for j, tok in enumerate(answer) if tok in stop), None)
            if cut is None:  # ran out of room: a truncated request is not a request
                continue
            text = tokenizer.decode(answer[:cut], skip_special_tokens=True).strip().strip('"').strip()
            key = _normalised(text)
            if len(text) >= 20 and key not in seen:
                seen.add(key)
                prompts.append(text)
        batches += 1
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({**saved, "prompts": prompts, "batches": batches}), encoding="utf-8")
        tmp.replace(cache)
    return prompts[:count]


def distill_cache_path(model_name: str, files: Sequence[Path], settings: dict[str, Any]) -> Path:
    from harness.models import cache_root

    key = json.dumps({"model": model_name, "files": [str(Path(f).resolve()) for f in files], **settings},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "distill" / f"{Path(model_name).name}-{digest}.pt"


def self_prompts_cache(model_name: str, files: Sequence[Path], settings: dict[str, Any]) -> Path:
    """Where a distillation with these settings keeps the requests the model wrote itself."""
    path = distill_cache_path(model_name, files, settings)
    return path.with_name(path.stem + ".self-prompts.json")


class AnswerCache:
    """Greedy answers by prompt key, shared by every distillation with the same generation
    settings (whatever its files, limit or self-written prompts), so a larger data set reuses
    the answers of a smaller one instead of generating them again. Reads the bundled answers
    (``BUNDLE_DIR``) beneath the local ones; writes only the local cache."""

    def __init__(self, model_name: str, settings: dict[str, Any], bundle_dir: Path | None = None) -> None:
        self.identity = {"model": Path(model_name).name, **settings}
        self.path = distill_cache_path(model_name, [], {"answers": True, **settings}).with_suffix(".answers.pt")
        self.bundle = (bundle_dir or BUNDLE_DIR) / f"{_identity_name(self.identity)}.answers.json.gz"

    def _local(self) -> dict[str, list[int]]:
        try:
            saved = torch.load(self.path) if self.path.is_file() else {}
        except Exception:  # noqa: BLE001 - a torn file only costs regeneration
            return {}
        if "answers" in saved:
            return saved["answers"]
        return {prompt_key(k): v for k, v in saved.items() if isinstance(k, tuple)}  # keyed by the ids

    def bundled(self) -> dict[str, list[int]]:
        try:
            with gzip.open(self.bundle, "rt", encoding="utf-8") as f:
                return json.load(f)["answers"]
        except (OSError, ValueError, KeyError):
            return {}

    def load(self) -> dict[str, list[int]]:
        return {**self.bundled(), **self._local()}

    def add(self, data: Sequence[dict[str, Any]]) -> None:
        known = self._local()
        new = {prompt_key(d["ids"][:d["prompt_len"]]): list(d["ids"][d["prompt_len"]:]) for d in data}
        if all(k in known for k in new):
            return
        known.update(new)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"identity": self.identity, "answers": known}, tmp)
        tmp.replace(self.path)

    def write_bundle(self) -> int:
        """Writes the bundled and local answers together into the bundle; returns how many."""
        answers = dict(sorted(self.load().items()))
        self.bundle.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.bundle.with_name(self.bundle.name + ".tmp")
        with gzip.GzipFile(tmp, "wb", mtime=0) as f:  # mtime 0: the same answers give the same bytes
            f.write(json.dumps({"identity": self.identity, "answers": answers}, separators=(",", ":")).encode())
        tmp.replace(self.bundle)
        return len(answers)


def bundle_local_cache(bundle_dir: Path | None = None) -> list[str]:
    """Copies this machine's distillation caches into the bundle: every answer store, and every
    self-written request stream that went further than its bundled copy. Returns what it wrote."""
    from harness.models import cache_root

    wrote: list[str] = []
    for path in sorted((cache_root() / "distill").glob("*.answers.pt")):
        try:
            identity = torch.load(path).get("identity")
        except Exception:  # noqa: BLE001 - an unreadable store has nothing to bundle
            identity = None
        if identity:
            settings = {k: v for k, v in identity.items() if k != "model"}
            cache = AnswerCache(identity["model"], settings, bundle_dir)
            cache.path = path
            wrote.append(f"{cache.bundle}: {cache.write_bundle()} answers")
    for path in sorted((cache_root() / "distill").glob("*.self-prompts.json")):
        saved = _read_written(path)
        if not saved or "model" not in saved:
            continue
        target = self_prompts_bundle(saved["model"], seed=saved["seed"], dtype=saved["dtype"], bundle_dir=bundle_dir)
        if (_read_written(target) or {}).get("batches", -1) < saved["batches"]:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(saved, indent=0), encoding="utf-8")
            wrote.append(f"{target}: {len(saved['prompts'])} requests, {saved['batches']} batches")
    return wrote


def self_distilled_sequences(model: Any, tokenizer: Any, model_name: str, files: Sequence[Path], *,
                             limit: int | None, seed: int, max_new_tokens: int, batch_size: int = 16,
                             max_prompt_tokens: int = 320, allow_eval: bool = False,
                             self_prompts: int = 0, summary_prompts: int = 0) -> list[dict[str, Any]]:
    """Cached list of {"ids", "prompt_len"}; the cache key covers the files and every setting.

    ``self_prompts`` > 0 adds that many requests the model writes itself (``self_written_prompts``)
    to the file prompts, so the heads also see chat, summaries, translation and code;
    ``summary_prompts`` > 0 adds that many summary requests over the files' passages
    (``summary_requests``)."""
    from methods.core.prompts import stop_token_ids

    settings = {"limit": limit, "seed": seed, "max_new_tokens": max_new_tokens,
                "max_prompt_tokens": max_prompt_tokens, "dtype": str(model.dtype)}
    if self_prompts:
        settings["self_prompts"] = self_prompts
    written_cache = self_prompts_cache(model_name, files, settings)  # self-written prompts don't depend on summaries
    if summary_prompts:
        settings["summary_prompts"] = summary_prompts
    path = distill_cache_path(model_name, files, settings)
    answers = AnswerCache(model_name, {k: settings[k] for k in ("max_new_tokens", "max_prompt_tokens", "dtype")})
    if path.is_file():
        print(f"Using cached self-distilled data {path}", file=sys.stderr)
        data = torch.load(path)
        answers.add(data)
        return data
    prompts = load_prompts(files, limit=limit, seed=seed, allow_eval=allow_eval)
    if self_prompts:
        identity = {"model": Path(model_name).name, "seed": seed, "dtype": str(model.dtype)}
        written = self_written_prompts(model, tokenizer, self_prompts, seed=seed, cache=written_cache,
                                       bundle=self_prompts_bundle(model_name, seed=seed, dtype=str(model.dtype)),
                                       identity=identity)
        print(f"{len(written)} self-written prompts added to {len(prompts)} from the files", file=sys.stderr)
        prompts = prompts + written
    if summary_prompts:
        summaries = summary_requests(files, summary_prompts, seed=seed)
        print(f"{len(summaries)} summary requests added", file=sys.stderr)
        prompts = prompts + summaries
    if self_prompts or summary_prompts:
        random.Random(seed + 1).shuffle(prompts)
    partial = path.with_suffix(".partial.pt")
    data = generate_continuations(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, max_prompt_tokens=max_prompt_tokens,
                                  stop_ids=stop_token_ids(tokenizer, model), partial=partial,
                                  known=answers.load(), on_batch=answers.add)
    answers.add(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(path)
    partial.unlink(missing_ok=True)
    return data


def held_out_prompts(files: Sequence[Path], stages: Sequence[dict[str, Any]],
                     max_prompt_tokens: int = 320) -> tuple[list[str], dict[str, Any]]:
    """Prompts of ``files`` that no training stage saw, in the first stage's shuffled order, and
    a record of where they come from.

    Each stage (``methods.core.training.training_stages``) is replayed to find the exact prompts
    it selected: the first ``limit`` of its files' shuffle, the passages of its summary requests
    and, where the distillation cache still holds them, the requests the model wrote itself. A
    candidate is dropped when its text equals a training prompt (rows can repeat) or when it
    shares a BoolQ passage with one (BoolQ asks several questions about one passage), so the
    split does not rest on the shuffle's positions alone.
    """
    trained: set[str] = set()
    passages: set[str] = set()
    written_checked: list[bool] = []
    for stage in stages:
        rows = file_prompts(stage["files"], seed=stage["seed"], allow_eval=stage.get("allow_eval", False))
        chosen = rows[:stage["limit"]] if stage["limit"] else rows
        trained.update(text for text, _ in chosen)
        passages.update(passage for _, passage in chosen if passage)
        if stage.get("summary_prompts"):
            passages.update(_summary_draw(stage["files"], stage["summary_prompts"], stage["seed"])[0])
        if stage.get("self_prompts"):
            settings = {"limit": stage["limit"], "seed": stage["seed"], "max_new_tokens": stage["max_new_tokens"],
                        "max_prompt_tokens": max_prompt_tokens, "dtype": f"torch.{stage['dtype']}",
                        "self_prompts": stage["self_prompts"]}
            cache = self_prompts_cache(stage["model"], stage["recorded_files"], settings)
            bundled = self_prompts_bundle(stage["model"], seed=stage["seed"], dtype=f"torch.{stage['dtype']}")
            found = [s for s in (_read_written(cache), _read_written(bundled))
                     if s is not None and len(s["prompts"]) >= stage["self_prompts"]]
            if found:  # the stream's first ``self_prompts`` requests are the ones that stage trained on
                trained.update(found[0]["prompts"][:stage["self_prompts"]])
            written_checked.append(bool(found))
    pool = file_prompts(files, seed=stages[0]["seed"])
    held: list[str] = []
    ranks: list[int] = []
    same_text = same_passage = 0
    for rank, (text, passage) in enumerate(pool):
        if text in trained:
            same_text += 1
        elif passage is not None and passage in passages:
            same_passage += 1
        else:
            held.append(text)
            ranks.append(rank)
    record = {"files": [str(f) for f in files], "shuffle_seed": stages[0]["seed"], "file_prompts": len(pool),
              "training_stages": len(stages),
              "left_out_as_training_prompts": same_text, "left_out_sharing_a_training_passage": same_passage,
              "self_written_prompts": sum(s.get("self_prompts") or 0 for s in stages),
              "self_written_checked": all(written_checked) if written_checked else None,
              "candidates": len(held), "ranks": ranks}
    return held, record


def prompt_sequences(model: Any, tokenizer: Any, model_name: str, prompts: Sequence[str], *, count: int,
                     max_new_tokens: int, max_prompt_tokens: int = 320,
                     batch_size: int = 16) -> list[dict[str, Any]]:
    """The model's greedy answers to the first ``count`` of ``prompts`` that fit ``max_prompt_tokens``
    (as training distils them), in prompt order, each with ``index``: its position in ``prompts``.
    Answers the answer cache already holds are reused."""
    from methods.core.prompts import stop_token_ids

    picked: list[tuple[int, str, tuple[int, ...]]] = []
    for i, text in enumerate(prompts):
        if len(picked) == count:
            break
        ids = encode_conversation(tokenizer, [{"role": "user", "content": text}])
        if len(ids) <= max_prompt_tokens:
            picked.append((i, text, tuple(ids)))
    answers = AnswerCache(model_name, {"max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens,
                                       "dtype": str(model.dtype)})
    data = generate_continuations(model, tokenizer, [text for _, text, _ in picked], max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, max_prompt_tokens=max_prompt_tokens,
                                  stop_ids=stop_token_ids(tokenizer, model), known=answers.load(),
                                  on_batch=answers.add)
    answers.add(data)
    by_prompt = {tuple(d["ids"][:d["prompt_len"]]): d for d in data}
    return [{**by_prompt[ids], "index": i} for i, _, ids in picked if ids in by_prompt]


if __name__ == "__main__":
    if sys.argv[1:] != ["bundle"]:
        print(f"error: unknown arguments {' '.join(sys.argv[1:]) or '(none)'}; run `python -m harness.distill bundle` "
              f"to copy this machine's distillation cache into {BUNDLE_DIR}", file=sys.stderr)
        sys.exit(2)
    for line in bundle_local_cache() or ["nothing to bundle: the local cache holds no distillation"]:
        print(line)
