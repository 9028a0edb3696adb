"""Medusa-1 (Cai et al. 2024): extra decoding heads on the frozen model's last hidden state.

Head k (k = 1..K) is a residual block ``x + SiLU(Linear(x))`` (zero-initialised, so an
untrained head copies the base model's next-token guess) followed by an LM head, and
predicts token t+k+1 from the hidden state of token t. Two LM-head layouts:

* ``upstream``: one LM head per Medusa head, with the Medusa project's state-dict key
  names (``{k}.0.linear.weight``, ``{k}.0.linear.bias``, ``{k}.1.weight``), so published
  ``medusa_lm_head`` checkpoints load as they are;
* ``shared``: the frozen base LM head is reused (the file holds only the residual blocks).

Each step verifies a static candidate tree (``methods.tree``) in one target forward
pass, keeps the longest matching path's KV entries and commits the bonus token.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.errors import UserError
from methods.base import Decoder, Generation, register_method, truncate_at_stop
from methods.engine import Engine
from methods.tree import Tree, TreeVerifier

WEIGHTS_DIR = Path(__file__).parent / "weights"
TRAIN_HINT = ("python -m harness train medusa --model {model} --data ../shared/data/gsm8k/train.jsonl "
              "../shared/data/boolq/dev.jsonl --out DIR")


class ResBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class MedusaHeads(nn.Module):
    """K heads; ``layout`` chooses per-head LM heads (upstream) or the shared base LM head."""

    def __init__(self, hidden: int, vocab: int, num_heads: int, layout: str = "shared") -> None:
        super().__init__()
        if layout not in ("shared", "upstream"):
            raise ValueError(f"layout must be 'shared' or 'upstream', got {layout!r}")
        self.layout = layout
        self.num_heads = num_heads
        if layout == "upstream":
            self.heads = nn.ModuleList(
                nn.Sequential(ResBlock(hidden), nn.Linear(hidden, vocab, bias=False)) for _ in range(num_heads))
        else:
            self.heads = nn.ModuleList(nn.Sequential(ResBlock(hidden)) for _ in range(num_heads))

    def forward(self, hidden: torch.Tensor, base_lm_head: nn.Module) -> torch.Tensor:
        """hidden [..., D] -> logits [K, ..., V]."""
        if self.layout == "upstream":
            return torch.stack([head(hidden) for head in self.heads])
        blocks = torch.stack([head(hidden) for head in self.heads])
        return base_lm_head(blocks)

    # upstream checkpoints are the ModuleList's own state dict: "0.0.linear.weight", "0.1.weight", ...
    def upstream_state_dict(self) -> dict[str, torch.Tensor]:
        return self.heads.state_dict()

    def load_upstream_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.heads.load_state_dict(state)


def load_heads(path: Path, hidden: int, vocab: int) -> tuple[MedusaHeads, dict[str, Any]]:
    """Load heads from a folder (``config.json`` + ``heads.safetensors``) or an upstream ``.pt`` / ``.safetensors`` file."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        state = load_file(str(path / "heads.safetensors"))
    elif path.suffix == ".safetensors":
        config, state = {}, load_file(str(path))
    elif path.is_file():
        config, state = {}, torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise UserError(f"Medusa heads not found at {path}")
    state = {k.removeprefix("medusa_head."): v for k, v in state.items()}
    num_heads = len({k.split(".")[0] for k in state})
    layout = "upstream" if any(k.endswith(".1.weight") for k in state) else "shared"
    heads = MedusaHeads(hidden, vocab, num_heads, layout)
    heads.load_upstream_state_dict(state)
    return heads, config


def shipped_heads(model_name: str) -> Path | None:
    path = WEIGHTS_DIR / f"medusa-{model_name}"
    return path if (path / "heads.safetensors").is_file() else None


