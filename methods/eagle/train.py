"""``python -m harness train eagle``: EAGLE's draft head on the frozen model's own features.

Same self-distilled data and cached features as Medusa, FIRP and SpS (the final-norm hidden
states). For every answer position t the head reads (feature t plus uniform noise,
embedding of token t+1) and predicts feature t+1. EAGLE's two losses: feature regression
(smooth L1 against the real feature) plus token classification (KL from the frozen LM
head's distribution to the LM head applied to the prediction), weighted 1.0 and 0.1 as in
the paper.

Decoding feeds the head its own predicted features from the second draft level on, which
teacher forcing never shows it; on a 135M model that drift costs most of the deeper
levels' acceptance. So training unrolls ``steps`` draft levels (as EAGLE-3's
"training-time test" does): level j reads level j-1's predicted feature and the real token,
attends to the real prefix and to its own chain exactly as at decode time (one masked pass
over the real rows plus one row per anchor per level), and its loss is weighted
``step_decay ** (j-1)``. Validation is the same unroll without noise: the teacher-forced
accepted length of a greedy chain of ``steps`` levels. Only the head is trained and saved:
``fc`` and one decoder layer, in upstream's key names; embedding and LM head stay the target's own.
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
STEPS, STEP_DECAY = 3, 0.8


def _mask_dtype(device: torch.device) -> torch.dtype:
    kind = torch.device(device).type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.float32


def unroll(head: EagleHead, model: Any, ids: torch.Tensor, feats: torch.Tensor, start: int, steps: int,
           noise: float = 0.0, rng: torch.Generator | None = None) -> list[torch.Tensor]:
    """Predicted features of draft levels 1..steps for anchors t = start..T-2, [M, d] each.

    Level j's row for anchor t predicts feature t+j; it is fed (level j-1's prediction for
    t, or the real feature t at level 1; token t+j), sits at position t+j-1, and attends to
    the real rows 0..t and to its own chain's rows of levels 2..j, as the decoder's tree does.
    Rows whose token t+j lies beyond the sequence are padded (their losses are masked).
    """
    T, device = ids.shape[0], ids.device
    N = T - 1
    M = N - start
    layer = head.layers[0]
    inputs = feats[:N]
    if noise:
        inputs = inputs + (torch.rand(inputs.shape, generator=rng, device=device) - 0.5) * noise
    emb = model.model.embed_tokens(ids)
    anchor = torch.arange(start, N, device=device)
    rows = [head.fuse(emb[1:].to(inputs.dtype), inputs)]
    positions = [torch.arange(N, device=device)]
    preds: list[torch.Tensor] = []
    for level in range(1, steps + 1):
        if level > 1:
            token_at = torch.clamp(anchor + level, max=T - 1)
            rows.append(head.fuse(emb[token_at].to(preds[-1].dtype), preds[-1]))
            positions.append(anchor + level - 1)
        L = N + (level - 1) * M
        # visibility: real rows causal; level-j rows see real rows <= anchor and their own chain
        seen = torch.zeros((L, L), dtype=torch.bool, device=device)
        seen[:N, :N] = torch.ones((N, N), dtype=torch.bool, device=device).tril()
        for j in range(2, level + 1):
            r = slice(N + (j - 2) * M, N + (j - 1) * M)
            seen[r, :N] = torch.arange(N, device=device)[None] <= anchor[:, None]
            for k in range(2, j + 1):
                c = N + (k - 2) * M
                seen[r, c:c + M] = torch.eye(M, dtype=torch.bool, device=device)
        bias = torch.zeros((L, L), dtype=_mask_dtype(device), device=device)
        bias.masked_fill_(~seen, torch.finfo(bias.dtype).min)
        h = torch.cat(rows)[None]
        rope = model.model.rotary_emb(h, torch.cat(positions)[None])
        attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=rope,
                                  attention_mask=bias[None, None], **{cache_keyword(layer.self_attn): None})
        h = h + attn
        h = (h + layer.mlp(layer.post_attention_layernorm(h)))[0]
        preds.append(h[start:N] if level == 1 else h[N + (level - 2) * M:])
    return preds


def eagle_loss(head: EagleHead, model: Any, ids: torch.Tensor, feats: torch.Tensor, start: int, steps: int,
               noise: float, rng: torch.Generator | None) -> torch.Tensor:
    """Summed level losses over anchors t >= ``start`` (the answer); ``feats`` [T, d] are the real features."""
    T = ids.shape[0]
    preds = unroll(head, model, ids, feats, start, steps, noise, rng)
    M = T - 1 - start
    with torch.no_grad():
        teacher = F.log_softmax(model.lm_head(feats[start + 1:]).float(), dim=-1)  # position p at row p-start-1
    loss = feats.new_zeros((), dtype=torch.float32)
    for j, pred in enumerate(preds, start=1):
        valid = M - (j - 1)  # anchors whose target feature t+j exists
        if valid <= 0:
            break
        pred, target = pred[:valid], feats[start + j:start + j + valid]
        log_q = F.log_softmax(model.lm_head(pred).float(), dim=-1)
        regression = F.smooth_l1_loss(pred.float(), target.float())
        classification = F.kl_div(log_q, teacher[j - 1:j - 1 + valid], log_target=True, reduction="batchmean")
        loss = loss + STEP_DECAY ** (j - 1) * (REGRESSION_WEIGHT * regression + CLASSIFICATION_WEIGHT * classification)
    return loss


@torch.no_grad()
def target_greedy(model: Any, feats: torch.Tensor, start: int) -> torch.Tensor:
    """The model's greedy tokens after positions start+1..T-1 (row p-start-1 for position p). They
    depend only on the frozen features, so validation computes them once, not every time it runs."""
    return F.log_softmax(model.lm_head(feats[start + 1:]).float(), dim=-1).argmax(-1)


@torch.no_grad()
def chain_stats(head: EagleHead, model: Any, ids: torch.Tensor, feats: torch.Tensor, start: int, steps: int,
                want: torch.Tensor) -> dict[str, Any]:
    """The unroll without noise against ``want`` (``target_greedy``): level 1's top-1 and top-3
    hits and feature regression, and the greedy chain's accepted length at every anchor whose
    levels all have targets."""
    T = ids.shape[0]
    preds = unroll(head, model, ids, feats, start, steps)
    M = T - 1 - start
    correct = torch.zeros((M, steps), dtype=torch.bool, device=ids.device)
    stats: dict[str, Any] = {}
    for j, pred in enumerate(preds, start=1):
        valid = M - (j - 1)
        if valid <= 0:
            break
        pred = pred[:valid]
        top3 = F.log_softmax(model.lm_head(pred).float(), dim=-1).topk(3, dim=-1).indices
        hit = top3[:, 0] == want[j - 1:j - 1 + valid]
        correct[:valid, j - 1] = hit
        if j == 1:
            regression = F.smooth_l1_loss(pred.float(), feats[start + 1:start + 1 + valid].float())
            stats = {"n": int(valid), "top1": float(hit.sum()), "regression": float(regression),
                     "top3": float((top3 == want[:valid, None]).any(-1).sum())}
    full = max(0, M - (steps - 1))  # anchors with every level's target inside the sequence
    stats["chain"] = (1 + correct[:full].long().cumprod(dim=1).sum(dim=1)).float()
    stats["level_top1"] = correct[:full].float().sum(0)
    return stats


def _answer_start(item: dict[str, Any]) -> int:
    return max(0, item["prompt_len"] - 1)


@torch.no_grad()
def evaluate(head: EagleHead, model: Any, data: list[dict[str, Any]], feats: list, steps: int,
             wants: list[torch.Tensor | None] | None = None) -> dict[str, Any]:
    """Depth-1 accuracy and the unrolled chain's accepted length against the model's own greedy
    tokens (``wants``: each sequence's ``target_greedy``, when the caller keeps them)."""
    device = model.device
    agg = {"n": 0, "top1": 0.0, "top3": 0.0, "regression": 0.0}
    chains, level_hits = [], torch.zeros(steps)
    for j, (item, feat) in enumerate(zip(data, feats)):
        start = _answer_start(item)
        ids = torch.tensor(item["ids"], device=device)
        if len(ids) - 1 <= start:
            continue
        hidden = feat[-1].to(device).float()
        with autocast(device):
            want = wants[j] if wants is not None else target_greedy(model, hidden, start)
            s = chain_stats(head, model, ids, hidden, start, steps, want)
        for k in ("n", "top1", "top3"):
            agg[k] += s[k]
        agg["regression"] += s["regression"] * s["n"]
        chains.append(s["chain"].cpu())
        level_hits += s["level_top1"].cpu()
    n = max(1, agg["n"])
    chain = torch.cat(chains) if chains else torch.ones(1)
    return {"depth1": {"top1": agg["top1"] / n, "top3": agg["top3"] / n, "positions": agg["n"],
                       "regression": agg["regression"] / n},
            "chain": {"steps": steps, "accepted_length": float(chain.mean()), "anchors": int(chain.numel()),
                      "level_top1": [round(float(x) / max(1, chain.numel()), 4) for x in level_hits]}}


def train(config: TrainConfig, model: Any, tokenizer: Any, data: list[dict[str, Any]], data_key: str,
          toolkit: Toolkit) -> dict[str, Any]:
    out = prepare_out(config.out)
    device = model.device
    feats = cached_features(model, data, [-1], data_key, toolkit.cache_dir)
    model.float()  # frozen; bf16 autocast (where the machine has it) runs it fast, the head keeps fp32 masters
    model.requires_grad_(False)
    head = EagleHead(model.config, type(model.model.layers[0]), bias=False).to(device)
    noise = float(config.options.get("noise", NOISE))
    steps = int(config.options.get("steps", STEPS))
    train_idx, val_idx = split_train_val(list(range(len(data))), config.val_fraction, config.seed)
    ids = [torch.tensor(d["ids"]) for d in data]

    def loss_of(i: int, rng: random.Random) -> torch.Tensor | None:
        start = _answer_start(data[i])
        if len(ids[i]) - 1 <= start:
            return None
        gen = torch.Generator(device=device).manual_seed(rng.randrange(2**31))
        with autocast(device):
            return eagle_loss(head, model, ids[i].to(device), feats[i][-1].to(device).float(), start, steps,
                              noise, gen)

    val_data, val_feats = [data[i] for i in val_idx], [feats[i] for i in val_idx]
    with autocast(device):
        wants = [target_greedy(model, f[-1].to(device).float(), _answer_start(d))
                 if len(d["ids"]) - 1 > _answer_start(d) else None for d, f in zip(val_data, val_feats)]
    log = optimise(config, head, train_idx, loss_of, out, "training the EAGLE head",
                   lambda: evaluate(head, model, val_data, val_feats, steps, wants)["chain"]["accepted_length"])
    val = evaluate(head, model, val_data, val_feats, steps, wants)
    acc = val["depth1"]
    print(f"  depth 1: top-1 {acc['top1']:.1%}  top-3 {acc['top3']:.1%}  ({acc['positions']} val positions); "
          f"{steps}-level chain accepted length {val['chain']['accepted_length']:.3f}, per level top-1 "
          f"{val['chain']['level_top1']}", file=sys.stderr)
    meta = {"method": "eagle", "model": config.model, "architecture": "fc + 1 decoder layer (upstream key names)",
            "noise": noise, "unrolled_steps": steps, "step_decay": STEP_DECAY,
            "loss_weights": {"regression": REGRESSION_WEIGHT, "classification": CLASSIFICATION_WEIGHT},
            "val_accuracy": val, "val_metric": f"teacher-forced accepted length of a {steps}-level greedy chain",
            **log.meta(), "train_sequences": len(train_idx), "val_sequences": len(val_idx)}
    write_result(out, config, head.state_dict(), meta, "model.safetensors", dtype=torch.bfloat16)
    print(f"Wrote {out / 'model.safetensors'} and {out / 'config.json'} (training {log.elapsed / 60:.1f} min, {log.stopped})",
          file=sys.stderr)
    return meta
