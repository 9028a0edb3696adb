"""``python -m harness train sps``: distil a small draft from the target's first layers.

The draft has ``--option layers=N`` (default 2) decoder layers initialised from the
target's first N layers and its final norm, and uses the target's own embedding and LM
head (frozen, shared at load time, never saved). It learns the target's next-token
distributions on the self-distillation data that Medusa, FIRP and EAGLE use: KL(target ||
draft) on answer positions, the target's distributions taken from the cached final
features. The file holds only the draft's layers and norm, in bfloat16.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.core.training import (Toolkit, TrainConfig, autocast, cached_features, chain_accepted_length,
                                   optimise, prepare_out, split_train_val, write_result)
from methods.sps.decoder import LAYERS_FILE, init_from_target, layers_only_draft, load_own_state, own_state


def draft_loss(draft: nn.Module, model: Any, ids: torch.Tensor, final: torch.Tensor, start: int) -> torch.Tensor:
    """KL(target || draft) for the tokens after positions ``start``..T-2."""
    log_q = F.log_softmax(_draft_logits(draft, ids, start).float(), dim=-1)
    with torch.no_grad():
        teacher = F.log_softmax(model.lm_head(final[start:-1]).float(), dim=-1)
    return F.kl_div(log_q, teacher, log_target=True, reduction="batchmean")


def _draft_logits(draft: nn.Module, ids: torch.Tensor, start: int) -> torch.Tensor:
    return draft.lm_head(draft.model(input_ids=ids[None]).last_hidden_state[0, start:-1])


@torch.no_grad()
def target_greedy(model: Any, final: torch.Tensor, start: int) -> torch.Tensor:
    """The target's greedy tokens after positions ``start``..T-2. They depend only on the frozen
    features, so validation computes them once instead of an LM-head pass per sequence each time."""
    return F.log_softmax(model.lm_head(final[start:-1]).float(), dim=-1).argmax(-1)


@torch.no_grad()
def draft_agreement(draft: nn.Module, ids: torch.Tensor, start: int, want: torch.Tensor) -> torch.Tensor:
    """Where the draft's greedy token is the target's (``want``, from ``target_greedy``)."""
    return F.log_softmax(_draft_logits(draft, ids, start).float(), dim=-1).argmax(-1) == want


def train(config: TrainConfig, model: Any, tokenizer: Any, data: list[dict[str, Any]], data_key: str,
          toolkit: Toolkit) -> dict[str, Any]:
    out = prepare_out(config.out)
    device = model.device
    layers = int(config.options.get("layers", 2))
    feats = cached_features(model, data, [-1], data_key, toolkit.cache_dir)
    model.float()
    model.requires_grad_(False)
    draft = layers_only_draft(model, layers)
    init_from_target(draft, model)
    draft.to(device)
    trainable = nn.ModuleList([*draft.model.layers, draft.model.norm])
    trainable.requires_grad_(True)
    train_idx, val_idx = split_train_val(list(range(len(data))), config.val_fraction, config.seed)
    ids = [torch.tensor(d["ids"]) for d in data]
    starts = [max(0, d["prompt_len"] - 1) for d in data]  # the last prompt position: the answer's first target

    def loss_of(i: int, rng: random.Random) -> torch.Tensor | None:
        if len(ids[i]) - 1 <= starts[i]:
            return None
        with autocast(device):
            return draft_loss(draft, model, ids[i].to(device), feats[i][-1].to(device).float(), starts[i])

    gamma = int(config.options.get("gamma", 4))

    val_items = [i for i in val_idx if len(ids[i]) - 1 > starts[i]]
    with autocast(device):
        wants = {i: target_greedy(model, feats[i][-1].to(device).float(), starts[i]) for i in val_items}

    def validation() -> dict[str, float]:
        n = top1 = 0.0
        lengths = []
        for i in val_items:
            with autocast(device):
                agree = draft_agreement(draft, ids[i].to(device), starts[i], wants[i])
            n, top1 = n + agree.numel(), top1 + float(agree.sum())
            lengths.append(chain_accepted_length(agree.cpu(), gamma).float())
        return {"top1_agreement": top1 / max(1.0, n), "positions": int(n),
                f"chain_accepted_length_gamma{gamma}": float(torch.cat(lengths).mean()) if lengths else 1.0}

    log = optimise(config, trainable, train_idx, loss_of, out, f"distilling a {layers}-layer draft",
                   lambda: validation()[f"chain_accepted_length_gamma{gamma}"], load_saved=lambda state: load_own_state(draft, state))
    with torch.no_grad():
        val = validation()
    print(f"  draft top-1 = target's greedy token on {val['top1_agreement']:.1%} of {val['positions']} val positions; "
          f"teacher-forced accepted length at gamma {gamma}: {val[f'chain_accepted_length_gamma{gamma}']:.3f}",
          file=sys.stderr)
    meta = {"method": "sps", "model": config.model, "num_layers": layers,
            "init": f"the target's first {layers} layers and final norm; embedding and LM head shared with the target",
            "val_accuracy": val, "val_metric": f"teacher-forced chain accepted length at gamma {gamma}",
            **log.meta(), "train_sequences": len(train_idx), "val_sequences": len(val_idx)}
    write_result(out, config, own_state(draft), meta, LAYERS_FILE, dtype=torch.bfloat16)
    print(f"Wrote {out / LAYERS_FILE} and {out / 'config.json'} (training {log.elapsed / 60:.1f} min, {log.stopped})", file=sys.stderr)
    return meta
