"""Self-speculative decoding / Draft & Verify (Zhang et al., ACL 2024).

The draft model is the target model itself with a set of attention and MLP sublayers
skipped; verification runs the full model over the drafts in one pass, so the output is
exactly greedy decoding's. Drafting stops early when the draft's top-1 probability falls
below a threshold, and the threshold adapts to the running acceptance rate: too many
rejections raise it (shorter, safer drafts), high acceptance lowers it. Two rules do this:

* ``rule=paper``: Draft & Verify's, as upstream's ``exact_self_speculative_generate`` runs it
  (``paper_update``): the token under the threshold is kept and ends the draft, so every step
  drafts at least one token; the acceptance is smoothed (beta1 0.5) against alpha 0.9, the
  threshold stepped by epsilon 0.01 and the step smoothed (beta2 0.9), from 0.8, carried from
  one prompt to the next; it drafts every step (``policy=always``) as the published method does.
* ``rule=ours`` (the default): the token under the threshold is dropped (a step may draft
  nothing), +-0.05 unsmoothed steps clamped to [0.05, 0.99] toward an acceptance of 0.8, from
  0.6 for every prompt (``ours_update``), under the cost policy below.

On a small model the skipped-layer draft costs a large share of a full step, so drafting
can cost more than it saves. With ``policy=cost`` (ours's default) the decoder keeps a running
efficiency, tokens gained per step over the step's cost in vanilla steps (draft forwards x
their measured relative cost + the verify pass's measured cost, ``methods.core.cost``),
and when it falls below 1 it takes plain steps for a while (doubling the pause, up to 256
steps, each time drafting fails again, resetting it when a probe pays; the state carries
across prompts), so self_spec never runs much slower than vanilla. Within a step the same
costs bound the draft's length: another draft forward runs only while the chain's confidence
(the product of its top-1 probabilities, an upper bound on the next token's acceptance) covers
that forward plus the extra verified token. Plain steps leave the adaptive threshold alone, so
the probe after a long pause drafts as cautiously as the last draft did.

Draft tokens are written to the cache while drafting (non-skipped layers need each
other's keys), then rolled back; the verification pass rewrites every layer's entries,
so skipped layers' keys are right for every verified token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from methods.core.decoder import Decoder, Draft
from methods.core.engine import ForwardOutput
from methods.core.errors import UserError
from methods.core.options import option
from methods.core.tree import chain_layout
from methods.core.weights import WeightsLocator
from methods.core.verify import Acceptance

WEIGHTS_DIR = Path(__file__).parent / "weights"
TUNE_HINT = ("python -m harness tune self_spec --model {model} --data ../shared/data/gsm8k/train.jsonl "
             "../shared/data/boolq/dev.jsonl --out skip.json")


def load_skip_set(value: Any) -> dict[str, list[int]]:
    """``{"attention": [...], "mlp": [...]}`` from a dict, a JSON string or a JSON file."""
    shape = '{"attention": [layers], "mlp": [layers]}'
    if isinstance(value, dict):
        data = value
    else:
        text = str(value)
        try:
            data = json.loads(Path(text).read_text(encoding="utf-8") if Path(text).is_file() else text)
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            raise UserError(f"bad self_spec skip set {value!r}: give a JSON file or {shape}") from None
    try:
        if not isinstance(data, dict):
            raise TypeError
        return {"attention": sorted(int(x) for x in data.get("attention", [])),
                "mlp": sorted(int(x) for x in data.get("mlp", []))}
    except (TypeError, ValueError):
        raise UserError(f"bad self_spec skip set {value!r}: expected {shape} with integer layer indices") from None


# Each rule's defaults for the options left unset: ours as this harness has always run it; the
# paper's as upstream's ``exact_self_speculative_generate`` (``th_stop_draft=0.8``,
# ``auto_parameters=[1, 0.5, 0.9, 1e-2, 0.9]``), drafting every step as the published method does.
RULE_DEFAULTS: dict[str, dict[str, Any]] = {
    "ours": {"threshold": 0.6, "target_acceptance": 0.8, "epsilon": 0.05, "beta1": 0.9, "beta2": 0.0,
             "policy": "cost"},
    "paper": {"threshold": 0.8, "target_acceptance": 0.9, "epsilon": 0.01, "beta1": 0.5, "beta2": 0.9,
              "policy": "always"},
}


@dataclass(frozen=True)
class SelfSpecOptions:
    skip: str | None = option(None, help='skip set: a JSON file or {"attention": [...], "mlp": [...]} (default: shipped)')
    max_draft: int = option(8, min=1, max=64, help="most draft tokens per step")
    threshold: float | None = option(None, min=0.0, max=1.0,
                                     help="initial confidence needed to keep drafting (default: ours 0.6, paper 0.8)")
    adaptive: bool = option(True, help="adapt the threshold to the running acceptance rate")
    target_acceptance: float | None = option(None, min=0.0, max=1.0,
                                             help="acceptance rate the adaptation aims for, the paper's alpha "
                                                  "(default: ours 0.8, paper 0.9)")
    policy: str | None = option(None, choices=("cost", "always"),
                                help="cost: pause drafting while it costs more than it saves; always: draft every "
                                     "step (default: ours cost, paper always)")
    rule: str = option("ours", choices=("ours", "paper"),
                       help="draft exit and threshold update: ours (the below-threshold token dropped, +-epsilon "
                            "per step, reset per prompt) or paper (Draft & Verify's: the token kept and ending the "
                            "draft, smoothed steps, the threshold carried across prompts)")
    epsilon: float | None = option(None, min=0.0, max=1.0,
                                   help="threshold step per verify step (default: ours 0.05, paper 0.01)")
    beta1: float | None = option(None, min=0.0, max=1.0,
                                 help="smoothing of the acceptance rate, weight of the old value "
                                      "(default: ours 0.9, paper 0.5)")
    beta2: float | None = option(None, min=0.0, max=1.0,
                                 help="smoothing of the threshold step, weight of the old threshold "
                                      "(default: ours 0 = unsmoothed, paper 0.9)")

    def __post_init__(self) -> None:
        # options left unset take their rule's value, so the manifest records what ran
        for key, value in RULE_DEFAULTS.get(self.rule, RULE_DEFAULTS["ours"]).items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)

    def validate(self) -> None:
        if self.skip is not None:
            load_skip_set(self.skip)


def paper_update(threshold: float, matchness: float, accepted: int, drafted: int, max_draft: int, *,
                 alpha: float, epsilon: float, beta1: float, beta2: float) -> tuple[float, float]:
    """Draft & Verify's threshold update after one verify step: ``(threshold, matchness)``.

    The acceptance of this step's drafts is smoothed into ``matchness`` (weight ``beta1`` on the
    old value); below ``alpha`` the threshold is to rise by ``epsilon`` (shorter drafts), at or
    above it to fall by ``epsilon``, except after a draft that reached ``max_draft``, whose length
    the threshold did not limit. The threshold then moves only ``1 - beta2`` of the way there, so
    one bad step does not swing it. No clamp: upstream has none.
    """
    matchness = beta1 * matchness + (1 - beta1) * (accepted / drafted)
    if matchness < alpha:
        target = threshold + epsilon
    elif drafted == max_draft:
        target = threshold
    else:
        target = threshold - epsilon
    return beta2 * threshold + (1 - beta2) * target, matchness


def ours_update(threshold: float, rate: float, accepted: int, drafted: int, *, target: float, epsilon: float,
                beta1: float, beta2: float) -> tuple[float, float]:
    """This harness's own update: ``(threshold, rate)``.

    Steps ``epsilon`` (unsmoothed at ``beta2=0``), clamped to [0.05, 0.99] so a long run of good
    or bad steps cannot pin drafting on or off; a step that drafted nothing (every token was under
    the threshold, which this rule drops) is no evidence of bad drafts, so the threshold falls.
    """
    if drafted:
        rate = beta1 * rate + (1 - beta1) * (accepted / drafted)
        raise_it = rate < target
    else:
        raise_it = False
    moved = min(0.99, threshold + epsilon) if raise_it else max(0.05, threshold - epsilon)
    return beta2 * threshold + (1 - beta2) * moved, rate


class SelfSpeculativeDecoder(Decoder):
    """Draft & Verify: the model with skipped sublayers drafts, the full model verifies."""

    Options = SelfSpecOptions
    weights = WeightsLocator("self_spec", "skip", "self_spec skip set", WEIGHTS_DIR, TUNE_HINT, suffix=".json",
                             placeholder="FILE")

    def setup(self) -> None:
        opts = self.options
        self.skip = load_skip_set(self.weights.locate(self.model_name, opts))
        n = self.engine.num_layers
        bad = [i for i in self.skip["attention"] + self.skip["mlp"] if not 0 <= i < n]
        if bad:
            raise UserError(f"self_spec skip set names layer {bad[0]}, but the model has layers 0..{n - 1}")
        self._skip_attn = frozenset(self.skip["attention"])
        self._skip_mlp = frozenset(self.skip["mlp"])
        self.draft_cost, self.verify_cost = 0.0, None
        # the cost policy's state lives across prompts: what drafting earns on this model and
        # machine is learnt once, not re-probed (at a few wasted draft forwards each) per prompt
        self.efficiency, self.pause, self.backoff, self.forwards = 1.0, 0, 4, 0
        # the paper's threshold carries across prompts (upstream hands ``th_stop_draft`` from one
        # call to the next); ours restarts it per prompt in ``begin``
        self.threshold, self.rate = float(opts.threshold), float(opts.target_acceptance)
        if opts.policy == "cost":
            from methods.core.cost import cost_curve, relative_step_cost
            from methods.core.files import cache_root

            self.draft_cost = relative_step_cost(self.engine, f"self_spec.draft_step(skip {self.skip_id()})",
                                                 skip_attention=self._skip_attn,
                                                 skip_mlp=self._skip_mlp)
            self.verify_cost = cost_curve(self.engine, self.model_name, cache_root())

    def skip_id(self) -> str:
        """A short, stable name of the skip set (its draft step's cost depends on nothing else)."""
        import zlib

        return f"{zlib.crc32(json.dumps(self.skip, sort_keys=True).encode()):08x}"

    def describe(self) -> dict[str, Any]:
        extra = {"draft_step_cost": round(self.draft_cost, 4)} if self.options.policy == "cost" else {}
        return {**super().describe(), "skip": self.skip, **extra}

    def drafter(self) -> str:
        skipped = sum(len(v) for v in self.skip.values())
        return f"the target itself, skipping {skipped} of its {2 * self.engine.num_layers} sublayers"

    def step_capacity(self) -> int:
        return self.options.max_draft + 1

    def begin(self, prompt_ids: Sequence[int], out: ForwardOutput) -> None:
        if self.options.rule == "paper":
            self.rate = 0.0  # upstream's ``tmp_matchness`` starts at 0 in every call
        else:
            self.threshold, self.rate = self.options.threshold, self.options.target_acceptance

    def _worth_another(self, confidence: float, drafted: int) -> bool:
        """Under the cost policy, one more draft forward must be able to pay for itself.

        The next token is accepted at most as often as the whole chain so far (``confidence``,
        the product of the draft's top-1 probabilities); it costs a draft forward plus what one
        more token adds to the verification pass. Without this bound a confident draft runs to
        ``max_draft`` even where, as in float32 on a CPU, each verified token is dear.
        """
        if self.verify_cost is None:
            return True
        marginal = self.draft_cost + self.verify_cost(drafted + 2) - self.verify_cost(drafted + 1)
        return confidence >= marginal

    def _draft(self, root: int, room: int) -> list[int]:
        engine = self.engine
        drafts: list[int] = []
        token, forwards, confidence = root, 0, 1.0
        keep_below = self.options.rule == "paper"
        for _ in range(min(self.options.max_draft, room)):
            if drafts and not self._worth_another(confidence, len(drafts)):
                break
            out = engine.forward([token], skip_attention=self._skip_attn, skip_mlp=self._skip_mlp, commit=True)
            forwards += 1
            p, d = torch.softmax(out.logits[-1], dim=-1).max(dim=-1)
            below = float(p) < self.threshold
            if below and not keep_below:
                break
            confidence *= float(p)
            token = int(d)
            drafts.append(token)
            if below:  # the paper's rule: the unsure token is verified too, and ends the draft
                break
        engine.cache.rollback(forwards)  # the verification pass rewrites these positions in every layer
        self.forwards = forwards
        return drafts

    def draft(self, root: int, root_t: torch.Tensor, room: int) -> Draft:
        if self.pause > 0:  # drafting has not been paying: a plain step
            self.pause -= 1
            self.forwards = 0
            return Draft(root_t, chain_layout(0, self.engine))
        drafts = self._draft(root, room)
        tokens = torch.cat([root_t, torch.tensor(drafts, dtype=torch.long, device=root_t.device)]) if drafts else root_t
        return Draft(tokens, chain_layout(len(drafts), self.engine))

    def update(self, draft: Draft, out: ForwardOutput, acc: Acceptance) -> None:
        if self.verify_cost is not None and self.forwards:
            self._account(draft.layout.n, acc.accepted_drafts + 1)
        if not self.options.adaptive or not self.forwards:
            return  # a plain step (paused, or no room) says nothing about the threshold
        o, drafted = self.options, draft.layout.draft_size
        if o.rule == "paper":
            if drafted:  # the paper's rule always drafts at least one token where there is room
                self.threshold, self.rate = paper_update(self.threshold, self.rate, acc.accepted_drafts, drafted,
                                                         o.max_draft, alpha=o.target_acceptance, epsilon=o.epsilon,
                                                         beta1=o.beta1, beta2=o.beta2)
        else:
            self.threshold, self.rate = ours_update(self.threshold, self.rate, acc.accepted_drafts, drafted,
                                                    target=o.target_acceptance, epsilon=o.epsilon, beta1=o.beta1,
                                                    beta2=o.beta2)

    def _account(self, verified: int, gained: int) -> None:
        """Running tokens-per-cost of drafting steps; below 1 (vanilla's), pause drafting."""
        cost = self.forwards * self.draft_cost + self.verify_cost(verified)
        self.efficiency = 0.7 * self.efficiency + 0.3 * gained / cost
        if self.efficiency < 1.0:
            self.pause, self.backoff = self.backoff, min(2 * self.backoff, 256)
            self.efficiency = 1.0  # the probe after the pause starts from a clean slate
        elif gained > 1:
            self.backoff = 4
