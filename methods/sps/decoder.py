"""Speculative sampling with a small draft model (SpS: Leviathan et al. 2023; Chen et al. 2023).

The draft model proposes γ tokens autoregressively on its own engine and KV cache; the
target verifies them as a chain in one pass. Greedy, the drafts are the draft model's argmax
tokens; under sampling they are drawn from the draft model's distribution q at the run's
temperature and top-p, and the shared loop accepts each with min(1, p/q) and resamples a
rejection from max(p - q, 0) (the published rule). Drafts stay on the device (no host round
trip while drafting), so greedy output is exactly the target's and sampled output keeps its
distribution.

``sps.gamma=auto`` (the default) fits γ to the machine every step: with the draft's step
cost c (timed once against a target step) and the target's pass curve, it takes the γ of
the most expected tokens per unit of cost, (1 - α^(γ+1)) / (1 - α) / (γ·c + t(γ+1)/t(1)),
α being the acceptance rate per draft token, estimated online from the accepted counts and
starting from the trainer's validated chain length in the draft's config.json. Where no γ
beats a plain target step (γ = 0) it takes plain steps, probing a draft now and then so α
can recover. A fixed ``gamma`` drafts that many every step, or starts ``adaptive`` there
(transformers' heuristic: +2 after a step that accepted every draft, -1 otherwise).

The draft is a local Hugging Face folder sharing the target's tokenizer (refused with a
clear error otherwise), or the shipped draft for the target: a few layers initialised from
the target's first layers and final norm, distilled on the self-distillation data, whose
file holds only those layers: it uses the target's own embedding and LM head at load time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from methods.core.decoder import Decoder, Draft
from methods.core.engine import Engine, ForwardOutput
from methods.core.errors import UserError, first_line
from methods.core.fitting import PLAIN_RATE, Backoff, alpha_from_chain, best_option, chain_tokens, fitted
from methods.core.options import option
from methods.core.tree import chain_layout
from methods.core.verify import Acceptance, target_probs
from methods.core.training import training_summary
from methods.core.weights import WeightsLocator

WEIGHTS_DIR = Path(__file__).parent / "weights"  # one folder per target model name
LAYERS_FILE = "draft_layers.safetensors"
TRAIN_HINT = ("python -m harness train sps --model {model} --data ../shared/data/gsm8k/train.jsonl "
              "../shared/data/boolq/dev.jsonl --out DIR")


def layers_only_draft(target: Any, num_layers: int) -> nn.Module:
    """A model of the target's class with ``num_layers`` layers that shares the target's embedding and LM head."""
    values = {**target.config.to_dict(), "num_hidden_layers": num_layers}
    if isinstance(values.get("layer_types"), list):  # per-layer attention kinds, where the config lists them
        values["layer_types"] = values["layer_types"][:num_layers]
    config = target.config.__class__.from_dict(values)
    config._attn_implementation = "sdpa"
    draft = type(target)(config)
    draft.model.embed_tokens = target.model.embed_tokens
    draft.lm_head = target.lm_head
    return draft


def init_from_target(draft: nn.Module, target: Any) -> None:
    """The draft's layers start as the target's first layers, its norm as the target's final norm."""
    with torch.no_grad():
        for mine, theirs in zip(draft.model.layers, target.model.layers):
            mine.load_state_dict(theirs.state_dict())
        draft.model.norm.load_state_dict(target.model.norm.state_dict())


def own_state(draft: nn.Module) -> dict[str, torch.Tensor]:
    """What a layers-only draft file holds: its layers and final norm, never the shared embedding / LM head."""
    return {k: v for k, v in draft.model.state_dict().items() if not k.startswith("embed_tokens.")}


def load_own_state(draft: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put a layers-only file's weights (``own_state``) into ``draft``; a RuntimeError names keys
    that do not fit its layer count (the shared embedding is never in the file)."""
    result = draft.model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("embed_tokens.")]
    if result.unexpected_keys or missing:
        layers = len(draft.model.layers)
        raise RuntimeError(f"keys do not match a {layers}-layer draft of this model: "
                           f"unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}")


def load_layers_only(path: Path, target: Any) -> tuple[nn.Module, dict[str, Any]]:
    from safetensors.torch import load_file

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        state = load_file(str(path / LAYERS_FILE))
        draft = layers_only_draft(target, int(config["num_layers"]))
        load_own_state(draft, state)
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is the user's file, not our bug
        raise UserError(f"cannot load the SpS draft from {path}: {first_line(exc)}") from None
    return draft, config


def load_hf_draft(path: Path, target: Any) -> nn.Module:
    """A full Hugging Face model folder, checked to share the target's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        draft = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa")
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot load the SpS draft model from {path}: {first_line(exc)}") from None
    if draft.config.vocab_size != target.config.vocab_size:
        raise UserError(f"the SpS draft {path} has a vocabulary of {draft.config.vocab_size} tokens, the target "
                        f"{target.config.vocab_size}: a draft must share the target's tokenizer")
    source = getattr(target, "name_or_path", "") or ""
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        if not source or not Path(source).is_dir():
            raise UserError(f"cannot check that the SpS draft {path} shares the target's tokenizer: the target "
                            "was not loaded from a local folder")
        try:
            same = AutoTokenizer.from_pretrained(str(path)).get_vocab() == AutoTokenizer.from_pretrained(source).get_vocab()
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"cannot read the tokenizer of the SpS draft {path}: {first_line(exc)}") from None
        if not same:
            raise UserError(f"the SpS draft {path} does not share the target's tokenizer (their vocabularies "
                            "differ); give a draft trained with the target's tokenizer")
    return draft


