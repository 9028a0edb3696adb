"""Where a trained method finds its weights: the path its option gives, or the shipped entry.

Every trained method (Medusa heads, FIRP maps, the EAGLE head, the SpS draft, self_spec's
skip set) answers the same question twice: before the model loads (``check_ready``, so a
missing file is a one-line error and exit 2, not a stack trace after a minute of loading)
and when it sets up. One locator answers both, with one message that names the option to
set and the command that makes the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from methods.core.errors import UserError


@dataclass(frozen=True)
class WeightsLocator:
    """``folder`` holds one shipped entry per model name (``<model><suffix>``); an entry counts
    as shipped when it holds any of ``files`` (or, with no ``files``, when it is a file)."""

    method: str               # the method's registry name, for the option's full name
    option: str               # the option that gives weights instead of the shipped ones
    noun: str                 # what the weights are, for the message ("Medusa heads")
    folder: Path
    make: str                 # the command that makes them; ``{model}`` is the model name
    files: tuple[str, ...] = ()
    suffix: str = ""
    placeholder: str = "DIR"  # what the option takes, for the message

    def shipped(self, model_name: str) -> Path | None:
        entry = self.folder / f"{model_name}{self.suffix}"
        if self.files:
            return entry if any((entry / f).is_file() for f in self.files) else None
        return entry if entry.is_file() else None

    def given(self, options: Any) -> str | None:
        value = getattr(options, self.option)
        return None if value is None or value == "" else str(value)

    def locate(self, model_name: str, options: Any) -> Path | str:
        """The option's value as given (its own validation reads it), else the shipped entry."""
        value = self.given(options)
        if value is not None:
            return value
        shipped = self.shipped(model_name)
        if shipped is None:
            raise UserError(f"no {self.noun} for model {model_name!r}; make them with: "
                            f"{self.make.format(model=model_name)} and pass "
                            f"--method-option {self.method}.{self.option}={self.placeholder}")
        return shipped

    def check(self, model_name: str, options: Any) -> None:
        """``locate`` without using the result: the pre-load check."""
        self.locate(model_name, options)

    def size(self, model_name: str, options: Any) -> dict[str, int]:
        """The drafter's parameters beside the target model, and its bytes on disk."""
        found = self.locate(model_name, options)
        path = Path(found)
        if not path.exists():  # an inline value (self_spec's skip set as JSON): no file, no parameters
            return {"parameters": 0, "bytes": len(str(found).encode())}
        return weights_size(path)


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def weights_size(path: Path) -> dict[str, int]:
    """Parameters stored in ``path`` (a weights file, or every weights file in a folder) and the
    bytes of those files; read from the safetensors headers, so nothing is loaded. A file of
    another kind (a JSON skip set) holds no parameters. In a folder, safetensors files are the
    weights where there are any: a trainer's output folder also holds its resumable checkpoint
    (``checkpoint.pt``: the weights again and the optimizer's state), which is not the drafter."""
    files = sorted(f for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES) if path.is_dir() else [path]
    if any(f.suffix == ".safetensors" for f in files):
        files = [f for f in files if f.suffix == ".safetensors"]
    parameters = 0
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    shape = handle.get_slice(name).get_shape()
                    parameters += int(math.prod(shape))
        elif file.suffix in WEIGHT_SUFFIXES:
            import torch

            state = torch.load(file, map_location="cpu", weights_only=True)
            parameters += sum(int(v.numel()) for v in state.values() if hasattr(v, "numel"))
    return {"parameters": parameters, "bytes": sum(f.stat().st_size for f in files)}
