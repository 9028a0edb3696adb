"""FIRP (arXiv 2410.20488): drafts from *pseudo hidden states* of future tokens.

At an intermediate layer l_k a trained linear map W_k turns a hidden state into a pseudo
hidden state for position t+k. Pseudo tokens join the real tokens at that layer, flow
through every later layer (attending to the real context and, when serialized, to the
earlier pseudo tokens of their own chain), and the model's own final norm and LM head
decode them: pseudo state t+k predicts token t+k+1, while the real token t predicts t+1.

Inference runs **one target forward per step**: it verifies the current token tree and,
for every tree node that carries a chain (all nodes by default), adds K ephemeral pseudo
tokens through ``Engine`` injections. Whichever node ends up last accepted, its chain has
already produced the next step's drafts. Pseudo tokens are never committed to the cache.

Options (all recorded in the manifest):
  K / layers   one map per step; ``layers`` lists l_k (non-decreasing), e.g. [10, 10, 10]
  mode         ``serialized`` (W_k reads pseudo k-1; chain members see each other) or
               ``parallel`` (W_k reads the anchor; each pseudo sees only the context): the ablation
  input        ``prev`` (the previous chain element's state) or ``prev+anchor`` (also the
               anchor token's own state at that layer)
  tree         top-k per depth (``3x2x1``) or explicit paths, depth <= K
  chains       ``all`` tree nodes carry chains, or ``spine`` (root and the top-1 path only;
               a step whose last accepted node has no chain is followed by a root-only step)
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.errors import UserError
from methods.base import Decoder, Generation, register_method, truncate_at_stop
from methods.engine import Engine, Injection
from methods.medusa import parse_tree
from methods.tree import TreeVerifier

WEIGHTS_DIR = Path(__file__).parent / "weights"
TRAIN_HINT = ("python -m harness train firp --model {model} --data ../shared/data/gsm8k/train.jsonl "
              "../shared/data/boolq/dev.jsonl --out DIR")


class FirpMaps(nn.Module):
    """The K linear maps W_k, initialised to identity (a pseudo state starts as a copy)."""

    def __init__(self, hidden: int, layers: Sequence[int], mode: str = "serialized", input: str = "prev") -> None:
        super().__init__()
        if mode not in ("serialized", "parallel"):
            raise ValueError(f"mode must be serialized or parallel, got {mode!r}")
        if input not in ("prev", "prev+anchor"):
            raise ValueError(f"input must be prev or prev+anchor, got {input!r}")
        if list(layers) != sorted(layers):
            raise ValueError(f"FIRP layers must be non-decreasing, got {list(layers)}")
        self.layers = [int(x) for x in layers]
        self.mode, self.input = mode, input
        width = hidden * (2 if input == "prev+anchor" else 1)
        self.maps = nn.ModuleList(nn.Linear(width, hidden) for _ in layers)
        with torch.no_grad():
            for m in self.maps:
                m.weight.zero_()
                m.weight[:, :hidden].copy_(torch.eye(hidden))
                m.bias.zero_()

    @property
    def K(self) -> int:
        return len(self.layers)

    def groups(self) -> list[tuple[int, list[int]]]:
        """Steps (0-based) grouped by the layer where they enter: [(layer, [k, ...]), ...]."""
        out: list[tuple[int, list[int]]] = []
        for k, layer in enumerate(self.layers):
            if out and out[-1][0] == layer:
                out[-1][1].append(k)
            else:
                out.append((layer, [k]))
        return out

    def make(self, k: int, prev: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        x = prev if self.input == "prev" else torch.cat([prev, anchor], dim=-1)
        return self.maps[k](x)

    def config(self) -> dict[str, Any]:
        return {"layers": self.layers, "mode": self.mode, "input": self.input}

    def truncated(self, steps: int) -> FirpMaps:
        """The first ``steps`` maps (sharing parameters): pseudo steps deeper than the tree are never read."""
        if steps >= self.K:
            return self
        view = FirpMaps.__new__(FirpMaps)
        nn.Module.__init__(view)
        view.layers, view.mode, view.input = self.layers[:steps], self.mode, self.input
        view.maps = nn.ModuleList(list(self.maps)[:steps])
        return view


@dataclass
class ChainPlan:
    """Where each pseudo token sits and what it sees, for one set of chain anchors.

    Pseudo rows are step-major after the n real rows: step k of anchor i is row
    ``n + k * a + i``. Built once per (tree, anchors), so a step does no per-node work.
    """

    anchors: torch.Tensor          # [a] real-row indices carrying chains
    offsets: list[torch.Tensor]    # per group: [m] position offset relative to the anchor's position
    visible: list[torch.Tensor]    # per group: [m, n_cur + m] bool
    n_real: int

    def rows_of(self, anchor_pos: int, K: int) -> list[int]:
        a = len(self.anchors)
        return [self.n_real + k * a + anchor_pos for k in range(K)]


def build_plan(maps: FirpMaps, anchor_visible: torch.Tensor, anchors: Sequence[int]) -> ChainPlan:
    """``anchor_visible`` [a, n]: the real rows each anchor sees (its tree ancestors, or the whole prompt);
    a pseudo token sees what its anchor sees, itself, and (serialized) its chain's earlier steps."""
    a, n = anchor_visible.shape
    anchors_t = torch.tensor(list(anchors), dtype=torch.long)
    base = anchor_visible.bool()
    serialized = maps.mode == "serialized"
    offsets, visible = [], []
    done = 0  # pseudo steps already added
    for _, steps in maps.groups():
        m = a * len(steps)
        n_cur = n + done * a
        vis = torch.zeros((m, n_cur + m), dtype=torch.bool)
        off = torch.empty(m, dtype=torch.long)
        for gi, k in enumerate(steps):
            rows = slice(gi * a, (gi + 1) * a)
            vis[rows, :n] = base
            off[rows] = k + 1
            for j in range(k + 1):  # chain members of this anchor: earlier steps (serialized) and itself
                if j != k and not serialized:
                    continue
                col = (n + j * a) if j < done else (n_cur + (j - done) * a)
                vis[rows, col:col + a] |= torch.eye(a, dtype=torch.bool)
        offsets.append(off)
        visible.append(vis)
        done += len(steps)
    return ChainPlan(anchors_t, offsets, visible, n)


