"""``python -m harness train firp``: the K maps W_k of FIRP on the frozen model.

Whole sequences at once: the frozen model's hidden states at layer l_1 are cached; each
training sequence then runs the later layers over [real tokens + K pseudo tokens per
anchor] with one custom float mask (pseudo (t,k) sees real tokens <= t and, serialized,
its own chain's earlier steps), positions t+k. The pseudo chains are built by exactly
the same ``methods.firp.injections`` closures that inference uses, so training and
decoding cannot drift apart. Loss: KL(base distribution at real position t+k || pseudo
(t,k) decoded by the final norm and LM head), summed over k.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import torch
import torch.nn.functional as F

from methods.core.engine import cache_keyword
from methods.core.errors import UserError
from methods.core.training import Toolkit, autocast, TrainConfig, cached_features, optimise, prepare_out, split_train_val, write_result
from methods.core.tree import best_tree_paths, expected_accepted_length, tree_search, tree_search_default
from methods.firp.decoder import FirpMaps, build_plan, injections, map_input


class _RealThenPseudo:
    """The cache argument of one pass: a layer's first call (the real tokens) stores its keys and
    values, the second (the pseudo tokens) attends over them followed by its own."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_: object,
               **__: object) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self.kv:
            self.kv[layer_idx] = (key, value)
            return key, value
        real_k, real_v = self.kv.pop(layer_idx)
        return torch.cat([real_k, key], dim=-2), torch.cat([real_v, value], dim=-2)


