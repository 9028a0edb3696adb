"""Which tree ``auto`` picks on this device for the shipped FIRP maps and Medusa heads.

    python benchmarks/tree_choice.py [--device cuda] [--dtype bfloat16] [--model random:smollm2-135m]

The pick combines the trainer's teacher-forced accepted length of each tree with the verify
cost measured here, so it moves with the hardware: a flat GPU curve favours larger trees
than a CPU's steep one. The cost does not depend on the weights, so a randomly
initialised model of the default model's shape gives the same choice where the model file
cannot travel. Prints the measured curve and each method's candidate table.
"""

from __future__ import annotations

import argparse
import json

from common import add_model_args, load_bench_model
from methods.core.engine import Engine
from methods.firp import FirpDecoder
from methods.firp.decoder import WEIGHTS_DIR as FIRP_WEIGHTS
from methods.medusa import MedusaDecoder
from methods.medusa.decoder import WEIGHTS_DIR as MEDUSA_WEIGHTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--weights-model", default="smollm2-135m", help="whose shipped weights to read")
    ap.add_argument("--firp", help="FIRP maps folder (default: shipped)")
    ap.add_argument("--medusa", help="Medusa heads folder (default: shipped)")
    ap.add_argument("--json", help="also write the choices here")
    args = ap.parse_args()
    model, _ = load_bench_model(args.model, args.device, args.dtype)
    engine = Engine(model)
    out = {}
    for name, cls, option, folder in (("firp", FirpDecoder, "weights", args.firp or FIRP_WEIGHTS / args.weights_model),
                                      ("medusa", MedusaDecoder, "heads", args.medusa or MEDUSA_WEIGHTS / args.weights_model)):
        decoder = cls(engine, **{option: str(folder)})
        choice = decoder.describe().get("tree_choice")
        out[name] = choice
        if choice is None:
            print(f"{name}: no tree table in its weights' config.json")
            continue
        curve = choice["cost_curve"]
        print(f"\n{name}: picked {choice['draft_size']} nodes, predicted {choice['predicted_speedup']:.2f}x "
              f"(accepted {choice['expected_accepted_length']:.2f}, draft overhead {choice['draft_overhead']:.3f})")
        print(f"  cost curve ({curve['one_token_ms']:.2f} ms a token): "
              + " ".join(f"{n}:{r:.2f}" for n, r in zip(curve["sizes"], curve["monotone"])))
        print(f"  {'nodes':>5} {'processed':>9} {'accepted':>8} {'cost':>6} {'speedup':>7}")
        for c in choice["candidates"]:
            print(f"  {c['draft_size']:>5} {c['processed']:>9} {c['expected_accepted_length']:>8.3f} "
                  f"{c['cost']:>6.3f} {c['predicted_speedup']:>7.3f} {c.get('name', '')}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
