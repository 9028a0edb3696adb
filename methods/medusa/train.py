"""``python -m harness train medusa``: Medusa-1 heads on the frozen model's last hidden state.

Self-distillation: the targets are the base model's own next-token distributions,
recomputed from cached final hidden states (one frozen LM-head matmul), and the loss is
KL(base || head) summed over heads. Head k at position t learns the base distribution
at position t+k, i.e. token t+k+1.
"""

from __future__ import annotations

import random
import sys

from typing import Any

import torch
import torch.nn.functional as F

from methods.core.training import Toolkit, autocast, TrainConfig, cached_features, optimise, prepare_out, split_train_val, write_result
from methods.core.tree import best_tree_paths, expected_accepted_length, tree_search, tree_search_default
from methods.medusa.decoder import MedusaHeads


def _positions(item: dict[str, Any]) -> tuple[int, int]:
    """Answer positions: from the last prompt token (which predicts the first answer token) on."""
    return max(0, item["prompt_len"] - 1), len(item["ids"])


def head_losses(heads: MedusaHeads, lm_head: torch.nn.Module, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """Sum over heads of KL(base at t+k || head k at t), for t in [start, T-k)."""
    T = hidden.shape[0]
    with torch.no_grad():  # base next-token dists, only where some head needs them: positions start+1..T-1
        teacher = F.log_softmax(lm_head(hidden[start + 1:]).float(), dim=-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for k in range(1, heads.num_heads + 1):
        src = hidden[start:T - k]
        if src.shape[0] == 0:
            continue
        log_q = F.log_softmax(_head_logits(heads, lm_head, k, src).float(), dim=-1)
        total = total + F.kl_div(log_q, teacher[k - 1:], log_target=True, reduction="batchmean")
    return total


def _head_logits(heads: MedusaHeads, lm_head: torch.nn.Module, k: int, src: torch.Tensor) -> torch.Tensor:
    logits = heads.heads[k - 1](src)
    return lm_head(logits) if heads.layout == "shared" else logits


@torch.no_grad()
def target_greedy(lm_head: torch.nn.Module, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """The base model's greedy tokens after positions start+1..T-1: what head k at position t
    must rank first is row t+k-start-1. They depend only on the frozen features, so validation
    computes them once instead of one LM-head pass per sequence every time it runs."""
    return F.log_softmax(lm_head(hidden[start + 1:]).float(), dim=-1).argmax(-1)


@torch.no_grad()
def head_ranks(heads: MedusaHeads, lm_head: torch.nn.Module, hidden: torch.Tensor, start: int,
               want: torch.Tensor) -> list[dict[str, Any]]:
    """Per head: positions, top-1 and top-3 hits and the rank of the base model's greedy token
    (``want``, from ``target_greedy``) at every position t in [start, T-k)."""
    T = hidden.shape[0]
    stats = []
    for k in range(1, heads.num_heads + 1):
        src = hidden[start:T - k]
        if src.shape[0] == 0:
            stats.append({"n": 0, "top1": 0.0, "top3": 0.0, "ranks": torch.zeros(0, dtype=torch.long)})
            continue
        log_q = F.log_softmax(_head_logits(heads, lm_head, k, src).float(), dim=-1)
        target = want[k - 1:]
        top3 = log_q.topk(3, dim=-1).indices
        rank = (log_q > log_q.gather(1, target[:, None])).sum(-1)
        stats.append({"n": int(target.numel()), "top1": float((top3[:, 0] == target).sum()),
                      "top3": float((top3 == target[:, None]).any(-1).sum()), "ranks": rank})
    return stats


@torch.no_grad()
def evaluate(heads: MedusaHeads, lm_head: torch.nn.Module, data: list, feats: list,
             wants: list[torch.Tensor] | None = None) -> tuple[dict[str, Any], torch.Tensor, list[int]]:
    """Per-head accuracy, the ranks of the true tokens at every answer position (in order)
    and the positions per sequence, which the decoding walk of ``tree_search`` needs.
    ``wants``: each sequence's ``target_greedy`` tokens, when the caller keeps them."""
    agg = [{"n": 0, "top1": 0.0, "top3": 0.0} for _ in range(heads.num_heads)]
    ranks, lengths = [], []
    device = lm_head.weight.device
    for j, (item, feat) in enumerate(zip(data, feats)):
        start, _ = _positions(item)
        hidden = feat[-1].to(device).float()
        with autocast(device):
            want = wants[j] if wants is not None else target_greedy(lm_head, hidden, start)
            stats = head_ranks(heads, lm_head, hidden, start, want)
        for a, s in zip(agg, stats):
            for key in a:
                a[key] += s[key]
        n = min(len(s["ranks"]) for s in stats)  # positions where every head has a target
        if n:
            ranks.append(torch.stack([s["ranks"][:n] for s in stats], dim=1).cpu())
            lengths.append(n)
    accuracy = {f"head{k + 1}": {"top1": a["top1"] / max(1, a["n"]), "top3": a["top3"] / max(1, a["n"]),
                                 "positions": a["n"]} for k, a in enumerate(agg)}
    return accuracy, (torch.cat(ranks) if ranks else torch.zeros((0, heads.num_heads), dtype=torch.long)), lengths


def train(config: TrainConfig, model: Any, tokenizer: Any, data: list[dict[str, Any]], data_key: str,
          toolkit: Toolkit) -> dict[str, Any]:
    out = prepare_out(config.out)
    num_heads = int(config.options.get("heads", 3))
    layout = config.options.get("layout", "shared")
    feats = cached_features(model, data, [-1], data_key, toolkit.cache_dir)
    train_idx, val_idx = split_train_val(list(range(len(data))), config.val_fraction, config.seed)
    cfg = model.config
    device = model.device
    lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device)
    lm_head.weight.data.copy_(model.lm_head.weight.data.float())
    lm_head.requires_grad_(False)
    heads = MedusaHeads(cfg.hidden_size, cfg.vocab_size, num_heads, layout).to(device)
    if layout == "upstream":  # per-head LM heads start from the base LM head, as upstream does
        for head in heads.heads:
            head[1].weight.data.copy_(lm_head.weight.data)

    def loss_of(i: int, rng: random.Random) -> torch.Tensor:
        start = _positions(data[i])[0]
        with autocast(device):
            return head_losses(heads, lm_head, feats[i][-1].to(device).float(), start)

    tree_size = int(config.options.get("tree_size", 12))
    val_data, val_feats = [data[i] for i in val_idx], [feats[i] for i in val_idx]
    with autocast(device):
        val_wants = [target_greedy(lm_head, f[-1].to(device).float(), _positions(d)[0]) for d, f in zip(val_data, val_feats)]

    def validate() -> float:  # teacher-forced accepted length of the best tree of the default size
        ranks = evaluate(heads, lm_head, val_data, val_feats, val_wants)[1]
        return expected_accepted_length(ranks, best_tree_paths(ranks, tree_size))

    log = optimise(config, heads, train_idx, loss_of, out, "training medusa heads", validate,
                   load_saved=heads.load_upstream_state_dict)
    val, ranks, lengths = evaluate(heads, lm_head, val_data, val_feats, val_wants)
    for name, acc in val.items():
        print(f"  {name}: top-1 {acc['top1']:.1%}  top-3 {acc['top3']:.1%}  ({acc['positions']} val positions)",
              file=sys.stderr)
    meta = {"method": "medusa", "model": config.model, "num_heads": num_heads, "layout": layout,
            "default_tree": config.options.get("tree") or tree_search_default(ranks, tree_size),
            "tree_search": tree_search(ranks, lengths=lengths), "val_accuracy": val,
            **log.meta(), "val_metric": f"teacher-forced accepted length, best {tree_size}-node tree",
            "train_sequences": len(train_idx), "val_sequences": len(val_idx)}
    write_result(out, config, heads.upstream_state_dict(), meta, "heads.safetensors")
    print(f"Wrote {out / 'heads.safetensors'} and {out / 'config.json'} "
          f"(training {log.elapsed / 60:.1f} min, {log.stopped})", file=sys.stderr)
    return meta


