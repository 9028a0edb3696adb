"""EAGLE-2 (Li et al. 2024): a one-layer draft head on the target's features, with a dynamic draft tree.

The head is EAGLE's: ``fc`` fuses the embedding of token t+1 with the target's feature at t
(the hidden state after the final norm), one decoder layer of the target's own shape (its
input norm removed, as upstream) predicts the feature at t+1, and the target's own LM head
decodes it. The head keeps its own KV cache across steps (``Engine`` over a one-layer
model), holding every committed (feature, next token) pair.

Each step (EAGLE-2's dynamic tree): from the root, expand the ``topk`` most confident
nodes of the newest level by their ``topk`` children, ``depth`` times, scoring every node
by its cumulative draft log-probability; then keep the best ``total`` nodes of all levels
(ancestor-closed, since a child never scores above its parent) as this step's tree, one
target pass verifies it, and the accepted path's features feed the head next step.

With ``total=auto`` (the default) the tree fits the machine, step by step. A node's value,
the product of draft probabilities along its path, estimates how often it is accepted, so
the best k nodes accept about 1 + s x their summed values (s: the running ratio of accepted
drafts to predicted ones). A step costs its head passes (one per level, each with the LM
head, measured once against a target step) plus the target pass over k + 1 tokens (the
measured curve). Another level is drafted only while its expected nodes (each frontier
node's best child, at the running ratio of a child's probability to its parent's) are
predicted to raise the step's tokens per unit of cost; then the k of the highest rate is
verified, none where nothing beats a plain step. While the running efficiency of drafted
steps stays under a plain step's, the head does not run at all (plain steps, a probe after
4, 8, ... of them) and its inputs wait for the next drafted step. ``total=N`` drafts N
nodes of ``depth`` levels every step, as published (``eagle@total=16``).

Upstream checkpoints (the ``EAGLE-*`` draft repositories: ``config.json`` plus
``pytorch_model.bin`` or ``model.safetensors`` with ``fc.*`` and ``layers.0.*`` keys) load
as they are; ``embed_tokens`` / ``lm_head`` keys in them are ignored: the target's own are used.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from methods.core.decoder import Decoder, Draft
from methods.core.engine import Engine, ForwardOutput
from methods.core.errors import UserError, first_line
from methods.core.fitting import PLAIN_RATE, Backoff, alpha_from_chain, best_prefix, chain_tokens, fitted
from methods.core.options import Alias, Preset, option
from methods.core.tree import TreeLayout, chain_layout
from methods.core.verify import Acceptance
from methods.core.training import training_summary
from methods.core.weights import WeightsLocator

WEIGHTS_DIR = Path(__file__).parent / "weights"  # one folder per model name
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TRAIN_HINT = ("python -m harness train eagle --model {model} --data ../shared/data/gsm8k/train.jsonl "
              "../shared/data/boolq/dev.jsonl --out DIR")


class EagleHead(nn.Module):
    """``fc`` + one decoder layer of the target's class; the state dict uses upstream's key names."""

    def __init__(self, target_config: Any, layer_class: type, bias: bool = False) -> None:
        super().__init__()
        hidden = target_config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=bias)
        layer = layer_class(target_config, layer_idx=0)
        layer.input_layernorm = nn.Identity()  # upstream's first (only) layer has no input norm
        self.layers = nn.ModuleList([layer])

    def fuse(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([embeds, features], dim=-1))


class _Backbone(nn.Module):
    def __init__(self, head: EagleHead, target: Engine) -> None:
        super().__init__()
        self.embed_tokens = target.embed_tokens
        self.layers = head.layers
        self.norm = nn.Identity()  # the head predicts the (already normed) feature directly
        self.rotary_emb = target.rotary


class _DraftModel(nn.Module):
    """Just enough of a causal-LM shape for ``Engine`` to drive the head with its own cache."""

    def __init__(self, head: EagleHead, target: Engine) -> None:
        super().__init__()
        self.config = target.config
        self.head = head
        self.model = _Backbone(head, target)
        self.lm_head = target.lm_head


def load_head(path: Path, target: Engine) -> tuple[EagleHead, dict[str, Any]]:
    """A head folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``), ours or upstream's."""
    from safetensors.torch import load_file

    path = Path(path)
    files = [path / f for f in WEIGHT_FILES if (path / f).is_file()] if path.is_dir() else []
    if not files:
        raise UserError(f"no EAGLE head in {path} (expected config.json and {' or '.join(WEIGHT_FILES)}); "
                        "train one with: " + TRAIN_HINT.format(model="MODEL"))
    try:
        config_file = path / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        file = files[0]
        state = load_file(str(file)) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu",
                                                                                        weights_only=True)
        state = {k.removeprefix("model."): v for k, v in state.items()
                 if not k.startswith(("embed_tokens.", "lm_head.", "model.embed_tokens."))}
        if state.get("fc.weight") is None or state["fc.weight"].shape != (target.config.hidden_size,
                                                                          2 * target.config.hidden_size):
            raise ValueError(f"fc.weight missing or not of shape [{target.config.hidden_size}, "
                             f"{2 * target.config.hidden_size}] (a head for another model?)")
        head = EagleHead(target.config, type(target.layers[0]), bias="fc.bias" in state)
        head.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is the user's file, not our bug
        raise UserError(f"cannot load the EAGLE head from {path}: {first_line(exc)}") from None
    return head, config


