"""What decodes: the model loaded once, one decoder per method row, the shared settings.

Built by the local executor in this process, or by each Ray actor in its own, from a
``DecodeSpec`` (``harness/config.py``): the part of a run's configuration decoding needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.config import DecodeSpec
from harness.progress import bar, status
from methods.registry import get_spec


@dataclass
class Workbench:
    model: Any
    tokenizer: Any
    engine: Any
    decoders: list[Any]
    settings: Any
    costs: dict[str, Any]  # the costs the methods' setup used: measured here, or replayed (``pinned``)

    def describe(self) -> dict[str, Any]:
        """The manifest's model, dtype, methods and environment entries, as measured where decoding runs."""
        from harness.environment import environment
        from methods.core.hardware import kv_bytes_per_token, step_weight_bytes

        model = self.model
        return {
            "model": {"type": model.config.model_type, "layers": model.config.num_hidden_layers,
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                      "step_weight_bytes": step_weight_bytes(model), "kv_bytes_per_token": kv_bytes_per_token(model)},
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "methods": {d.label: d.describe() for d in self.decoders},
            "costs": self.costs,
            "environment": environment(self.engine.device),
        }


def build_workbench(spec: DecodeSpec, *, show_progress: bool = True) -> Workbench:
    """Loads the model and sets up every method (a method's setup may measure its verify cost: seconds)."""
    from harness.models import load_model
    from harness.runner import ShardSettings
    from methods.core.cost import recording_costs
    from methods.core.engine import Engine
    from methods.core.prompts import stop_token_ids

    if show_progress:
        status(f"loading {spec.model} (device {spec.device}, dtype {spec.dtype})")
    model, tokenizer = load_model(spec.model, device=spec.device, dtype=spec.dtype)
    engine = Engine(model)
    decoders = []
    with (bar("setting up methods", len(spec.runs), "method", disable=not show_progress) as progress,
          recording_costs(spec.costs) as costs):
        for run in spec.runs:
            progress.set_postfix_str(run.label)
            decoder = get_spec(run.name).decoder(engine, run.options, model_name=spec.model)
            decoder.label = run.label
            decoders.append(decoder)
            progress.update()
    settings = ShardSettings(
        max_new_tokens=spec.max_new_tokens,
        stop_ids=stop_token_ids(tokenizer, model),
        max_context=getattr(model.config, "max_position_embeddings", None),
        temperature=spec.temperature,
        top_p=spec.top_p,
        seed=spec.seed,
        repeats=spec.repeats,
    )
    return Workbench(model, tokenizer, engine, decoders, settings, {**costs, "pinned": spec.costs is not None})