AUTO = "auto"
AUTO_MAX_GAMMA = 12
PRIOR_ACCEPTANCE = 0.6  # per draft token, for a draft whose config.json carries no validation
PRIOR_WEIGHT = 10.0     # the prior counts as this many draft tokens seen
CONTEXT = 128           # cached tokens behind the timed draft step


def prior_acceptance(config: dict[str, Any]) -> tuple[float, str]:
    """The acceptance rate per draft token the trainer's validation implies, and where it came from."""
    val = config.get("val_accuracy") or {}
    for key, value in val.items():
        if key.startswith("chain_accepted_length_gamma") and key.rsplit("gamma", 1)[1].isdigit():
            gamma = int(key.rsplit("gamma", 1)[1])
            return alpha_from_chain(float(value), gamma), f"the trainer's validated chain ({value:.2f} at γ={gamma})"
    if "top1_agreement" in val:
        return float(val["top1_agreement"]), "the trainer's validated top-1 agreement"
    return PRIOR_ACCEPTANCE, f"a prior acceptance of {PRIOR_ACCEPTANCE} (no validation in the draft's config.json)"


def best_gamma(alpha: float, draft_cost: float, curve: Callable[[float], float], most: int,
               least: int = 0) -> tuple[int, float]:
    """The γ in ``least``..``most`` with the most expected tokens per unit of cost, and that rate
    (γ = 0: a plain target step, one token for one unit)."""
    return best_option((g, chain_tokens(alpha, g), g * draft_cost + curve(g + 1)) for g in range(least, most + 1))


@dataclass(frozen=True)
class SpsOptions:
    draft: str | None = option(None, help="draft: a Hugging Face folder with the target's tokenizer, or a "
                                           "layers-only draft folder (default: shipped)")
    gamma: int | str = option(AUTO, help="draft tokens per step: auto (default: fitted every step to this "
                                         "machine's measured costs and the running acceptance rate, plain steps "
                                         "where no draft pays) or a number, 1..32 (every step; the start value "
                                         "when adaptive)")
    adaptive: bool = option(False, help="+2 after a fully accepted step, -1 otherwise (transformers' heuristic; "
                                        "needs a number for gamma)")

    def validate(self) -> None:
        if self.gamma != AUTO and not (isinstance(self.gamma, int) and 1 <= self.gamma <= 32):
            raise ValueError(f"gamma must be auto or an integer in 1..32, got {self.gamma!r}")
        if self.adaptive and self.gamma == AUTO:
            raise ValueError("adaptive starts from a fixed gamma: give gamma a number (e.g. gamma=4)")
        if self.draft is not None and not Path(self.draft).is_dir():
            raise UserError(f"SpS draft folder {self.draft} does not exist")


