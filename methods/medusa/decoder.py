"""Medusa-1 (Cai et al. 2024): extra decoding heads on the frozen model's last hidden state.

Head k (k = 1..K) is a residual block ``x + SiLU(Linear(x))`` (zero-initialised, so an
untrained head copies the base model's next-token guess) followed by an LM head, and
predicts token t+k+1 from the hidden state of token t. Two LM-head layouts:

* ``upstream``: one LM head per Medusa head, with the Medusa project's state-dict key
  names (``{k}.0.linear.weight``, ``{k}.0.linear.bias``, ``{k}.1.weight``), so published
  ``medusa_lm_head`` checkpoints load as they are;
* ``shared``: the frozen base LM head is reused (the file holds only the residual blocks).

Each step verifies a static candidate tree (``methods.core.tree``) in one target forward
pass, keeps the longest matching path's KV entries and commits the bonus token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from methods.core.decoder import Draft
from methods.core.engine import ForwardOutput
from methods.core.errors import UserError, first_line
from methods.core.options import option
from methods.core.static_tree import StaticTreeDecoder, check_tree_option, tree_option
from methods.core.tree import chain_layout
from methods.core.verify import Acceptance
from methods.core.training import training_summary
from methods.core.weights import WeightsLocator

WEIGHTS_DIR = Path(__file__).parent / "weights"  # one folder per model name
HEAD_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")  # upstream medusa_lm_head checkpoints
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
    check_heads_path(path)
    try:
        if path.is_dir():
            config_file = path / "config.json"
            config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
            state = load_file(str(path / "heads.safetensors"))
        elif path.suffix == ".safetensors":
            config, state = {}, load_file(str(path))
        else:
            config, state = {}, torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(config, dict) or not isinstance(state, dict):
            raise ValueError("unexpected file contents")
        state = {k.removeprefix("medusa_head."): v for k, v in state.items()}
        num_heads = len({k.split(".")[0] for k in state})
        layout = "upstream" if any(k.endswith(".1.weight") for k in state) else "shared"
        heads = MedusaHeads(hidden, vocab, num_heads, layout)
        heads.load_upstream_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the user's file, not our bug
        raise UserError(f"cannot load Medusa heads from {path}: {first_line(exc)}"
                        " (expected a heads folder from `harness train medusa` or an upstream medusa_lm_head file "
                        "for this model)") from None
    return heads, config


@dataclass(frozen=True)
class MedusaOptions:
    heads: str | None = option(None, help="heads folder or upstream medusa_lm_head file (default: shipped)")
    tree: str = tree_option()

    def validate(self) -> None:
        check_tree_option(self.tree)
        if self.heads is not None:
            check_heads_path(Path(self.heads))


def check_heads_path(path: Path) -> None:
    if path.is_dir():
        if not (path / "heads.safetensors").is_file():
            raise UserError(f"Medusa heads folder {path} has no heads.safetensors (train heads with: "
                            + TRAIN_HINT.format(model="MODEL") + ")")
    elif not path.is_file():
        raise UserError(f"Medusa heads not found at {path}")
    elif path.suffix not in HEAD_FILE_SUFFIXES:
        raise UserError(f"Medusa heads file {path} is not a checkpoint (expected {', '.join(HEAD_FILE_SUFFIXES)}, "
                        "or a heads folder from `harness train medusa`)")


class MedusaDecoder(StaticTreeDecoder):
    """Medusa-1 heads on the last hidden state; tree verification in one target pass per step."""

    Options = MedusaOptions
    default_tree = "4x2x1"
    guarded = True
    depth_noun = "Medusa heads"
    weights = WeightsLocator("medusa", "heads", "Medusa heads", WEIGHTS_DIR, TRAIN_HINT, files=("heads.safetensors",))

    def setup(self) -> None:
        engine, opts = self.engine, self.options
        path = Path(self.weights.locate(self.model_name, opts))
        cfg = engine.config
        self.heads_path = path
        self.heads, self.head_config = load_heads(path, cfg.hidden_size, cfg.vocab_size)
        self.heads.to(device=engine.device, dtype=engine.dtype).eval().requires_grad_(False)
        self.draft_depth = self.heads.num_heads
        self.choose_tree(self.head_config)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "heads": str(self.heads_path), **self.tree_record(),
                "num_heads": self.heads.num_heads, "layout": self.heads.layout,
                "training": training_summary(self.head_config)}

    def drafter(self) -> str:
        k = self.heads.num_heads
        if self.heads.layout == "upstream":
            return f"{k} heads, each with its own LM head (Medusa-1 as published)"
        return f"{k} heads sharing the model's LM head"

    def draft_probe(self) -> None:
        """One step's drafting work (heads, their LM head, top-k), timed by the tree choice."""
        hidden = torch.zeros(self.engine.config.hidden_size, device=self.engine.device, dtype=self.engine.dtype)
        torch.topk(self.heads(hidden, self.engine.lm_head), 4, dim=-1)

    def step_capacity(self) -> int:
        return self.tree.size

    def begin(self, prompt_ids: Sequence[int], out: ForwardOutput) -> None:
        self.hidden = out.hidden[-1]

    def draft(self, root: int, root_t: torch.Tensor, room: int) -> Draft:
        if not self.draft_this_step():
            return Draft(root_t, chain_layout(0, self.engine))
        logits = self.heads(self.hidden, self.engine.lm_head)  # [K, V]
        top = torch.topk(logits, self.tree.topk, dim=-1).indices.view(-1)
        return Draft(torch.cat([root_t, top])[self.candidate_index], self.layout)

    def update(self, draft: Draft, out: ForwardOutput, acc: Acceptance) -> None:
        self.hidden = out.hidden.index_select(0, acc.nodes_t[-1:])[0]
        self.observe(draft.layout.n, acc.accepted_drafts + 1)