def pseudo_forward(model: Any, maps: FirpMaps, h_start: torch.Tensor, anchors: torch.Tensor,
                   capture: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run layers l_1..L over a sequence's real states [T, D] plus the anchors' chains.

    Returns the pseudo tokens' final (normed) hidden states [K, a, D], step-major, and, if
    ``capture``, every layer's hidden states, real rows then pseudo rows (for the analysis of
    pseudo vs real).

    The real tokens never see a pseudo token and do not depend on the maps, so each layer runs
    them first without gradients, and then the pseudo tokens alone, with gradients, attending
    to the real tokens' keys and values and to each other: the backward pass only covers the
    pseudo rows, and the result equals one pass over both.
    """
    backbone = model.model
    T, device = h_start.shape[0], h_start.device
    causal = torch.ones((T, T), dtype=torch.bool).tril()
    plan = build_plan(maps, causal[anchors.cpu()], anchors.tolist())
    injs = {inj.layer: inj for inj in injections(maps, plan, anchors.to(device), device)}
    neg = torch.finfo(torch.float32).min
    cache_kw = cache_keyword(backbone.layers[0].self_attn)
    real = h_start[None].detach()
    real_rope = backbone.rotary_emb(real, torch.arange(T, device=device)[None])
    real_mask = torch.where(causal.to(device), 0.0, neg)[None, None].to(real.dtype)
    pseudo = real[:, :0]
    pos = torch.zeros(0, dtype=torch.long, device=device)
    visible = torch.zeros((0, T), dtype=torch.bool, device=device)  # what each pseudo row sees
    mask = rope = None
    captured = []
    for i in range(maps.layers[0], len(backbone.layers)):
        inj = injs.get(i)
        if inj is not None:
            extra, extra_pos, vis = inj.make(torch.cat([real, pseudo], dim=1))
            m = extra.shape[1]
            visible = torch.cat([torch.cat([visible, visible.new_zeros((visible.shape[0], m))], dim=1),
                                 vis.to(device)])
            pseudo = torch.cat([pseudo, extra.to(real.dtype)], dim=1)
            pos = torch.cat([pos, extra_pos.to(device)])
            mask = rope = None
        if mask is None:
            mask = torch.where(visible, 0.0, neg)[None, None].to(real.dtype)
            rope = backbone.rotary_emb(pseudo, pos[None])
        if capture:
            captured.append(torch.cat([real, pseudo], dim=1)[0])
        layer, kv = backbone.layers[i], _RealThenPseudo()
        with torch.no_grad():
            attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(real), position_embeddings=real_rope,
                                      attention_mask=real_mask, **{cache_kw: kv})
            real_next = real + attn
            real_next = real_next + layer.mlp(layer.post_attention_layernorm(real_next))
        attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(pseudo), position_embeddings=rope,
                                  attention_mask=mask, **{cache_kw: kv})
        pseudo = pseudo + attn
        pseudo = pseudo + layer.mlp(layer.post_attention_layernorm(pseudo))
        real = real_next
    final = backbone.norm(pseudo)[0]
    return final.view(maps.K, len(anchors), -1), captured


def anchor_positions(item: dict[str, Any], K: int, limit: int | None, rng: random.Random) -> list[int]:
    """Answer positions whose K targets all lie inside the sequence (optionally a random subset)."""
    first, last = max(0, item["prompt_len"] - 1), len(item["ids"]) - 1 - K
    anchors = list(range(first, last + 1))
    if limit and len(anchors) > limit:
        anchors = sorted(rng.sample(anchors, limit))
    return anchors


def firp_loss(model: Any, lm_head: torch.nn.Module, maps: FirpMaps, feats: dict[int, torch.Tensor],
              anchors: list[int], need_stats: bool = False,
              weights: list[float] | None = None) -> tuple[torch.Tensor, list[dict[str, float]]]:
    device = model.device
    idx = torch.tensor(anchors, device=device)
    pseudo, _ = pseudo_forward(model, maps, feats[maps.layers[0]].to(device).float(), idx)
    final = feats[-1].to(device).float()
    total = pseudo.new_zeros((), dtype=torch.float32)
    stats = []
    for k in range(maps.K):
        with torch.no_grad():
            teacher = F.log_softmax(lm_head(final[idx + k + 1]).float(), dim=-1)
        log_q = F.log_softmax(lm_head(pseudo[k]).float(), dim=-1)
        weight = 1.0 if weights is None else weights[k]
        total = total + weight * F.kl_div(log_q, teacher, log_target=True, reduction="batchmean")
        if need_stats:
            want = teacher.argmax(-1)
            top3 = log_q.topk(3, dim=-1).indices
            stats.append({"n": len(anchors), "top1": float((top3[:, 0] == want).sum()),
                          "top3": float((top3 == want[:, None]).any(-1).sum()),
                          "ranks": (log_q > log_q.gather(1, want[:, None])).sum(-1)})
    return total, stats


@torch.no_grad()
def evaluate(model, lm_head, maps, data, feats,
             anchors_per_seq: int | None) -> tuple[dict[str, Any], torch.Tensor, list[int]]:
    """Per-step accuracy, per-anchor ranks of the true tokens, and anchors per sequence
    (with ``anchors_per_seq=None`` every answer position, in order: what the decoding walk needs)."""
    agg = [{"n": 0, "top1": 0.0, "top3": 0.0} for _ in range(maps.K)]
    rng = random.Random(0)
    ranks, lengths = [], []
    for item, feat in zip(data, feats):
        anchors = anchor_positions(item, maps.K, anchors_per_seq, rng)
        if not anchors:
            continue
        lengths.append(len(anchors))
        with autocast(model.device):
            _, stats = firp_loss(model, lm_head, maps, feat, anchors, need_stats=True)
        for a, s in zip(agg, stats):
            for key in a:
                a[key] += s[key]
        ranks.append(torch.stack([s["ranks"] for s in stats], dim=1).cpu())
    accuracy = {f"step{k + 1}": {"top1": a["top1"] / max(1, a["n"]), "top3": a["top3"] / max(1, a["n"]),
                                 "positions": a["n"]} for k, a in enumerate(agg)}
    return accuracy, (torch.cat(ranks) if ranks else torch.zeros((0, maps.K), dtype=torch.long)), lengths


@torch.no_grad()
def ridge_init(maps: FirpMaps, data: list[dict[str, Any]], feats: list, train_idx: list[int],
               ridge: float = 1e-3) -> dict[str, float]:
    """Least-squares W_k (with bias) from what W_k reads to the real hidden state of position
    t+k+1 at the same layer, over every answer anchor of the training sequences.

    Closed form on the cached features (a d x d solve per step, seconds), so KL fine-tuning
    starts from the best linear predictor instead of identity. ``ridge`` scales the
    regulariser by the mean diagonal of X^T X. Returns each step's R^2 on the fitted data.
    """
    layer = maps.layers[0]
    fits: dict[str, float] = {}
    for k in range(maps.K):
        if maps.layers[k] != layer:
            continue  # a map entering at another layer keeps identity (its features are not cached)
        xtx = xty = ys = None
        n = 0
        y2 = torch.zeros((), dtype=torch.float64)
        for i in train_idx:
            h = feats[i][layer].double()
            first, last = max(0, data[i]["prompt_len"] - 1), h.shape[0] - 1 - (k + 1)
            if last < first:
                continue
            t = torch.arange(first, last + 1)
            prev = h[t + k] if maps.mode == "serialized" else h[t]  # what pseudo k-1 approximates
            x = torch.cat([map_input(maps.input, prev, h[t]), torch.ones(len(t), 1, dtype=h.dtype)], dim=1)
            y = h[t + k + 1]
            xtx = x.T @ x if xtx is None else xtx + x.T @ x
            xty = x.T @ y if xty is None else xty + x.T @ y
            ys = y.sum(0) if ys is None else ys + y.sum(0)
            y2 += (y * y).sum()
            n += len(t)
        if xtx is None:
            continue
        reg = ridge * xtx.diagonal()[:-1].mean()
        eye = torch.eye(xtx.shape[0], dtype=xtx.dtype)
        eye[-1, -1] = 0  # the bias is not shrunk
        w = torch.linalg.solve(xtx + reg * eye, xty)  # [d_in + 1, d]
        sse = y2 - 2 * (w * xty).sum() + (w * (xtx @ w)).sum()
        sst = y2 - (ys * ys).sum() / n
        fits[f"step{k + 1}"] = round(float(1 - sse / sst), 4)
        maps.maps[k].weight.copy_(w[:-1].T.to(maps.maps[k].weight.dtype))
        maps.maps[k].bias.copy_(w[-1].to(maps.maps[k].bias.dtype))
    return fits


def parse_step_weights(value: Any, K: int) -> list[float]:
    """Per-step KL weights: a later step can only be accepted after every earlier one, so
    its loss is worth less to the accepted length; "1,0.7,0.5" says so explicitly."""
    parts = [float(x) for x in str(value).split(",") if x.strip()] if not isinstance(value, (list, tuple)) else [float(x) for x in value]
    if len(parts) == 1:
        parts = parts * K
    if len(parts) != K or any(w < 0 for w in parts):
        raise ValueError(f"step_weights must be one value or K={K} non-negative values, got {value!r}")
    return parts


def parse_layers(value: Any, K: int, num_layers: int) -> list[int]:
    if isinstance(value, str):
        parts = [int(x) for x in value.replace("x", ",").split(",") if x.strip()]
    elif isinstance(value, int):
        parts = [value]
    else:
        parts = list(value)
    layers = parts * K if len(parts) == 1 else parts
    if len(layers) != K or not all(0 < x < num_layers for x in layers):
        raise ValueError(f"layers must be one value or K={K} values in 1..{num_layers - 1}, got {value!r}")
    return layers


def train(config: TrainConfig, model: Any, tokenizer: Any, data: list[dict[str, Any]], data_key: str,
          toolkit: Toolkit) -> dict[str, Any]:
    out = prepare_out(config.out)
    opts = config.options
    K = int(opts.get("K", 3))
    try:
        layers = parse_layers(opts.get("layers", 10), K, model.config.num_hidden_layers)
        maps = FirpMaps(model.config.hidden_size, layers, opts.get("mode", "serialized"), opts.get("input", "prev"))
        step_weights = parse_step_weights(opts.get("step_weights", 1.0), K)
    except ValueError as exc:
        raise UserError(f"bad FIRP option: {exc}") from None
    anchors_per_seq = int(opts.get("anchors_per_seq", 48))
    feats = cached_features(model, data, [layers[0], -1], data_key, toolkit.cache_dir)
    model.float()  # frozen layers under bf16 autocast where the machine has it; fp32 masters keep W_k exact
    maps.to(model.device)
    model.requires_grad_(False)
    train_idx, val_idx = split_train_val(list(range(len(data))), config.val_fraction, config.seed)
    lm_head = model.lm_head
    tree_size = int(opts.get("tree_size", 4))
    val_data, val_feats = [data[i] for i in val_idx], [feats[i] for i in val_idx]

    def validate() -> float:  # teacher-forced accepted length of the best tree of the default size
        ranks = evaluate(model, lm_head, maps, val_data, val_feats, anchors_per_seq)[1]
        return expected_accepted_length(ranks, best_tree_paths(ranks, tree_size))

    init = opts.get("init", "ridge")
    if init not in ("ridge", "identity"):
        raise UserError(f"bad FIRP option init={init!r}; valid: ridge, identity")
    if config.init_from:  # optimise() loads them (a ridge fit would be overwritten)
        init = "from " + config.init_from
    init_report: dict[str, Any] = {"init": init}
    if init == "ridge":
        init_report["ridge_r2"] = ridge_init(maps, data, feats, train_idx)
        print(f"  ridge init: R^2 {init_report['ridge_r2']}", file=sys.stderr)

    def loss_of(i: int, rng: random.Random) -> torch.Tensor | None:
        anchors = anchor_positions(data[i], K, anchors_per_seq, rng)
        if not anchors:
            return None
        with autocast(model.device):
            return firp_loss(model, lm_head, maps, feats[i], anchors, weights=step_weights)[0]

    log = optimise(config, maps, train_idx, loss_of, out, "training FIRP maps", validate)
    if log.curve and log.curve[0]["step"] == 0:
        init_report["val_after_init"] = round(log.curve[0]["value"], 4)
    # every anchor of the validation answers, so the tree table can walk them as decoding does
    val, ranks, lengths = evaluate(model, lm_head, maps, val_data, val_feats, None)
    for name, acc in val.items():
        print(f"  {name}: top-1 {acc['top1']:.1%}  top-3 {acc['top3']:.1%}  ({acc['positions']} val positions)",
              file=sys.stderr)
    meta = {"method": "firp", "model": config.model, **maps.config(), "K": K,
            "step_weights": step_weights, **init_report, "default_tree": opts.get("tree") or tree_search_default(ranks, tree_size),
            "tree_search": tree_search(ranks, lengths=lengths), "val_accuracy": val,
            **log.meta(), "val_metric": f"teacher-forced accepted length, best {tree_size}-node tree",
            "train_sequences": len(train_idx), "val_sequences": len(val_idx), "anchors_per_seq": anchors_per_seq}
    write_result(out, config, maps.state_dict(), meta, "firp.safetensors")
    print(f"Wrote {out / 'firp.safetensors'} and {out / 'config.json'} "
          f"(training {log.elapsed / 60:.1f} min, {log.stopped})", file=sys.stderr)
    return meta