AUTO = "auto"
PRIOR_ACCEPTANCE = 0.5  # per level, for a head whose config.json carries no validated chain
CONTEXT = 128  # cached tokens behind the timed head pass


def prior_acceptance(config: dict[str, Any]) -> tuple[float, str]:
    """Per-level acceptance implied by the trainer's validated chain, and where it came from."""
    chain = (config.get("val_accuracy") or {}).get("chain") or {}
    if chain.get("accepted_length") and chain.get("steps"):
        length, steps = float(chain["accepted_length"]), int(chain["steps"])
        return alpha_from_chain(length, steps), f"the trainer's validated {steps}-level chain ({length:.2f} accepted)"
    return PRIOR_ACCEPTANCE, f"a prior per-level acceptance of {PRIOR_ACCEPTANCE} (no validated chain in config.json)"


MAX_TOTAL = 128


def _total_from_upstream(total_token: int | str) -> int | str:
    """Upstream's ``total_token`` counts the root (its ``Model`` keeps ``total_token - 1`` drafts);
    ``-1`` is its automatic setting, which here is ``total=auto``."""
    if total_token == AUTO or total_token == -1:
        return AUTO
    if not isinstance(total_token, int):
        raise ValueError(f"expected -1, auto or an integer, got {total_token!r}")
    return total_token - 1


def _total_to_upstream(total: int | str) -> int | str:
    return -1 if total == AUTO else total + 1 if isinstance(total, int) else total


# Upstream's names (SafeAILab/EAGLE, ``EaModel.from_pretrained`` and the ``gen_ea_answer_*`` scripts'
# flags), so a configuration can be typed as upstream publishes it. Upstream's ``depth`` is ours
# under another name because our ``depth`` counts levels, and the two would be off by one.
UPSTREAM_ALIASES = (
    Alias("upstream_depth", "depth", "depth = upstream_depth + 1",
          help="upstream's depth, expansion passes after the root's children (upstream drafts depth + 1 levels)",
          to_ours=lambda v: v + 1, from_ours=lambda v: v - 1, kind=int),
    Alias("top_k", "topk", "topk = top_k", help="upstream's top_k, the same meaning", kind=int),
    Alias("total_token", "total", "total = total_token - 1; -1 or auto: auto",
          help="upstream's total_token, draft tokens verified per step counting the root",
          to_ours=_total_from_upstream, from_ours=_total_to_upstream),
)
UPSTREAM_PRESETS = {
    "upstream": Preset({"total_token": 60, "upstream_depth": 5, "top_k": 10},
                       "upstream's published evaluation setting (the --total-token, --depth and --top-k defaults "
                       "of SafeAILab/EAGLE's gen_ea_answer_* scripts, snapshot cb7e084)"),
}