def injections(maps: FirpMaps, plan: ChainPlan, anchor_positions: torch.Tensor, device: torch.device) -> list[Injection]:
    """Engine injections that build the chains of ``plan`` layer by layer.

    ``anchor_positions`` [a]: absolute positions of the anchors (pseudo k sits at +k+1).
    """
    a = len(plan.anchors)
    n = plan.n_real
    anchors = plan.anchors.to(device)
    serialized = maps.mode == "serialized"
    out: list[Injection] = []
    done = 0
    for (layer, steps), off, vis in zip(maps.groups(), plan.offsets, plan.visible):
        def make(h: torch.Tensor, steps=steps, off=off, vis=vis, done=done):
            h = h[0]
            anchor_h = h.index_select(0, anchors)
            new: list[torch.Tensor] = []
            for k in steps:
                if k == 0 or not serialized:
                    prev = anchor_h
                elif k - 1 >= done:  # built in this same group
                    prev = new[k - 1 - done]
                else:
                    start = n + (k - 1) * a
                    prev = h[start:start + a]
                new.append(maps.make(k, prev, anchor_h))
            pos = anchor_positions.repeat(len(steps)) + off.to(device)
            return torch.cat(new)[None], pos, vis
        out.append(Injection(layer, make))
        done += len(steps)
    return out


def load_firp(path: Path, hidden: int) -> tuple[FirpMaps, dict[str, Any]]:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "firp.safetensors").is_file():
        raise UserError(f"FIRP weights not found in {path} (expected firp.safetensors + config.json)")
    config = json.loads((path / "config.json").read_text())
    maps = FirpMaps(hidden, config["layers"], config.get("mode", "serialized"), config.get("input", "prev"))
    maps.load_state_dict(load_file(str(path / "firp.safetensors")))
    return maps, config


def shipped_weights(model_name: str) -> Path | None:
    path = WEIGHTS_DIR / f"firp-{model_name}"
    return path if (path / "firp.safetensors").is_file() else None


