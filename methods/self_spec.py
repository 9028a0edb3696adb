"""Self-speculative decoding / Draft & Verify (Zhang et al., ACL 2024).

The draft model is the target model itself with a set of attention and MLP sublayers
skipped; verification runs the full model over the drafts in one pass, so the output is
exactly greedy decoding's. Drafting stops early when the draft's top-1 probability falls
below a threshold, and the threshold adapts to the running acceptance rate as in the
paper: too many rejections raise it (shorter, safer drafts), high acceptance lowers it.

Draft tokens are written to the cache while drafting (non-skipped layers need each
other's keys), then rolled back; the verification pass rewrites every layer's entries,
so skipped layers' keys are right for every verified token.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from harness.errors import UserError
from methods.base import Decoder, Generation, register_method, truncate_at_stop
from methods.chain import verify_chain
from methods.engine import Engine

WEIGHTS_DIR = Path(__file__).parent / "weights"
TUNE_HINT = ("python -m harness tune self_spec --model {model} --data ../shared/data/gsm8k/train.jsonl "
             "../shared/data/boolq/dev.jsonl --out skip.json")


def shipped_skip_set(model_name: str) -> Path | None:
    path = WEIGHTS_DIR / f"self_spec-{model_name}.json"
    return path if path.is_file() else None


def load_skip_set(value: Any) -> dict[str, list[int]]:
    """``{"attention": [...], "mlp": [...]}`` from a dict, a JSON string or a JSON file."""
    if isinstance(value, dict):
        data = value
    else:
        text = str(value)
        try:
            data = json.loads(Path(text).read_text() if Path(text).is_file() else text)
        except (json.JSONDecodeError, OSError):
            raise UserError(f"bad self_spec skip set {value!r}: give a JSON file or "
                            '{"attention": [layers], "mlp": [layers]}') from None
    return {"attention": sorted(int(x) for x in data.get("attention", [])),
            "mlp": sorted(int(x) for x in data.get("mlp", []))}


@register_method("self_spec")
class SelfSpeculativeDecoder(Decoder):
    """Draft & Verify: the model with skipped sublayers drafts, the full model verifies."""

    def __init__(self, engine: Engine, skip: Any = None, max_draft: int | str = 8, threshold: float | str = 0.6,
                 adaptive: bool | str = True, target_acceptance: float | str = 0.8, model_name: str = "",
                 **options: Any) -> None:
        source = skip if skip is not None else shipped_skip_set(model_name)
        if source is None:
            raise UserError(f"no self_spec skip set for model {model_name!r}; search one with: "
                            + TUNE_HINT.format(model=model_name) + " and pass --method-option self_spec.skip=FILE")
        self.skip = load_skip_set(source)
        self.max_draft = int(max_draft)
        self.initial_threshold = float(threshold)
        self.adaptive = str(adaptive).lower() not in ("0", "false", "no")
        self.target_acceptance = float(target_acceptance)
        self._skip_attn = frozenset(self.skip["attention"])
        self._skip_mlp = frozenset(self.skip["mlp"])
        super().__init__(engine, model_name=model_name, skip=self.skip, max_draft=self.max_draft,
                         threshold=self.initial_threshold, adaptive=self.adaptive,
                         target_acceptance=self.target_acceptance, **options)

    @classmethod
    def check_ready(cls, model_name: str, options: dict[str, Any]) -> None:
        if options.get("skip") is None and shipped_skip_set(model_name) is None:
            raise UserError(f"no self_spec skip set for model {model_name!r}; search one with: "
                            + TUNE_HINT.format(model=model_name) + " and pass --method-option self_spec.skip=FILE")

    def _draft(self, root: int, room: int, threshold: float) -> list[int]:
        engine = self.engine
        drafts: list[int] = []
        token, forwards = root, 0
        for _ in range(min(self.max_draft, room)):
            out = engine.forward([token], skip_attention=self._skip_attn, skip_mlp=self._skip_mlp, commit=True)
            forwards += 1
            p, d = torch.softmax(out.logits[-1], dim=-1).max(dim=-1)
            if float(p) < threshold:
                break
            token = int(d)
            drafts.append(token)
        engine.cache.rollback(forwards)  # the verification pass rewrites these positions in every layer
        return drafts

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, stop: Collection[int] = ()) -> Generation:
        engine = self.engine
        engine.reset(capacity=len(prompt_ids) + max_new_tokens + self.max_draft + 2)
        stop = frozenset(stop)
        out = engine.forward(prompt_ids, logits_rows=slice(-1, None), commit=True)
        root = int(out.logits[-1].argmax())
        gen = Generation(tokens=[root], accepted=[1], draft_sizes=[0], draft_times=[0.0], verify_times=[0.0])
        threshold, rate = self.initial_threshold, self.target_acceptance
        done = root in stop
        while not done and len(gen.tokens) < max_new_tokens:
            t0 = self._now()
            start = engine.cache.length
            drafts = self._draft(root, max_new_tokens - len(gen.tokens) - 1, threshold)
            assert engine.cache.length == start
            t1 = self._now()
            new, _ = verify_chain(engine, root, drafts)
            t2 = self._now()
            if self.adaptive:
                if drafts:
                    rate = 0.9 * rate + 0.1 * ((len(new) - 1) / len(drafts))
                    raise_it = rate < self.target_acceptance
                else:  # nothing passed the threshold: no evidence of bad drafts, so probe lower
                    raise_it = False
                threshold = min(0.99, threshold + 0.05) if raise_it else max(0.05, threshold - 0.05)
            new, done = truncate_at_stop(new, stop, max_new_tokens - len(gen.tokens))
            gen.add_step(new, len(drafts), t1 - t0, t2 - t1)
            root = new[-1]
        gen.stopped_by = "eos" if done else "length"
        return gen
