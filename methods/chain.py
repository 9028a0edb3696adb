"""Verifying a linear chain of drafts (PLD, self-speculative): one causal pass, keep the matching prefix."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from methods.engine import Engine


def verify_chain(engine: Engine, root: int, drafts: Sequence[int]) -> tuple[list[int], torch.Tensor]:
    """Feed ``[root, *drafts]`` after the cache; commit root and the accepted drafts.

    Returns (new tokens = accepted drafts + the bonus token, the pass's final hidden states).
    The root was emitted by the previous step, so it is committed but not returned.
    """
    tokens = [root, *drafts]
    out = engine.forward(tokens)
    greedy = out.logits.argmax(dim=-1)
    if drafts:
        match = torch.tensor(list(drafts), device=greedy.device) == greedy[:-1]
        accepted = int(match.to(torch.int32).cumprod(0).sum())
    else:
        accepted = 0
    engine.cache.commit(accepted + 1)
    return list(drafts[:accepted]) + [int(greedy[accepted])], out.hidden