@register_method("firp")
class FirpDecoder(Decoder):
    """FIRP pseudo hidden states at an intermediate layer; drafts ride along the verify pass."""

    default_tree = "3x2x1"

    def __init__(self, engine: Engine, weights: str | None = None, tree: Any = None, chains: str = "all",
                 model_name: str = "", **options: Any) -> None:
        path = Path(weights) if weights else shipped_weights(model_name)
        if path is None:
            raise UserError(f"no FIRP weights for model {model_name!r}; train them with: "
                            + TRAIN_HINT.format(model=model_name) + " and pass --method-option firp.weights=DIR")
        self.maps, self.weights_config = load_firp(path, engine.config.hidden_size)
        self.maps.to(device=engine.device, dtype=engine.dtype).eval().requires_grad_(False)
        tree = tree or self.weights_config.get("default_tree") or self.default_tree
        self.tree = parse_tree(tree)
        if self.tree.max_depth > self.maps.K:
            raise UserError(f"tree depth {self.tree.max_depth} exceeds FIRP's K={self.maps.K} pseudo steps")
        if chains not in ("all", "spine"):
            raise UserError(f"firp.chains must be 'all' or 'spine', got {chains!r}")
        self.verifier = TreeVerifier(self.tree, engine)
        self.trained_K = self.maps.K
        self.maps = self.maps.truncated(self.tree.max_depth)
        if chains == "all":
            anchors = list(range(self.tree.size))
        else:
            anchors = [0] + [i + 1 for i, p in enumerate(self.tree.paths) if all(c == 0 for c in p)]
        self.plan = build_plan(self.maps, self.tree.visible[anchors], anchors)
        self.anchor_slot = {node: i for i, node in enumerate(anchors)}
        self.anchor_depths = self.tree.depths[self.plan.anchors].to(engine.device)
        self.root_plan = build_plan(self.maps, torch.ones((1, 1), dtype=torch.bool), [0])
        super().__init__(engine, model_name=model_name, weights=str(path), tree=tree, chains=chains, **options)

    @classmethod
    def check_ready(cls, model_name: str, options: dict[str, Any]) -> None:
        if not options.get("weights") and shipped_weights(model_name) is None:
            raise UserError(f"no trained FIRP weights for model {model_name!r}; train them with: "
                            + TRAIN_HINT.format(model=model_name) + " and pass --method-option firp.weights=DIR")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.maps.config(), "K": self.trained_K, "steps_used": self.maps.K,
                "draft_size": self.tree.draft_size,
                "pseudo_tokens_per_step": len(self.plan.anchors) * self.maps.K,
                "tree_paths": [list(p) for p in self.tree.paths]}

    def _drafts(self, hidden: torch.Tensor, rows: list[int], root: int) -> torch.Tensor:
        logits = self.engine.lm_head(hidden[rows])  # [K, V]: pseudo k predicts the token after depth k
        top = torch.topk(logits[: self.tree.max_depth], self.tree.topk, dim=-1).indices.view(-1)
        candidates = torch.cat([torch.tensor([root], device=top.device), top])
        return candidates[self.verifier.candidate_index]

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, stop: Collection[int] = ()) -> Generation:
        engine, verifier, K = self.engine, self.verifier, self.maps.K
        engine.reset(capacity=len(prompt_ids) + max_new_tokens + self.tree.size + 1)
        stop = frozenset(stop)
        n = len(prompt_ids)
        prefill = build_plan(self.maps, torch.ones((1, n), dtype=torch.bool), [n - 1])
        prefill_inj = injections(self.maps, prefill, torch.tensor([n - 1], device=engine.device), engine.device)
        out = engine.forward(prompt_ids, logits_rows=slice(n - 1, n), injections=prefill_inj, commit=True)
        root = int(out.logits[-1].argmax())
        gen = Generation(tokens=[root], accepted=[1], draft_sizes=[0], draft_times=[0.0], verify_times=[0.0])
        chain_rows = prefill.rows_of(0, K)
        hidden = out.hidden
        done = root in stop
        while not done and len(gen.tokens) < max_new_tokens:
            t0 = self._now()
            past = engine.cache.length
            if chain_rows is None:  # last accepted node carried no chain: a root-only step rebuilds it
                inj = injections(self.maps, self.root_plan, torch.tensor([past], device=engine.device), engine.device)
                out = engine.forward([root], injections=inj, logits_rows=slice(0, 1))
                engine.cache.commit(1)
                t1 = self._now()
                bonus = int(out.logits[0].argmax())
                new, nodes, plan_rows = [bonus], [0], self.root_plan.rows_of(0, K)
                draft_size = 0
            else:
                node_tokens = self._drafts(hidden, chain_rows, root)
                t1 = self._now()
                inj = injections(self.maps, self.plan, self.anchor_depths + past, engine.device)
                out = engine.forward(node_tokens, position_ids=verifier.depths + past, step_bias=verifier.bias,
                                     injections=inj, logits_rows=slice(0, self.tree.size))
                nodes, bonus, _ = verifier.accept(node_tokens, out.logits)
                engine.cache.keep(nodes)
                new = node_tokens[nodes[1:]].tolist() + [bonus]
                slot = self.anchor_slot.get(nodes[-1])
                plan_rows = None if slot is None else self.plan.rows_of(slot, K)
                draft_size = self.tree.draft_size
            t2 = self._now()
            new, hit = truncate_at_stop(new, stop, max_new_tokens - len(gen.tokens))
            gen.add_step(new, draft_size, t1 - t0, t2 - t1)
            done = hit
            hidden, root, chain_rows = out.hidden, bonus, plan_rows
        gen.stopped_by = "eos" if done else "length"
        return gen