@dataclass(frozen=True)
class EagleOptions:
    ALIASES: ClassVar[tuple[Alias, ...]] = UPSTREAM_ALIASES
    PRESETS: ClassVar[dict[str, Preset]] = UPSTREAM_PRESETS

    head: str | None = option(None, help="EAGLE head folder, ours or upstream (default: shipped)")
    depth: int = option(5, min=1, max=12, help="draft levels per step (with total=auto: the most)")
    topk: int = option(4, min=1, max=16, help="nodes expanded per level, and children per node")
    total: int | str = option(AUTO, min=1, max=MAX_TOTAL,
                              help="draft tokens verified per step, the root not counted: auto (default: levels "
                                   "and nodes fitted each step to this machine's measured costs, plain steps where "
                                   "drafting does not pay) or a number (best by draft confidence, every step; "
                                   "16 is EAGLE-2's published setting)")

    def validate(self) -> None:
        if self.total != AUTO and not (isinstance(self.total, int) and 1 <= self.total <= MAX_TOTAL):
            raise ValueError(f"total must be auto or an integer in 1..{MAX_TOTAL}, got {self.total!r}")
        if self.head is not None and not Path(self.head).is_dir():
            raise UserError(f"EAGLE head folder {self.head} does not exist")


class EagleDecoder(Decoder):
    """EAGLE-2: a one-layer feature-level draft head with its own KV cache and a dynamic draft tree."""

    Options = EagleOptions
    weights = WeightsLocator("eagle", "head", "EAGLE head", WEIGHTS_DIR, TRAIN_HINT, files=WEIGHT_FILES)

    def setup(self) -> None:
        engine, opts = self.engine, self.options
        path = Path(self.weights.locate(self.model_name, opts))
        self.head_path = path
        self.head, self.head_config = load_head(path, engine)
        self.head.to(device=engine.device, dtype=engine.dtype).eval().requires_grad_(False)
        self.draft_engine = Engine(_DraftModel(self.head, engine))
        most = opts.topk + (opts.depth - 1) * opts.topk * opts.topk  # every node the levels draft
        self.auto = opts.total == AUTO
        self.total = most if self.auto else min(opts.total, most)
        self.fitted: dict[str, Any] | None = None
        if self.auto:
            self._fit()

    def _fit(self) -> None:
        """Measure what drafting costs here and predict, from the trainer's validated chain, whether it pays."""
        from methods.core.cost import cost_curve, relative_call_cost
        from methods.core.files import cache_root

        o = self.options
        self.curve = cost_curve(self.engine, self.model_name, cache_root())
        self.head_cost = relative_call_cost(self.engine, self._head_probe(), f"eagle.head_pass(topk={o.topk})")
        alpha, source = prior_acceptance(self.head_config)
        # the prior: a greedy chain of d levels, each accepted at the validated per-level rate
        depth, rate = max(((d, chain_tokens(alpha, d) / (d * self.head_cost + self.curve(d + 1)))
                           for d in range(1, o.depth + 1)), key=lambda dr: dr[1])
        self.fitted = fitted(rate, f"a {depth}-level chain", basis=f"{source} and this machine's measured costs",
                             head_pass_cost=round(self.head_cost, 4))
        # running state, across prompts: it is the head's and the machine's, not one prompt's
        self.child_ratio = alpha      # a node's best child's probability over its own
        self.efficiency = rate        # tokens per unit of cost of recent drafted steps
        self.predicted = self.accepted = 0.0  # summed node values verified, and drafts accepted
        self.backoff = Backoff()

    def _head_probe(self) -> Callable[[], Any]:
        """One level's drafting work (a head pass over ``topk`` rows, its LM head, the top-k), for timing."""
        de, k, device = self.draft_engine, self.options.topk, self.engine.device
        de.reset(capacity=CONTEXT + k + 2)
        tokens = torch.arange(CONTEXT, device=device) % self.engine.config.vocab_size
        feats = torch.zeros(CONTEXT, self.engine.config.hidden_size, device=device, dtype=self.engine.dtype)
        self._head_pass(tokens, feats, commit=True, want_logits=False)
        return lambda: torch.log_softmax(self._head_pass(tokens[:k], feats[:k]).logits, dim=-1).topk(k)

    def scale(self) -> float:
        """Accepted drafts per unit of predicted node value so far (1 before any evidence)."""
        return (self.accepted + 2.0) / (self.predicted + 2.0)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "head": str(self.head_path),
                "draft_size": "fitted per step" if self.auto else self.total,
                **({"fitted": self.fitted} if self.fitted else {}),
                **{k: self.head_config[k] for k in ("val_accuracy", "train_steps") if k in self.head_config},
                "training": training_summary(self.head_config)}

    def drafter(self) -> str:
        return "a one-layer head on the target's features and the LM head"

    def step_capacity(self) -> int:
        return self.total + 1

    def fork(self, engine: Engine) -> Decoder:
        """A slot's decoder drafts on a cache of its own: the draft engine is forked too."""
        twin = super().fork(engine)
        twin.draft_engine = self.draft_engine.fork()
        return twin

    def reserve(self, prompt_len: int, limit: int) -> None:
        super().reserve(prompt_len, limit)
        o = self.options
        self.draft_engine.reset(capacity=prompt_len + limit + 2 * self.step_capacity() + o.depth * o.topk + 512)

    def begin(self, prompt_ids: Sequence[int], out: ForwardOutput) -> None:
        self.pending_feats = out.hidden[: len(prompt_ids)]
        self.pending_next = torch.as_tensor(list(prompt_ids[1:]), dtype=torch.long, device=self.engine.device)
        self.head_ran = False

    def _head_pass(self, tokens: torch.Tensor, feats: torch.Tensor, **kw: Any) -> ForwardOutput:
        de = self.draft_engine
        fused = self.head.fuse(de.embed_tokens(tokens), feats.to(de.dtype))
        return de.forward(None, inputs_embeds=fused, **kw)

    def draft(self, root: int, root_t: torch.Tensor, room: int) -> Draft:
        o, de, device = self.options, self.draft_engine, self.engine.device
        self.head_ran = not (self.auto and self.backoff.plain(self.efficiency >= PLAIN_RATE))
        if not self.head_ran:  # drafting has not been paying: a plain step, the head's inputs wait
            return Draft(root_t, chain_layout(0, self.engine))
        # 1. the head catches up on the committed pairs (feature t, token t+1), the root being the last token
        out = self._head_pass(torch.cat([self.pending_next, root_t]), self.pending_feats, commit=True,
                              logits_rows=slice(-1, None))
        base = de.cache.length  # pairs 0..L-1 are cached; depth-j nodes are fed at position L-1+j
        logp = torch.log_softmax(out.logits[-1].float(), dim=-1)
        top = logp.topk(o.topk)
        tokens, scores = [top.indices], [top.values]
        parents = [torch.full((o.topk,), -1, dtype=torch.long, device=device)]
        frontier = torch.arange(o.topk, device=device)         # global node ids of the level to expand
        frontier_feat = out.hidden[-1:].expand(o.topk, -1)     # the feature each frontier node is fed with
        frontier_vis = torch.zeros((o.topk, 0), dtype=torch.bool, device=device)  # sees which scratch rows
        count = o.topk
        all_tokens, all_scores = tokens[0], scores[0]
        if self.auto:  # node values on the host: one small transfer per level
            self.spent = self.head_cost
            values = frontier_values = sorted(all_scores.exp().tolist(), reverse=True)
        for level in range(1, o.depth):
            if self.auto and not self._worth_a_level(values, frontier_values):
                break
            # 2. feed the frontier (one scratch row each, seeing only its own ancestors' rows)
            k = frontier.shape[0]
            vis = torch.cat([frontier_vis, torch.eye(k, dtype=torch.bool, device=device)], dim=1)
            past_bias = torch.zeros((k, base + frontier_vis.shape[1]), dtype=de.dtype, device=device)
            past_bias[:, base:] = de.tree_bias(frontier_vis)
            step = self._head_pass(all_tokens[frontier], frontier_feat, commit=True, past_bias=past_bias,
                                   step_bias=de.tree_bias(torch.eye(k, dtype=torch.bool, device=device)),
                                   position_ids=torch.full((k,), base - 1 + level, device=device))
            # 3. each frontier node's top-k children, scored by cumulative log-probability
            child = torch.log_softmax(step.logits.float(), dim=-1).topk(o.topk)
            child_scores = (all_scores[frontier][:, None] + child.values).view(-1)
            child_parent = frontier[:, None].expand(-1, o.topk).reshape(-1)
            all_tokens = torch.cat([all_tokens, child.indices.view(-1)])
            all_scores = torch.cat([all_scores, child_scores])
            parents.append(child_parent)
            # 4. the next frontier: the most confident children
            best = child_scores.topk(min(o.topk, child_scores.shape[0])).indices
            frontier = count + best
            frontier_feat = step.hidden[best // o.topk]
            frontier_vis = vis[best // o.topk]
            count += child_scores.shape[0]
            if self.auto:
                self.spent += self.head_cost
                ratio = float(child.values[:, 0].exp().mean())
                self.child_ratio = 0.9 * self.child_ratio + 0.1 * ratio
                values = sorted(values + child_scores.exp().tolist(), reverse=True)
                frontier_values = all_scores[frontier].exp().tolist()
        de.cache.rollback(de.cache.length - base)  # scratch rows go; the committed pairs stay
        total = self.total
        if self.auto:  # the number of nodes with the most expected tokens per unit of cost, maybe none
            total, _ = best_prefix(values, self.spent, self.curve, self.scale())
            self.step_value = sum(values[:total])
            self.last_step = {"levels": len(parents), "drafted": count, "verified": total}
            if total == 0:
                return Draft(root_t, chain_layout(0, self.engine))
        # 5. rerank every drafted node; a child never outscores its parent, so the best set is a tree
        all_parents = torch.cat(parents)
        depth_of = torch.cat([torch.full((o.topk,), 1, device=device)]
                             + [torch.full((p.shape[0],), i + 2, device=device) for i, p in enumerate(parents[1:])])
        keep = torch.topk(all_scores - 1e-6 * depth_of, total).indices.sort().values
        parent_local = torch.searchsorted(keep, all_parents[keep]) + 1
        parent_local = torch.where(all_parents[keep] < 0, torch.zeros_like(parent_local), parent_local)
        layout = TreeLayout(torch.cat([torch.full((1,), -1, device=device, dtype=torch.long), parent_local]),
                            self.engine, max_depth=o.depth)
        return Draft(torch.cat([root_t, all_tokens[keep]]), layout)

    def _worth_a_level(self, values: list[float], frontier: list[float]) -> bool:
        """Whether one more level is predicted to raise the step's tokens per unit of cost: its
        likely nodes (each frontier node's best child, at the running child-to-parent ratio)
        against one more head pass."""
        scale = self.scale()
        _, now = best_prefix(values, self.spent, self.curve, scale)
        guess = sorted(values + [self.child_ratio * v for v in frontier], reverse=True)
        _, deeper = best_prefix(guess, self.spent + self.head_cost, self.curve, scale)
        return deeper > now

    def update(self, draft: Draft, out: ForwardOutput, acc: Acceptance) -> None:
        kept = out.hidden.index_select(0, acc.nodes_t)
        if not self.head_ran:  # the head saw nothing this step: its committed pairs wait for the next draft
            self.pending_feats = torch.cat([self.pending_feats, kept])
            self.pending_next = torch.cat([self.pending_next, draft.tokens[:1]])
            return
        self.pending_feats = kept
        self.pending_next = draft.tokens.index_select(0, acc.nodes_t[1:])
        if self.auto:
            gained = acc.accepted_drafts + 1
            self.efficiency = 0.8 * self.efficiency + 0.2 * gained / (self.spent + self.curve(draft.layout.n))
            self.predicted += self.step_value
            self.accepted += acc.accepted_drafts
