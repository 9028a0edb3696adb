"""``python -m harness train eagle``: EAGLE's draft head on the frozen model's own features.

Same self-distilled data and cached features as Medusa and FIRP (the final-norm hidden
states). For every position t of a sequence the head reads (feature t plus uniform noise,
embedding of token t+1) and predicts feature t+1, causally over the whole sequence in
one pass. EAGLE's two losses: feature regression (smooth L1 against the real feature
t+1) plus token classification (KL from the frozen LM head's distribution at t+1 to the
LM head applied to the prediction), weighted 1.0 and 0.1 as in the paper, on answer
positions. Only the head is trained and saved: ``fc`` and one decoder layer, in
upstream's key names; embedding and LM head stay the target's own.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import torch
import torch.nn.functional as F

from methods.core.engine import cache_keyword
from methods.core.training import (Toolkit, TrainConfig, autocast, cached_features, optimise, prepare_out,
                                   split_train_val, write_result)
from methods.eagle.decoder import EagleHead

REGRESSION_WEIGHT, CLASSIFICATION_WEIGHT, NOISE = 1.0, 0.1, 0.2  # EAGLE's: U(-0.1, 0.1) input noise


def head_forward(head: EagleHead, model: Any, fused: torch.Tensor) -> torch.Tensor:
    """The head's layer over a whole sequence [T, d], causally, without a cache (training and evaluation)."""
    layer = head.layers[0]
    T = fused.shape[0]
    pos = torch.arange(T, device=fused.device)[None]
    rope = model.model.rotary_emb(fused[None], pos)
    h = fused[None]
    attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=rope, attention_mask=None,
                              **{cache_keyword(layer.self_attn): None})
    h = h + attn
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h[0]


def eagle_loss(head: EagleHead, model: Any, ids: torch.Tensor, feats: torch.Tensor, start: int,
               noise: float, rng: torch.Generator | None,
               need_stats: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """Loss over pairs t >= ``start`` (the answer); ``feats`` [T, d] are the real final-norm features."""
    inputs = feats[:-1]
    if noise:
        inputs = inputs + (torch.rand(inputs.shape, generator=rng, device=inputs.device) - 0.5) * noise
    fused = head.fuse(model.model.embed_tokens(ids[1:]).to(inputs.dtype), inputs)
    pred = head_forward(head, model, fused)[start:]
    target = feats[1:][start:]
    regression = F.smooth_l1_loss(pred.float(), target.float())
    with torch.no_grad():
        teacher = F.log_softmax(model.lm_head(target).float(), dim=-1)
    log_q = F.log_softmax(model.lm_head(pred).float(), dim=-1)
    classification = F.kl_div(log_q, teacher, log_target=True, reduction="batchmean")
    loss = REGRESSION_WEIGHT * regression + CLASSIFICATION_WEIGHT * classification
    stats: dict[str, Any] = {}
    if need_stats:
        with torch.no_grad():
            want = teacher.argmax(-1)
            top3 = log_q.topk(3, dim=-1).indices
            stats = {"n": int(want.numel()), "top1": float((top3[:, 0] == want).sum()),
                     "top3": float((top3 == want[:, None]).any(-1).sum()), "regression": float(regression)}
    return loss, stats


@torch.no_grad()
def evaluate(head: EagleHead, model: Any, data: list[dict[str, Any]], feats: list) -> dict[str, Any]:
    """Depth-1 accuracy against the model's own greedy tokens, on held-out sequences."""
    device = model.device
    agg = {"n": 0, "top1": 0.0, "top3": 0.0, "regression": 0.0}
    for item, feat in zip(data, feats):
        start = max(0, item["prompt_len"] - 1)
        ids = torch.tensor(item["ids"], device=device)
        if len(ids) - 1 <= start:
            continue
        with autocast(device):
            _, s = eagle_loss(head, model, ids, feat[-1].to(device).float(), start, 0.0, None, need_stats=True)
        for k in ("n", "top1", "top3"):
            agg[k] += s[k]
        agg["regression"] += s["regression"] * s["n"]
    n = max(1, agg["n"])
    return {"depth1": {"top1": agg["top1"] / n, "top3": agg["top3"] / n, "positions": agg["n"],
                       "regression": agg["regression"] / n}}


def train(config: TrainConfig, model: Any, tokenizer: Any, data: list[dict[str, Any]], data_key: str,
          toolkit: Toolkit) -> dict[str, Any]:
    out = prepare_out(config.out)
    device = model.device
    feats = cached_features(model, data, [-1], data_key, toolkit.cache_dir)
    model.float()  # frozen; bf16 autocast runs it fast while the head keeps fp32 masters
    model.requires_grad_(False)
    head = EagleHead(model.config, type(model.model.layers[0]), bias=False).to(device)
    noise = float(config.options.get("noise", NOISE))
    train_idx, val_idx = split_train_val(list(range(len(data))), config.val_fraction, config.seed)
    ids = [torch.tensor(d["ids"]) for d in data]

    def loss_of(i: int, rng: random.Random) -> torch.Tensor | None:
        start = max(0, data[i]["prompt_len"] - 1)
        if len(ids[i]) - 1 <= start:
            return None
        gen = torch.Generator(device=device).manual_seed(rng.randrange(2**31))
        with autocast(device):
            return eagle_loss(head, model, ids[i].to(device), feats[i][-1].to(device).float(), start, noise, gen)[0]

    elapsed, losses = optimise(config, head, train_idx, loss_of, out, "training the EAGLE head")
    val = evaluate(head, model, [data[i] for i in val_idx], [feats[i] for i in val_idx])
    acc = val["depth1"]
    print(f"  depth 1: top-1 {acc['top1']:.1%}  top-3 {acc['top3']:.1%}  ({acc['positions']} val positions)",
          file=sys.stderr)
    meta = {"method": "eagle", "model": config.model, "architecture": "fc + 1 decoder layer (upstream key names)",
            "noise": noise, "loss_weights": {"regression": REGRESSION_WEIGHT, "classification": CLASSIFICATION_WEIGHT},
            "val_accuracy": val, "train_time_s": round(elapsed, 1), "train_sequences": len(train_idx),
            "train_steps": len(losses), "train_loss": [round(x, 5) for x in losses], "val_sequences": len(val_idx)}
    write_result(out, config, head.state_dict(), meta, "model.safetensors")
    print(f"Wrote {out / 'model.safetensors'} and {out / 'config.json'} (training {elapsed / 60:.1f} min)",
          file=sys.stderr)
    return meta