def parse_tree(spec: Any) -> Tree:
    """A tree from ``"3x2x1"`` (top-k per depth), a JSON list of paths, or a path to such JSON."""
    if isinstance(spec, Tree):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        if Path(text).is_file():
            text = Path(text).read_text()
        if text.startswith("["):
            spec = json.loads(text)
        else:
            try:
                return Tree.from_topk([int(k) for k in text.lower().split("x")])
            except ValueError:
                raise UserError(f"bad tree {spec!r}: use top-k per depth like 3x2x1, or a JSON list of paths") from None
    return Tree.from_paths(spec)


@register_method("medusa")
class MedusaDecoder(Decoder):
    """Medusa-1 heads on the last hidden state; tree verification in one target pass per step."""

    default_tree = "4x2x1"

    def __init__(self, engine: Engine, heads: str | None = None, tree: Any = None, model_name: str = "",
                 **options: Any) -> None:
        path = Path(heads) if heads else shipped_heads(model_name)
        if path is None:
            raise UserError(f"no Medusa heads for model {model_name!r}; train them with: "
                            + TRAIN_HINT.format(model=model_name) + " and pass --method-option medusa.heads=DIR")
        cfg = engine.config
        self.heads, self.head_config = load_heads(path, cfg.hidden_size, cfg.vocab_size)
        self.heads.to(device=engine.device, dtype=engine.dtype).eval().requires_grad_(False)
        tree = tree or self.head_config.get("default_tree") or self.default_tree
        self.tree = parse_tree(tree)
        if self.tree.max_depth > self.heads.num_heads:
            raise UserError(f"tree depth {self.tree.max_depth} exceeds the {self.heads.num_heads} Medusa heads")
        self.verifier = TreeVerifier(self.tree, engine)
        super().__init__(engine, model_name=model_name, heads=str(path), tree=tree, **options)

    @classmethod
    def check_ready(cls, model_name: str, options: dict[str, Any]) -> None:
        if not options.get("heads") and shipped_heads(model_name) is None:
            raise UserError(f"no trained Medusa heads for model {model_name!r}; train them with: "
                            + TRAIN_HINT.format(model=model_name) + " and pass --method-option medusa.heads=DIR")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_heads": self.heads.num_heads, "layout": self.heads.layout,
                "draft_size": self.tree.draft_size, "tree_paths": [list(p) for p in self.tree.paths]}

    def _draft(self, hidden: torch.Tensor, root: int) -> torch.Tensor:
        logits = self.heads(hidden, self.engine.lm_head)  # [K, V]
        top = torch.topk(logits, self.tree.topk, dim=-1).indices.view(-1)
        candidates = torch.cat([torch.tensor([root], device=top.device), top])
        return candidates[self.verifier.candidate_index]

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, stop: Collection[int] = ()) -> Generation:
        engine, verifier = self.engine, self.verifier
        engine.reset(capacity=len(prompt_ids) + max_new_tokens + self.tree.size + 1)
        stop = frozenset(stop)
        out = engine.forward(prompt_ids, logits_rows=slice(-1, None), commit=True)
        root = int(out.logits[-1].argmax())
        gen = Generation(tokens=[root], accepted=[1], draft_sizes=[0], draft_times=[0.0], verify_times=[0.0])
        hidden = out.hidden[-1]
        done = root in stop
        while not done and len(gen.tokens) < max_new_tokens:
            t0 = self._now()
            node_tokens = self._draft(hidden, root)
            t1 = self._now()
            past = engine.cache.length
            out = engine.forward(node_tokens, position_ids=verifier.depths + past, step_bias=verifier.bias)
            nodes, bonus, _ = verifier.accept(node_tokens, out.logits)
            engine.cache.keep(nodes)
            new = node_tokens[nodes[1:]].tolist() + [bonus]
            t2 = self._now()
            new, hit = truncate_at_stop(new, stop, max_new_tokens - len(gen.tokens))
            gen.add_step(new, self.tree.draft_size, t1 - t0, t2 - t1)
            done = hit
            hidden, root = out.hidden[nodes[-1]], bonus
        gen.stopped_by = "eos" if done else "length"
        return gen