class SpsDecoder(Decoder):
    """Speculative decoding with a small draft model on its own engine and cache."""

    Options = SpsOptions
    weights = WeightsLocator("sps", "draft", "SpS draft", WEIGHTS_DIR, TRAIN_HINT, files=(LAYERS_FILE,))

    def setup(self) -> None:
        engine, opts = self.engine, self.options
        path = Path(self.weights.locate(self.model_name, opts))
        self.draft_path = path
        if (path / LAYERS_FILE).is_file():
            draft, self.draft_config = load_layers_only(path, engine.model)
        else:
            draft, self.draft_config = load_hf_draft(path, engine.model), {}
        draft.to(device=engine.device, dtype=engine.dtype).eval().requires_grad_(False)
        self.draft_engine = Engine(draft)
        self.auto = opts.gamma == AUTO
        self.max_gamma = AUTO_MAX_GAMMA if self.auto else 32 if opts.adaptive else opts.gamma
        self.fitted: dict[str, Any] | None = None
        if self.auto:
            self._fit()

    def _fit(self) -> None:
        """Time the draft's step here, and predict from the trainer's validation whether drafting pays."""
        from methods.core.cost import cost_curve, relative_call_cost
        from methods.core.files import cache_root

        self.curve = cost_curve(self.engine, self.model_name, cache_root())
        self.draft_cost = relative_call_cost(self.engine, self._draft_probe(),
                                             f"sps.draft_step(layers={self.draft_engine.num_layers})")
        self.prior, source = prior_acceptance(self.draft_config)
        gamma, rate = best_gamma(self.prior, self.draft_cost, self.curve, self.max_gamma, least=1)
        self.fitted = fitted(rate, f"γ = {gamma}", basis=f"{source} and this machine's measured costs",
                             draft_step_cost=round(self.draft_cost, 4), prior_acceptance=round(self.prior, 4))
        # across prompts: the acceptance rate is the draft's and the task's, not one prompt's
        self.accepted = self.tried = 0.0
        self.backoff = Backoff()

    def _draft_probe(self) -> Callable[[], Any]:
        """One draft step (a one-token forward after ``CONTEXT`` cached tokens and its greedy token), for timing."""
        de = self.draft_engine
        de.reset(capacity=CONTEXT + 2)
        de.forward([i % de.config.vocab_size for i in range(CONTEXT)], want_logits=False, commit=True)
        return lambda: de.forward([1], logits_rows=slice(-1, None)).logits[-1].argmax()

    def acceptance(self) -> float:
        """α: accepted over evaluated draft tokens, the prior counting as ``PRIOR_WEIGHT`` of them."""
        return (self.accepted + PRIOR_WEIGHT * self.prior) / (self.tried + PRIOR_WEIGHT)

    def fitted_gamma(self) -> int:
        """This step's γ: the best one at the current α, or 0 (a plain step) while none beats vanilla."""
        gamma, rate = best_gamma(self.acceptance(), self.draft_cost, self.curve, self.max_gamma, least=1)
        return 0 if self.backoff.plain(rate >= PLAIN_RATE) else gamma

    def describe(self) -> dict[str, Any]:
        de = self.draft_engine
        return {**super().describe(), "draft": str(self.draft_path), "draft_layers": de.num_layers,
                **({"fitted": self.fitted} if self.fitted else {}),
                "training": training_summary(self.draft_config)}

    def drafter(self) -> str:
        return f"a {self.draft_engine.num_layers}-layer draft model"

    def step_capacity(self) -> int:
        return self.max_gamma + 1

    def fork(self, engine: Engine) -> Decoder:
        """A slot's decoder drafts on a cache of its own: the draft engine is forked too."""
        twin = super().fork(engine)
        twin.draft_engine = self.draft_engine.fork()
        return twin

    def begin(self, prompt_ids: Sequence[int], out: ForwardOutput) -> None:
        de = self.draft_engine
        de.reset(capacity=len(prompt_ids) + 2 * self.max_gamma + 512)
        de.forward(prompt_ids, want_logits=False, commit=True)
        self.gamma = 0 if self.auto else self.options.gamma
        self.unfed = torch.zeros(0, dtype=torch.long, device=self.engine.device)  # committed, not yet in its cache

    def draft(self, root: int, root_t: torch.Tensor, room: int) -> Draft:
        de = self.draft_engine
        gamma = min(self.fitted_gamma() if self.auto else self.gamma, room)
        if gamma <= 0:
            return Draft(root_t, chain_layout(0, self.engine))
        self.base = de.cache.length
        feed = torch.cat([self.unfed, root_t])
        drafts, qs = [], []
        sampling = self.sampling
        for _ in range(gamma):  # drafts stay on the device: no host round trip per token
            out = de.forward(feed, logits_rows=slice(-1, None), commit=True)
            if sampling is None:
                feed = out.logits[-1].argmax().view(1)
            else:  # drawn from the draft's own distribution, at the run's temperature and top-p
                q = target_probs(out.logits[-1], sampling.temperature, sampling.top_p)
                feed = torch.multinomial(q, 1, generator=sampling.generator)
                qs.append(q)
            drafts.append(feed)
        self.fed = de.cache.length - self.base  # unfed + root + the first gamma - 1 drafts
        q = None if sampling is None else torch.stack([torch.zeros_like(qs[0]), *qs])  # the root's row is unused
        return Draft(torch.cat([root_t, *drafts]), chain_layout(gamma, self.engine), q=q)

    def update(self, draft: Draft, out: ForwardOutput, acc: Acceptance) -> None:
        gamma = draft.layout.draft_size
        if gamma == 0:
            self.unfed = torch.cat([self.unfed, draft.tokens[:1]])
            return
        accepted = acc.accepted_drafts
        if self.auto:  # every draft up to the first rejection was judged
            self.tried += min(accepted + 1, gamma)
            self.accepted += accepted
        # keep what the target accepted: unfed + root + accepted drafts (the last draft was never fed)
        keep = self.fed - (gamma - 1) + min(accepted, gamma - 1)
        self.draft_engine.cache.rollback(self.fed - keep)
        self.unfed = draft.tokens[gamma:gamma + 1] if accepted == gamma else draft.tokens[:0]
        if self.options.adaptive:
            self.gamma = min(self.max_gamma, self.gamma + 2) if accepted == gamma else max(1, self.gamma - 1)
