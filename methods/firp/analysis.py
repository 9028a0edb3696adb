"""``python -m harness analyze firp``: what FIRP's pseudo hidden states look like inside the model.

* cosine similarity between each pseudo state (t, k) and the real hidden state of the
  token it stands for (position t+k), layer by layer from the insertion layer to the
  final norm: the paper claims the gap narrows with depth;
* per-step top-1 / top-3 accuracy against the model's own greedy tokens;
* optionally the same for a second set of maps (e.g. ``--compare`` parallel vs serialized).

Runs on held-out self-distilled sequences (the trainers' validation split), and writes
JSON that ``report`` shows when it sits in the run folder as ``firp_analysis.json``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from methods.core.errors import UserError
from methods.core.training import Toolkit, split_train_val


@torch.no_grad()
def analyze_maps(model: Any, maps: Any, data: list[dict[str, Any]], anchors_per_seq: int = 32) -> dict[str, Any]:
    from methods.firp.train import anchor_positions, pseudo_forward

    backbone = model.model
    first = maps.layers[0]
    n_layers = len(backbone.layers)
    cos_sum = torch.zeros(maps.K, n_layers - first + 1, dtype=torch.float64)
    top1 = torch.zeros(maps.K)
    top3 = torch.zeros(maps.K)
    count = 0
    rng = random.Random(0)
    for item in data:
        anchors = anchor_positions(item, maps.K, anchors_per_seq, rng)
        if not anchors:
            continue
        ids = torch.tensor([item["ids"]], device=model.device)
        hs = backbone(input_ids=ids, output_hidden_states=True).hidden_states  # [0]=embeddings, [-1]=final norm
        idx = torch.tensor(anchors, device=model.device)
        pseudo, captured = pseudo_forward(model, maps, hs[first][0].float(), idx, capture=True)
        T, a = len(item["ids"]), len(anchors)
        final_real = hs[-1][0].float()
        for k in range(maps.K):
            target_pos = idx + k + 1
            rows = T + k * a + torch.arange(a, device=model.device)
            for j, layer_h in enumerate(captured):  # entering layer first + j
                real = hs[first + j][0].float()[target_pos]
                if layer_h.shape[0] > rows.max():
                    cos_sum[k, j] += F.cosine_similarity(layer_h[rows].float(), real, dim=-1).sum().double().cpu()
            cos_sum[k, -1] += F.cosine_similarity(pseudo[k].float(), final_real[target_pos], dim=-1).sum().double().cpu()
            want = model.lm_head(final_real[target_pos]).argmax(-1)
            logits = model.lm_head(pseudo[k].to(model.lm_head.weight.dtype))
            t3 = logits.topk(3, dim=-1).indices
            top1[k] += (t3[:, 0] == want).sum().cpu()
            top3[k] += (t3 == want[:, None]).any(-1).sum().cpu()
        count += a
    layers = [first + j for j in range(n_layers - first)] + ["final"]
    return {
        "config": maps.config(),
        "positions": count,
        "cosine_by_layer": {f"step{k + 1}": {str(layer): round(float(cos_sum[k, j] / max(1, count)), 4)
                                             for j, layer in enumerate(layers)} for k in range(maps.K)},
        "accuracy": {f"step{k + 1}": {"top1": round(float(top1[k] / max(1, count)), 4),
                                      "top3": round(float(top3[k] / max(1, count)), 4)} for k in range(maps.K)},
    }


def analyze(args: dict[str, Any], toolkit: Toolkit) -> dict[str, Any]:
    """``harness analyze firp``: ``args`` holds model, weights, compare, data, out, sequences, device."""
    from methods.firp.decoder import load_firp, shipped_weights

    model_name = args["model"]
    path = Path(args["weights"]) if args.get("weights") else shipped_weights(model_name)
    if path is None:
        raise UserError(f"no FIRP weights for {model_name!r}; pass --weights DIR (from `harness train firp`)")
    if not args.get("data"):
        raise UserError("--data needs the training files the maps were trained on (the validation split is used)")
    toolkit.check_model(model_name)
    files = [Path(f) for f in args["data"]]
    toolkit.training_prompts(files, limit=1, seed=0)  # refuses evaluation files before the model loads
    model, tok = toolkit.load_model(model_name, device=args.get("device", "cpu"), dtype="bfloat16")
    data = toolkit.training_sequences(model, tok, model_name, files, limit=1200, seed=0, max_new_tokens=96)
    _, val = split_train_val(list(range(len(data))), 0.05, 0)
    held_out = [data[i] for i in val[:int(args.get("sequences", 24))]]
    model.float()
    result: dict[str, Any] = {"model": model_name, "sequences": len(held_out)}
    compare = args.get("compare")
    for name, folder in (("maps", path), ("compare", Path(compare) if compare else None)):
        if folder is None:
            continue
        maps, _ = load_firp(folder, model.config.hidden_size)
        maps.to(model.device)
        result[name] = {"weights": str(folder), **analyze_maps(model, maps.eval(), held_out)}
        print(f"{name} ({maps.config()}):", file=sys.stderr)
        for step, acc in result[name]["accuracy"].items():
            cos = result[name]["cosine_by_layer"][step]
            print(f"  {step}: top-1 {acc['top1']:.1%} top-3 {acc['top3']:.1%}; cosine to the real state "
                  f"{cos[next(iter(cos))]:.2f} at insertion -> {cos['final']:.2f} after the final norm", file=sys.stderr)
    out = Path(args["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {out}", file=sys.stderr)
    return result
