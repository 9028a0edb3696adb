"""``python -m harness analyze firp``: what FIRP's pseudo hidden states look like inside the model.

* cosine similarity between each pseudo state (t, k) and the real hidden state of the
  token it stands for (position t+k), layer by layer from the insertion layer to the
  final norm: the paper claims the gap narrows with depth;
* per-step top-1 / top-3 accuracy against the model's own greedy tokens;
* optionally the same for a second set of maps (e.g. ``--compare`` parallel vs serialized);
* ``--sweep-layers 6,8,10,...``: the seed paper's layer sweep. Maps are trained at each
  prediction layer for the same fixed budget (``--sweep-steps``), then each layer gets its
  validation accepted length (teacher-forced, best tree of ``--sweep-tree`` nodes) and its
  measured decoding cost per step against vanilla on held-out prompts: an earlier layer
  gives the pseudo tokens more layers to become real, a later one costs less.

The analysis runs on the model's own answers to prompts the maps never trained on: rows of the
training files that no training run recorded in the weights' ``config.json`` selected (see
``analyze``). It writes JSON, saying where those prompts come from (``held_out``), that
``report`` shows when it sits in the run folder as ``firp_analysis.json``.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from methods.core.errors import UserError
from methods.core.training import Toolkit, TrainConfig, split_train_val, training_stages


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


def sweep_layers(model: Any, tokenizer: Any, data: list[dict[str, Any]], base: TrainConfig, layers: list[int],
                 toolkit: Toolkit, out_dir: Path, dtype: torch.dtype, prompts: int = 6,
                 new_tokens: int = 48) -> list[dict[str, Any]]:
    """Train FIRP maps at each layer for ``base.max_steps`` steps and measure each one."""
    import statistics
    import time

    from methods.core.engine import Engine
    from methods.core.training import cached_features, data_key
    from methods.firp.decoder import FirpDecoder
    from methods.firp.train import train as train_firp
    from methods.vanilla import VanillaDecoder

    train, val = split_train_val(list(range(len(data))), base.val_fraction, base.seed)  # as train_firp splits
    trained = {tuple(data[i]["ids"][:data[i]["prompt_len"]]) for i in train}
    held_out = [p for p in (data[i]["ids"][:data[i]["prompt_len"]] for i in val) if tuple(p) not in trained][:prompts]
    if not held_out:
        raise UserError("the layer sweep's validation split has no prompt outside its training split; give more data")
    # one frozen-model pass caches every swept layer's features, instead of a pass per layer
    cached_features(model, data, sorted(set(layers)) + [-1], data_key(base), toolkit.cache_dir)
    rows = []
    for layer in layers:
        config = replace(base, out=str(out_dir / f"layer{layer}"), options={**base.options, "layers": layer})
        meta = train_firp(config, model, tokenizer, data, data_key(config), toolkit)
        tree_size = int(config.options.get("tree_size", 4))
        best = next(t for t in meta["tree_search"] if t.get("size") == tree_size and "name" not in t)
        model.to(dtype)
        engine = Engine(model)
        decoders = {"vanilla": VanillaDecoder(engine),
                    "firp": FirpDecoder(engine, weights=config.out, tree="trained")}
        per_step: dict[str, list[float]] = {name: [] for name in decoders}
        for d in decoders.values():
            d.generate(held_out[0], 4)  # warm-up
        for ids in held_out:  # per prompt, both methods back to back: the median ratio shrugs off load swings
            for name, d in decoders.items():
                start = time.perf_counter()
                gen = d.generate(ids, new_tokens)
                per_step[name].append((time.perf_counter() - start) * 1000 / max(1, gen.target_forwards))
        ratios = [f / v for f, v in zip(per_step["firp"], per_step["vanilla"])]
        step_ms = {name: statistics.median(v) for name, v in per_step.items()}
        row = {"layer": layer, "steps": meta["train_steps"], "val_accepted_length": best["expected_accepted_length"],
               "firp_ms_per_step": round(step_ms["firp"], 2), "vanilla_ms_per_step": round(step_ms["vanilla"], 2),
               "step_cost": round(statistics.median(ratios), 3)}
        row["predicted_speedup"] = round(row["val_accepted_length"] / row["step_cost"], 3)
        rows.append(row)
        print(f"  layer {layer}: accepted length {row['val_accepted_length']:.3f}, step cost {row['step_cost']:.2f}x "
              f"vanilla, predicted speedup {row['predicted_speedup']:.2f}x", file=sys.stderr)
    return rows


def analyze(args: dict[str, Any], toolkit: Toolkit) -> dict[str, Any]:
    """``harness analyze firp``: ``args`` holds model, weights, compare, data, out, sequences, device.

    The analysed sequences answer prompts the maps never trained on, or their accuracy would
    measure memory: every training run their ``config.json`` records (``training_stages``) is
    replayed to leave its prompts out, and the output's ``held_out`` says where the prompts come
    from. Weights whose record cannot say what they saw are refused before the model loads.
    """
    from methods.core.files import read_json
    from methods.firp.decoder import FirpDecoder, load_firp

    model_name = args["model"]
    path = Path(args["weights"]) if args.get("weights") else FirpDecoder.weights.shipped(model_name)
    if path is None:
        raise UserError(f"no FIRP weights for {model_name!r}; pass --weights DIR (from `harness train firp`)")
    if not args.get("data"):
        raise UserError("--data needs the files the maps trained on (held-out prompts are their rows training "
                        "did not select)")
    count = int(args.get("sequences", 24))
    if count < 1:
        raise UserError(f"--sequences must be 1 or more, got {count}")
    toolkit.check_model(model_name)
    files = [Path(f) for f in args["data"]]
    toolkit.training_prompts(files, limit=1, seed=0)  # refuses evaluation files before the model loads
    compare = args.get("compare")
    folders = [("maps", path)] + ([("compare", Path(compare))] if compare else [])
    stages = []
    for _, folder in folders:
        meta = read_json(folder / "config.json", "pass the --out folder of `harness train firp`")
        stages += training_stages(meta, folder, files)
    assert toolkit.held_out_prompts is not None, "the harness lends held_out_prompts"
    prompts, held = toolkit.held_out_prompts(files, stages)
    if not prompts:
        raise UserError(f"every prompt of --data was seen in training ({held['file_prompts']} prompts); "
                        "pass files with rows the maps never trained on")
    model, tok = toolkit.load_model(model_name, device=args.get("device", "cpu"), dtype="bfloat16")
    assert toolkit.prompt_sequences is not None, "the harness lends prompt_sequences"
    held_out = toolkit.prompt_sequences(model, tok, model_name, prompts, count=count,
                                        max_new_tokens=stages[0]["max_new_tokens"])
    ranks = held.pop("ranks")
    held["ranks"] = [ranks[d["index"]] for d in held_out]  # positions in the shuffle of --data
    runs = "; ".join(f"the first {st['limit'] or 'all'} prompts of {', '.join(Path(f).name for f in st['files'])} "
                     f"shuffled with seed {st['seed']}" + (f", plus {st['self_prompts']} self-written requests"
                                                           if st["self_prompts"] else "")
                     + (f", plus {st['summary_prompts']} summary requests" if st["summary_prompts"] else "")
                     for st in stages)
    held["source"] = (f"rows of --data that no training run of the weights selected ({runs}), also leaving out "
                      "any row equal to a training prompt or sharing a BoolQ passage with one; the first "
                      f"{len(held_out)} left in the shuffle's order that fit 320 prompt tokens, answered greedily "
                      f"({stages[0]['max_new_tokens']} tokens at most)")
    result: dict[str, Any] = {"model": model_name, "sequences": len(held_out), "held_out": held}
    print(f"{len(held_out)} held-out sequences from prompts the maps never trained on "
          f"(shuffle ranks {min(held['ranks'], default=0)}-{max(held['ranks'], default=0)})", file=sys.stderr)
    sweep = args.get("sweep_layers")
    data = (toolkit.training_sequences(model, tok, model_name, files, limit=1200, seed=0, max_new_tokens=96)
            if sweep else [])
    model.float()
    for name, folder in folders:
        maps, _ = load_firp(folder, model.config.hidden_size)
        maps.to(model.device)
        result[name] = {"weights": str(folder), **analyze_maps(model, maps.eval(), held_out)}
        print(f"{name} ({maps.config()}):", file=sys.stderr)
        for step, acc in result[name]["accuracy"].items():
            cos = result[name]["cosine_by_layer"][step]
            print(f"  {step}: top-1 {acc['top1']:.1%} top-3 {acc['top3']:.1%}; cosine to the real state "
                  f"{cos[next(iter(cos))]:.2f} at insertion -> {cos['final']:.2f} after the final norm", file=sys.stderr)
    out = Path(args["out"])
    if sweep:
        try:
            layers = [int(x) for x in str(sweep).split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--sweep-layers takes layer numbers like 6,8,10, got {sweep!r}") from None
        n = model.config.num_hidden_layers
        if not layers or not all(0 < x < n for x in layers):
            raise UserError(f"--sweep-layers: every layer must be in 1..{n - 1}, got {sweep!r}")
        if int(args.get("sweep_steps") or 0) < 0:
            raise UserError("--sweep-steps must be 0 or more")
        sweep_dtype = toolkit.resolve_dtype(args.get("dtype") or "auto", model.device)
        base = TrainConfig(method="firp", model=model_name, data=[str(f) for f in files], limit=1200,
                           max_steps=int(100 if args.get("sweep_steps") is None else args["sweep_steps"]),
                           epochs=1, eval_every=10**9,
                           options={"K": 3, "input": args.get("sweep_input") or "anchor",
                                    "tree_size": int(args.get("sweep_tree") or 4)})
        result["layer_sweep"] = {"steps_each": base.max_steps, "input": base.options["input"],
                                 "held_out": "the sweep's own split: its maps train on the first 1200 shuffled "
                                             "prompts of --data less 5%; accepted lengths and step costs are "
                                             "measured on that 5%, timing prompts checked against the training part",
                                 "rows": sweep_layers(model, tok, data, base, layers, toolkit,
                                                      out.parent / "firp-layer-sweep", sweep_dtype)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {out}", file=sys.stderr)
    return result
