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
  input        ``prev`` (the previous chain element's state), ``anchor`` (the anchor token's own
               state at that layer, for every step) or ``prev+anchor`` (both)
  tree         top-k per depth (``3x2x1``) or explicit paths, depth <= K
  chains       ``all`` tree nodes carry chains, or ``spine`` (root and the top-1 path only;
               a step whose last accepted node has no chain is followed by a root-only step)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from methods.core.cost import CostCurve, layered_cost
from methods.core.decoder import Draft
from methods.core.engine import ForwardOutput, Injection
from methods.core.errors import UserError, first_line
from methods.core.options import option
from methods.core.static_tree import StaticTreeDecoder, check_tree_option, tree_option
from methods.core.tree import Tree, chain_layout
from methods.core.verify import Acceptance
from methods.core.training import training_summary
from methods.core.weights import WeightsLocator

WEIGHTS_DIR = Path(__file__).parent / "weights"
TRAIN_HINT = ("python -m harness train firp --model {model} --data ../shared/data/gsm8k/train.jsonl "
              "../shared/data/boolq/dev.jsonl --out DIR")


INPUTS = ("prev", "anchor", "prev+anchor")


def map_input(kind: str, prev: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """What W_k reads. ``prev`` chains the maps (step k is then a product of linear maps of the
    anchor: no more expressive than parallel, and later steps' losses pull on W_0);
    ``anchor`` gives every W_k the anchor's own state while the serialized attention still
    lets pseudo k see its chain's earlier steps; ``prev+anchor`` concatenates both."""
    if kind == "prev":
        return prev
    if kind == "anchor":
        return anchor
    return torch.cat([prev, anchor], dim=-1)


class FirpMaps(nn.Module):
    """The K linear maps W_k, initialised to identity (a pseudo state starts as a copy)."""

    def __init__(self, hidden: int, layers: Sequence[int], mode: str = "serialized", input: str = "prev") -> None:
        super().__init__()
        if mode not in ("serialized", "parallel"):
            raise ValueError(f"mode must be serialized or parallel, got {mode!r}")
        if input not in INPUTS:
            raise ValueError(f"input must be one of {', '.join(INPUTS)}, got {input!r}")
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
        return self.maps[k](map_input(self.input, prev, anchor))

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
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        maps = FirpMaps(hidden, config["layers"], config.get("mode", "serialized"), config.get("input", "prev"))
        maps.load_state_dict(load_file(str(path / "firp.safetensors")))
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is the user's file, not our bug
        raise UserError(f"cannot load FIRP weights from {path}: {first_line(exc)}"
                        " (expected firp.safetensors + config.json from `harness train firp` for this model)") from None
    return maps, config


@dataclass(frozen=True)
class FirpOptions:
    weights: str | None = option(None, help="FIRP maps folder (default: shipped)")
    tree: str = tree_option()
    chains: str = option("all", choices=("all", "spine"), help="tree nodes that carry pseudo chains")

    def validate(self) -> None:
        check_tree_option(self.tree)
        if self.weights is not None and not (Path(self.weights) / "firp.safetensors").is_file():
            raise UserError(f"FIRP weights not found in {self.weights} (expected firp.safetensors + config.json "
                            "from `harness train firp`)")


class FirpDecoder(StaticTreeDecoder):
    """FIRP pseudo hidden states at an intermediate layer; drafts ride along the verify pass."""

    Options = FirpOptions
    default_tree = "3x2x1"
    depth_noun = "FIRP pseudo steps (K)"
    weights = WeightsLocator("firp", "weights", "FIRP maps", WEIGHTS_DIR, TRAIN_HINT, files=("firp.safetensors",))

    def setup(self) -> None:
        engine, opts = self.engine, self.options
        path = Path(self.weights.locate(self.model_name, opts))
        self.weights_path = path
        self.maps, self.weights_config = load_firp(path, engine.config.hidden_size)
        self.maps.to(device=engine.device, dtype=engine.dtype).eval().requires_grad_(False)
        self.draft_depth = self.maps.K
        self.choose_tree(self.weights_config)
        self.trained_K = self.maps.K
        self.maps = self.maps.truncated(self.tree.max_depth)
        if opts.chains == "all":
            anchors = list(range(self.tree.size))
        else:
            anchors = [0] + [i + 1 for i, p in enumerate(self.tree.paths) if all(c == 0 for c in p)]
        K, device = self.maps.K, engine.device
        self.plan = build_plan(self.maps, self.tree.visible[anchors], anchors)
        self.slot_rows = {node: torch.tensor(self.plan.rows_of(i, K), device=device) for i, node in enumerate(anchors)}
        self.anchor_depths = self.tree.depths[self.plan.anchors].to(device)
        self.root_plan = build_plan(self.maps, torch.ones((1, 1), dtype=torch.bool), [0])
        self.root_rows = torch.tensor(self.root_plan.rows_of(0, K), device=device)
        self.root_layout = chain_layout(0, engine)

    @staticmethod
    def chain_carriers(tree: Tree, chains: str) -> int:
        """Nodes that carry a pseudo chain: every node, or the root and the all-top-1 spine."""
        return tree.size if chains == "all" else 1 + sum(1 for p in tree.paths if all(c == 0 for c in p))

    def processed(self, tree: Tree) -> int:
        """Tokens one FIRP target pass runs: the tree plus K' pseudo tokens per chain-carrying node."""
        return tree.size + self.chain_carriers(tree, self.options.chains) * tree.max_depth

    def pass_cost(self, tree: Tree, curve: CostCurve) -> float:
        """The tree runs every layer, pseudo step k's tokens (one per chain-carrying node) only
        from its map's layer on."""
        anchors = self.chain_carriers(tree, self.options.chains)
        return layered_cost(curve, self.engine.num_layers, tree.size,
                            [(self.maps.layers[k], anchors) for k in range(tree.max_depth)])

    def draft_probe(self) -> None:
        """The drafting work outside the pass: the top-k over the pseudo tokens' logits (their
        LM head rides in the pass's own call)."""
        torch.topk(torch.zeros(self.maps.K, self.engine.config.vocab_size, device=self.engine.device), 4, dim=-1)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "weights": str(self.weights_path), **self.tree_record(),
                **self.maps.config(), "K": self.trained_K, "steps_used": self.maps.K,
                "pseudo_tokens_per_step": len(self.plan.anchors) * self.maps.K if self.drafting else 0,
                "training": training_summary(self.weights_config)}

    def drafter(self) -> str:
        return f"{self.trained_K} linear maps at layer {self.maps.layers}, decoded through the later layers"

    def step_capacity(self) -> int:
        return self.tree.size + len(self.plan.anchors) * self.maps.K

    def prefill(self, prompt_ids: Sequence[int]) -> ForwardOutput:
        if not self.drafting:
            return super().prefill(prompt_ids)
        engine, n = self.engine, len(prompt_ids)
        plan = build_plan(self.maps, torch.ones((1, n), dtype=torch.bool), [n - 1])
        inj = injections(self.maps, plan, torch.tensor([n - 1], device=engine.device), engine.device)
        self._prefill_rows = torch.tensor(plan.rows_of(0, self.maps.K), device=engine.device)
        return engine.forward(prompt_ids, logits_rows=slice(n - 1, n), injections=inj, commit=True)

    def begin(self, prompt_ids: Sequence[int], out: ForwardOutput) -> None:
        if self.drafting:
            self.hidden, self.chain_rows, self.logits = out.hidden, self._prefill_rows, None

    def draft(self, root: int, root_t: torch.Tensor, room: int) -> Draft:
        engine = self.engine
        if not self.drafting:
            return Draft(root_t, self.root_layout)
        past = engine.cache.length
        if self.chain_rows is None:  # the last accepted node carried no chain: a root-only step rebuilds it
            inj = injections(self.maps, self.root_plan, torch.full((1,), past, device=engine.device), engine.device)
            return Draft(root_t, self.root_layout, inj, ephemeral=self.maps.K, all_logits=True)
        if self.logits is not None:  # decoded by the last pass's own LM-head call
            logits = self.logits.index_select(0, self.chain_rows)  # pseudo k predicts depth k+1
        else:  # after prefill, which decodes only its last row
            logits = engine.lm_head(self.hidden.index_select(0, self.chain_rows))
        top = torch.topk(logits[: self.tree.max_depth], self.tree.topk, dim=-1).indices.view(-1)
        tokens = torch.cat([root_t, top])[self.candidate_index]
        inj = injections(self.maps, self.plan, self.anchor_depths + past, engine.device)
        return Draft(tokens, self.layout, inj, ephemeral=len(self.plan.anchors) * self.maps.K, all_logits=True)

    def update(self, draft: Draft, out: ForwardOutput, acc: Acceptance) -> None:
        if not self.drafting:
            return
        self.hidden, self.logits = out.hidden, out.logits
        if draft.layout is self.root_layout:
            self.chain_rows = self.root_rows
        else:
            self.chain_rows = self.slot_rows.get(acc.nodes[-1])
