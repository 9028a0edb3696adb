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

Upstream checkpoints (the ``EAGLE-*`` draft repositories: ``config.json`` plus
``pytorch_model.bin`` or ``model.safetensors`` with ``fc.*`` and ``layers.0.*`` keys) load
as they are; ``embed_tokens`` / ``lm_head`` keys in them are ignored: the target's own are used.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from methods.core.decoder import Decoder, Draft
from methods.core.engine import Engine, ForwardOutput
from methods.core.errors import UserError, first_line
from methods.core.options import option
from methods.core.tree import TreeLayout
from methods.core.verify import Acceptance
from methods.core.training import training_summary

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


def shipped_head(model_name: str) -> Path | None:
    path = WEIGHTS_DIR / model_name
    return path if any((path / f).is_file() for f in WEIGHT_FILES) else None


@dataclass(frozen=True)
class EagleOptions:
    head: str | None = option(None, help="EAGLE head folder, ours or upstream (default: shipped)")
    depth: int = option(5, min=1, max=12, help="draft levels per step")
    topk: int = option(4, min=1, max=16, help="nodes expanded per level, and children per node")
    total: int = option(16, min=1, max=128, help="draft tokens verified per step (best by draft confidence)")

    def validate(self) -> None:
        if self.head is not None and not Path(self.head).is_dir():
            raise UserError(f"EAGLE head folder {self.head} does not exist")


class EagleDecoder(Decoder):
    """EAGLE-2: a one-layer feature-level draft head with its own KV cache and a dynamic draft tree."""

    Options = EagleOptions

    def setup(self) -> None:
        engine, opts = self.engine, self.options
        path = Path(opts.head) if opts.head else shipped_head(self.model_name)
        if path is None:
            raise UserError(f"no EAGLE head for model {self.model_name!r}; train one with: "
                            + TRAIN_HINT.format(model=self.model_name) + " and pass --method-option eagle.head=DIR")
        self.head_path = path
        self.head, self.head_config = load_head(path, engine)
        self.head.to(device=engine.device, dtype=engine.dtype).eval().requires_grad_(False)
        self.draft_engine = Engine(_DraftModel(self.head, engine))
        self.total = min(opts.total, opts.topk + (opts.depth - 1) * opts.topk * opts.topk)

    @classmethod
    def check_ready(cls, model_name: str, options: EagleOptions) -> None:
        if not options.head and shipped_head(model_name) is None:
            raise UserError(f"no trained EAGLE head for model {model_name!r}; train one with: "
                            + TRAIN_HINT.format(model=model_name) + " and pass --method-option eagle.head=DIR")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "head": str(self.head_path), "draft_size": self.total,
                **{k: self.head_config[k] for k in ("val_accuracy", "train_steps") if k in self.head_config},
                "training": training_summary(self.head_config)}

    def step_capacity(self) -> int:
        return self.total + 1

    def reserve(self, prompt_len: int, limit: int) -> None:
        super().reserve(prompt_len, limit)
        o = self.options
        self.draft_engine.reset(capacity=prompt_len + limit + 2 * self.step_capacity() + o.depth * o.topk + 512)

    def begin(self, prompt_ids: Sequence[int], out: ForwardOutput) -> None:
        self.pending_feats = out.hidden[: len(prompt_ids)]
        self.pending_next = torch.as_tensor(list(prompt_ids[1:]), dtype=torch.long, device=self.engine.device)

    def _head_pass(self, tokens: torch.Tensor, feats: torch.Tensor, **kw: Any) -> ForwardOutput:
        de = self.draft_engine
        fused = self.head.fuse(de.embed_tokens(tokens), feats.to(de.dtype))
        return de.forward(None, inputs_embeds=fused, **kw)

    def draft(self, root: int, root_t: torch.Tensor, room: int) -> Draft:
        o, de, device = self.options, self.draft_engine, self.engine.device
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
        for level in range(1, o.depth):
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
        de.cache.rollback(de.cache.length - base)  # scratch rows go; the committed pairs stay
        # 5. rerank every drafted node; a child never outscores its parent, so the best set is a tree
        all_parents = torch.cat(parents)
        depth_of = torch.cat([torch.full((o.topk,), 1, device=device)]
                             + [torch.full((p.shape[0],), i + 2, device=device) for i, p in enumerate(parents[1:])])
        keep = torch.topk(all_scores - 1e-6 * depth_of, self.total).indices.sort().values
        parent_local = torch.searchsorted(keep, all_parents[keep]) + 1
        parent_local = torch.where(all_parents[keep] < 0, torch.zeros_like(parent_local), parent_local)
        layout = TreeLayout(torch.cat([torch.full((1,), -1, device=device, dtype=torch.long), parent_local]),
                            self.engine, max_depth=o.depth)
        return Draft(torch.cat([root_t, all_tokens[keep]]), layout)

    def update(self, draft: Draft, out: ForwardOutput, acc: Acceptance) -> None:
        self.pending_feats = out.hidden.index_select(0, acc.nodes_t)
        self.pending_next = draft.tokens.index_select(0, acc.nodes_t[1:])
