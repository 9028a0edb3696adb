"""What every head trainer shares: cached frozen-model features, a train/validation split,
the LR schedule, progress, resumable checkpoints, and the ``Toolkit`` the harness lends to a
method's train / tune / analyze entry points (model loading and self-distilled data), so
that methods never import the harness."""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from methods.core.engine import upcast_linears
from methods.core.errors import UserError


@dataclass
class Toolkit:
    """Services the harness provides to a method's entry points.

    * ``load_model(name, device=, dtype=) -> (model, tokenizer)``;
    * ``training_prompts(files, limit=, seed=) -> [str]`` (evaluation files are refused);
    * ``training_sequences(model, tokenizer, model_name, files, limit=, seed=, max_new_tokens=)``
      ``-> [{"ids", "prompt_len"}]``: the model's own greedy answers, cached;
    * ``check_model(name)``: fails fast on a model argument that cannot load;
    * ``resolve_dtype(name, device) -> torch.dtype``: the run's dtype rule (``auto`` included);
    * ``held_out_prompts(files, stages) -> ([str], record)``: prompts of the files that none of
      ``training_stages`` saw, and where they come from;
    * ``prompt_sequences(model, tokenizer, model_name, prompts, count=, max_new_tokens=)``
      ``-> [{"ids", "prompt_len", "index"}]``: the model's greedy answers to given prompts.
    """

    cache_dir: Path
    load_model: Callable[..., tuple[Any, Any]]
    training_prompts: Callable[..., list[str]]
    training_sequences: Callable[..., list[dict[str, Any]]]
    check_model: Callable[[str], None]
    device: str = "cpu"
    resolve_dtype: Callable[[str, Any], torch.dtype] = lambda name, device: getattr(torch, name if name != "auto" else "float32")
    held_out_prompts: Callable[..., tuple[list[str], dict[str, Any]]] | None = None
    prompt_sequences: Callable[..., list[dict[str, Any]]] | None = None


@dataclass
class TrainConfig:
    method: str
    model: str = "smollm2-135m"
    data: list[str] = field(default_factory=list)
    out: str = ""
    dtype: str = "bfloat16"          # of the frozen model while distilling / caching features
    limit: int | None = 1200         # training prompts
    max_new_tokens: int = 96         # length of the self-distilled answers
    self_prompts: int = 0            # requests the model writes itself, added to the file prompts
    summary_prompts: int = 0         # summary requests over the files' passages, added likewise
    init_from: str | None = None     # start from these trained weights (a folder) instead of afresh
    epochs: int = 2                  # the most: with a validation metric, training stops earlier (below)
    lr: float = 1e-3
    warmup_steps: int = 10
    batch_sequences: int = 4
    val_fraction: float = 0.05
    seed: int = 0
    checkpoint_every: int = 50
    max_steps: int | None = None     # stop early (ablations at a fixed budget)
    eval_every: int = 50             # steps between validations, for trainers that give a metric
    patience: int = 3                # validations without improvement before training stops
    schedule: str = "cosine"         # "cosine" over the epochs, or "plateau": cut the lr at each plateau
    lr_factor: float = 0.3           # plateau schedule: the lr is multiplied by this at a plateau
    max_lr_cuts: int = 2             # plateau schedule: cuts before a plateau stops training
    grad_clip: float | None = 1.0    # max gradient norm per step (a full decoder layer spikes without it)
    allow_eval_data: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # method-specific


def data_key(config: TrainConfig) -> str:
    """The cache key of a training set's frozen-model features: every setting that changes the data."""
    files = [str(Path(f).resolve()) for f in config.data]
    key = f"{config.model}|{config.dtype}|{files}|{config.limit}|{config.seed}|{config.max_new_tokens}"
    return (key + (f"|self{config.self_prompts}" if config.self_prompts else "")
            + (f"|sum{config.summary_prompts}" if config.summary_prompts else ""))


def training_summary(meta: dict[str, Any]) -> dict[str, Any] | None:
    """What a trained method's report row says about its weights, from their ``config.json``:
    the data, the budget and stopping, and the validation numbers (None for foreign files)."""
    cfg = meta.get("train_config")
    if not isinstance(cfg, dict):
        return None
    return {"data": [Path(f).parent.name + "/" + Path(f).name for f in cfg.get("data", [])],
            "prompts": cfg.get("limit"), "self_prompts": cfg.get("self_prompts", 0),
            "summary_prompts": cfg.get("summary_prompts", 0), "init_from": cfg.get("init_from"), "answer_tokens": cfg.get("max_new_tokens"),
            "sequences": meta.get("train_sequences"), "epochs_max": cfg.get("epochs"), "patience": cfg.get("patience"),
            "val_metric": meta.get("val_metric"), "command": meta.get("command"), **_stage(meta),
            "earlier": earlier_stages(meta.get("continued_from"))}


def _stage(record: dict[str, Any]) -> dict[str, Any]:
    """One training run's budget, stop, rate schedule, time and best validation, from its record."""
    cfg = record.get("train_config") if isinstance(record.get("train_config"), dict) else {}
    return {"steps": record.get("train_steps"), "max_steps": cfg.get("max_steps"),
            "stopped": record.get("stopped", "budget (fixed epochs)"), "best_step": record.get("best_step"),
            "lr": cfg.get("lr"), "schedule": cfg.get("schedule", "cosine"), "lr_cuts": record.get("lr_cuts") or [],
            "lr_factor": cfg.get("lr_factor"), "train_time_s": record.get("train_time_s"),
            "val_best": max((c["value"] for c in record.get("val_curve") or []), default=None)}


def earlier_stages(record: Any) -> list[dict[str, Any]]:
    """The runs a continued run started from (``continued_from``, oldest first), each as
    ``_stage`` reads it, so a report row of a file trained in stages says every stage's budget
    and stop, not only the last one's."""
    stages: list[dict[str, Any]] = []
    while isinstance(record, dict):
        stages.insert(0, _stage(record))
        record = record.get("continued_from")
    return stages


def training_stages(meta: dict[str, Any], folder: Path, files: Sequence[Path]) -> list[dict[str, Any]]:
    """The data of every run that made a weights folder (its own, then each ``--init-from`` start
    in turn), from its ``config.json``, with each recorded training file matched to one of ``files``.

    An analysis that wants prompts the weights never saw replays these to exclude them; where the
    record cannot say what they saw (no ``train_config``, a start whose record is lost, a training
    file not among ``files``), it refuses rather than guess.
    """
    stages: list[dict[str, Any]] = []
    record: Any = meta
    where = str(folder)
    while True:
        cfg = record.get("train_config") if isinstance(record, dict) else None
        if not isinstance(cfg, dict) or not isinstance(cfg.get("data"), list) or "seed" not in cfg:
            raise UserError(f"{where}/config.json does not record the data its weights trained on (train_config); "
                            "cannot choose prompts they never saw")
        matched = []
        for recorded in cfg["data"]:
            same = [f for f in files if Path(f).resolve() == Path(recorded).resolve()
                    or Path(f).parts[-2:] == Path(recorded).parts[-2:]]
            if not same:
                raise UserError(f"the weights in {where} trained on {recorded}; pass it to --data as well, "
                                "so that its training prompts can be left out")
            matched.append(same[0])
        stages.append({"files": matched, "recorded_files": [Path(f) for f in cfg["data"]], "limit": cfg.get("limit"),
                       "seed": int(cfg["seed"]), "self_prompts": int(cfg.get("self_prompts") or 0),
                       "summary_prompts": int(cfg.get("summary_prompts") or 0),
                       "max_new_tokens": int(cfg.get("max_new_tokens", 96)), "dtype": str(cfg.get("dtype", "bfloat16")),
                       "model": str(cfg.get("model", "")), "allow_eval": bool(cfg.get("allow_eval_data", False))})
        if not cfg.get("init_from"):
            return stages
        where = str(cfg["init_from"])
        record = record.get("continued_from")


def training_precision(device: torch.device | str) -> str:
    """``"bf16 autocast"`` where the device has bf16 arithmetic (CUDA, or a CPU with AVX512-BF16
    or AMX), ``"float32"`` elsewhere: the arithmetic every trainer uses there.

    Why: on a CPU without bf16 units every bf16 product is emulated, and a training step's
    largest one, the LM head over every answer row with its backward, runs tens of times slower
    than in float32 (``benchmarks/train_precision.py`` measures both). The data, the stopping
    rule and the saved weights' format are the same either way; only the arithmetic's precision
    differs, and ``config.json`` records which."""
    kind = torch.device(device).type
    if kind == "cpu":
        from methods.core.hardware import cpu_has_native_bf16

        return "bf16 autocast" if cpu_has_native_bf16() else "float32"
    return "bf16 autocast" if kind == "cuda" else "float32"


def autocast(device: torch.device | str) -> Any:
    """bf16 autocast (float32 master weights) where ``training_precision`` says so; elsewhere a
    disabled autocast, so the step runs in float32."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=training_precision(device) == "bf16 autocast")


def split_train_val(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(items) * fraction))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def lr_at(step: int, total: int, base: float, warmup: int, schedule: str = "cosine") -> float:
    """Linear warm-up, then cosine decay to zero over ``total`` steps, or with ``schedule="plateau"``
    the base rate held (``base`` is then the rate after the cuts made so far)."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "plateau":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file, so an interrupted write never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


@torch.no_grad()
def cached_features(model: Any, data: list[dict[str, Any]], layers: Sequence[int], cache_key: str,
                    cache_dir: Path, batch_size: int = 8, chunk_batches: int = 16) -> list[dict[int, torch.Tensor]]:
    """Hidden states of the frozen model per sequence, at HF ``hidden_states`` indices ``layers``
    (0 = embeddings, i = entering layer i, -1 = after the final norm), stored in bfloat16.

    Computed once and kept on disk, one file per layer, so trainers that need different
    layers share one pass and training then costs only the head's own layers. The pass is
    written in parts of ``chunk_batches`` batches as it goes, so an interrupted pass (it takes
    hours on a small CPU) resumes from its last part instead of starting over.
    """
    from tqdm import tqdm

    def path_of(layer: int) -> Path:
        digest = hashlib.sha256(json.dumps([cache_key, int(layer), len(data)]).encode()).hexdigest()[:12]
        return cache_dir / "features" / f"{digest}-layer{layer}.pt"

    def part_of(layer: int, chunk: int) -> Path:
        whole = path_of(layer)
        return whole.with_name(f"{whole.stem}.b{batch_size}x{chunk_batches}.part{chunk:05d}.pt")

    missing = [layer for layer in layers if not path_of(layer).is_file()]
    if missing:
        order = sorted(range(len(data)), key=lambda i: len(data[i]["ids"]))
        starts = list(range(0, len(order), batch_size))
        chunks = [starts[k:k + chunk_batches] for k in range(0, len(starts), chunk_batches)]
        done = sum(all(part_of(layer, c).is_file() for layer in missing) for c in range(len(chunks)))
        if done:
            print(f"Resuming the feature cache: {done} of {len(chunks)} parts on disk", file=sys.stderr)
        progress = tqdm(total=len(starts), desc="caching frozen-model features", file=sys.stderr)
        with upcast_linears(model):  # bf16 features at float32 speed on a CPU without bf16 units
            for c, chunk in enumerate(chunks):
                if all(part_of(layer, c).is_file() for layer in missing):
                    progress.update(len(chunk))
                    continue
                fresh: dict[int, dict[int, torch.Tensor]] = {layer: {} for layer in missing}
                for start in chunk:
                    idx = order[start:start + batch_size]
                    width = max(len(data[i]["ids"]) for i in idx)
                    ids = torch.zeros((len(idx), width), dtype=torch.long)
                    mask = torch.zeros((len(idx), width), dtype=torch.long)
                    for row, i in enumerate(idx):  # right padding: causal positions before the pad are exact
                        n = len(data[i]["ids"])
                        ids[row, :n] = torch.tensor(data[i]["ids"])
                        mask[row, :n] = 1
                    out = model.model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                      output_hidden_states=True)
                    for row, i in enumerate(idx):
                        n = len(data[i]["ids"])
                        for layer in missing:
                            fresh[layer][i] = out.hidden_states[layer][row, :n].to("cpu", torch.bfloat16).clone()
                    progress.update(1)
                for layer in missing:
                    _atomic_save(fresh[layer], part_of(layer, c))
        progress.close()
        for layer in missing:
            whole: list[torch.Tensor | None] = [None] * len(data)
            for c in range(len(chunks)):
                for i, tensor in torch.load(part_of(layer, c)).items():
                    whole[i] = tensor
            _atomic_save(whole, path_of(layer))
            for c in range(len(chunks)):
                part_of(layer, c).unlink()
    else:
        print(f"Using cached features for layers {list(layers)}", file=sys.stderr)
    per_layer = {layer: torch.load(path_of(layer)) for layer in layers}
    return [{layer: per_layer[layer][i] for layer in layers} for i in range(len(data))]


class Checkpointer:
    """Resumable training: state every N steps, atomically replaced."""

    def __init__(self, out: Path) -> None:
        self.path = out / "checkpoint.pt"

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            return torch.load(self.path, weights_only=False)
        except Exception:  # noqa: BLE001 - a torn checkpoint means "start over", with a warning
            print(f"warning: {self.path} is unreadable; starting from scratch", file=sys.stderr)
            return None

    def save(self, state: dict[str, Any]) -> None:
        _atomic_save(state, self.path)


def prepare_out(out: str) -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to --out {out}: {exc.strerror}; choose another folder") from None
    return path


def write_result(out: Path, config: TrainConfig, state: dict[str, torch.Tensor], meta: dict[str, Any],
                 filename: str, dtype: torch.dtype | None = None) -> None:
    """Weights (in ``dtype`` if given: bf16 halves what a shipped file weighs) and ``config.json``."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}, str(out / filename))
    from methods.core.hardware import machine, machine_label

    device = next((v.device for v in state.values()), torch.device("cpu"))
    meta = {**meta, "precision": training_precision(device), "trained_on": machine_label(machine(device)),
            "train_config": asdict(config),
            "command": "python -m harness train " + config.method + " " + " ".join(sys.argv[3:])}
    if config.init_from:
        meta["continued_from"] = earlier_run(Path(config.init_from))
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def earlier_run(folder: Path) -> dict[str, Any] | None:
    """What a continued run started from (``--init-from``): that run's command, budget and curve,
    and its own start in turn, so a shipped file's config.json says every stage that made it."""
    try:
        meta = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    keep = ("command", "train_config", "train_steps", "best_step", "stopped", "lr_cuts", "val_curve", "train_time_s",
            "continued_from")
    return {"folder": str(folder), **{k: meta[k] for k in keep if k in meta}}


def chain_accepted_length(correct: torch.Tensor, depth: int) -> torch.Tensor:
    """Per anchor, 1 + the run of consecutive correct drafts starting there, capped at ``depth``:
    the accepted length of a greedy chain, teacher-forced (exact for a draft that reads real tokens).

    ``correct`` [N] (draft at position i agrees with the target) or [N, depth] (draft step j
    from anchor i agrees, for drafts that read their own predictions)."""
    if correct.dim() == 1:
        n = correct.shape[0]
        idx = torch.arange(n)[:, None] + torch.arange(depth)[None]
        padded = torch.cat([correct.bool(), torch.zeros(depth, dtype=torch.bool, device=correct.device)])
        correct = padded[idx.to(correct.device)]
    return 1 + correct.bool().long().cumprod(dim=1).sum(dim=1)


@dataclass
class TrainLog:
    """What ``optimise`` hands back to a trainer, and what its ``config.json`` records."""

    elapsed: float                                     # training wall time, resumed time included
    losses: list[float]                                # mean training loss of every step
    curve: list[dict[str, float]] = field(default_factory=list)  # [{"step", "value"}] validations
    best_step: int | None = None                       # the step whose weights were kept
    stopped: str = "budget"                            # "budget" or "plateau"
    lr_cuts: list[int] = field(default_factory=list)   # plateau schedule: the steps where the lr was cut

    def meta(self) -> dict[str, Any]:
        return {"train_time_s": round(self.elapsed, 1), "train_steps": len(self.losses),
                "train_loss": [round(x, 5) for x in self.losses], "val_curve": self.curve,
                "best_step": self.best_step, "stopped": self.stopped,
                **({"lr_cuts": self.lr_cuts} if self.lr_cuts else {})}


def load_start(folder: str, load: Callable[[dict[str, torch.Tensor]], Any]) -> None:
    """Start from earlier trained weights (``--init-from``): continuing a converged run on more
    data costs a fraction of training afresh. ``load`` puts them into the trainer's module in
    its own saved format; weights of other settings are the user's error, not a traceback."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if len(files) != 1:
        raise UserError(f"--init-from {folder}: expected one .safetensors file there, found {len(files)}; "
                        "give the --out folder of an earlier `harness train` run of this method")
    try:
        load(load_file(str(files[0])))
    except RuntimeError as exc:  # load_state_dict's missing / unexpected keys or sizes
        raise UserError(f"--init-from {files[0]}: its weights do not fit this method's settings "
                        f"(train with the same --option values as the run that made them): "
                        f"{str(exc).splitlines()[-1].strip()}") from None
    print(f"  starting from {files[0]}", file=sys.stderr)


def optimise(config: TrainConfig, module: torch.nn.Module, train_idx: list[int],
             loss_of: Callable[[int, random.Random], torch.Tensor | None], out: Path,
             desc: str, validate: Callable[[], float] | None = None,
             load_saved: Callable[[dict[str, torch.Tensor]], Any] | None = None) -> TrainLog:
    """The loop every trainer shares: Adam, warm-up + cosine LR, seeded shuffles, resumable checkpoints.

    ``loss_of(i, rng)`` returns sequence i's loss (or None to skip it); gradients are averaged
    over the sequences of a step. With ``validate`` (a validation metric, higher is better:
    a teacher-forced accepted length where the method has one), every trainer follows the
    same stopping rule: validate every ``eval_every`` steps, stop after ``patience``
    validations without improvement, and keep the best weights, so no method is compared
    at a budget chosen for another. ``epochs`` is then only the ceiling (and the cosine schedule's
    length). Under a long cosine schedule the rate is still near its peak when the metric first
    stalls, so a stall there can be the step size's noise floor rather than the model's limit;
    ``schedule="plateau"`` holds the rate instead and, at each stall, multiplies it by
    ``lr_factor`` and counts the patience afresh, stopping only at a stall after ``max_lr_cuts`` cuts:
    a plateau at every rate, whatever the epoch ceiling.
    With ``config.init_from`` and no checkpoint to resume, the module starts from those saved
    weights, read by ``load_saved`` (default: ``module.load_state_dict``) for trainers whose saved
    format differs from their module's.
    """
    from tqdm import tqdm

    opt = torch.optim.Adam(module.parameters(), lr=config.lr)
    steps_per_epoch = (len(train_idx) + config.batch_sequences - 1) // config.batch_sequences
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    ckpt = Checkpointer(out)
    state = ckpt.load()
    step, elapsed, history = 0, 0.0, []
    curve: list[dict[str, float]] = []
    best: dict[str, Any] = {"value": -math.inf, "step": None, "weights": None}
    stopped = "budget"
    rate, cuts = config.lr, []  # the plateau schedule's current rate and the steps where it was cut
    if state is not None:
        module.load_state_dict(state["weights"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed, history = state["step"], state["elapsed"], state.get("losses", [])
        curve, best = state.get("curve", []), state.get("best", best)
        stopped = state.get("stopped", "budget")
        rate, cuts = state.get("rate", config.lr), state.get("cuts", [])
        print(f"Resuming from {ckpt.path} at step {step}/{total}", file=sys.stderr)
    elif config.init_from:
        load_start(config.init_from, load_saved or module.load_state_dict)
    clock = Stopwatch(elapsed)
    if validate is not None and state is None:
        # the start is a candidate too: a ridge start can beat the first fine-tuning steps,
        # whose Adam warm-up shakes the maps before it settles
        module.eval()
        with torch.no_grad():
            value = float(validate())
        module.train()
        curve.append({"step": 0, "value": round(value, 5)})
        best = {"value": value, "step": 0, "weights": {k: v.detach().clone() for k, v in module.state_dict().items()}}
        print(f"  step 0: validation {value:.4f}", file=sys.stderr)
    bar = tqdm(total=total, initial=step, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def since_best() -> int:
        """Validations without improvement since the best one or the last cut, whichever is later."""
        start = max([best["step"]] + cuts[-1:]) if best["step"] is not None else None
        return sum(1 for c in curve if start is not None and c["step"] > start)

    while step < total and stopped == "budget":
        epoch, pos = divmod(step, steps_per_epoch)
        order = list(train_idx)
        random.Random(config.seed + epoch).shuffle(order)
        batch = order[pos * config.batch_sequences:(pos + 1) * config.batch_sequences]
        rng = random.Random(config.seed * 1_000_003 + step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, rate, config.warmup_steps, config.schedule)
        opt.zero_grad()
        losses = []
        for i in batch:
            loss = loss_of(i, rng)
            if loss is None:
                continue
            (loss / len(batch)).backward()
            losses.append(float(loss.detach()))
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip)
        opt.step()
        step += 1
        history.append(sum(losses) / max(1, len(losses)))
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]:.3f}", best=f"{best['value']:.3f}")
        if validate is not None and (step % config.eval_every == 0 or step == total):
            module.eval()
            with torch.no_grad():
                value = float(validate())
            module.train()
            curve.append({"step": step, "value": round(value, 5),
                          **({"lr": float(f"{rate:.3g}")} if config.schedule == "plateau" else {})})
            if value > best["value"]:
                best = {"value": value, "step": step,
                        "weights": {k: v.detach().clone() for k, v in module.state_dict().items()}}
            elif since_best() >= config.patience:
                if config.schedule == "plateau" and len(cuts) < config.max_lr_cuts:
                    rate *= config.lr_factor
                    cuts.append(step)
                    bar.write(f"  step {step}: no improvement for {config.patience} validations, "
                              f"learning rate cut to {rate:.3g}", file=sys.stderr)
                else:
                    stopped = "plateau"
            bar.write(f"  step {step}: validation {value:.4f} (best {best['value']:.4f} at step {best['step']})",
                      file=sys.stderr)
        if step % config.checkpoint_every == 0 or step == total or stopped != "budget":
            ckpt.save({"weights": module.state_dict(), "optimizer": opt.state_dict(), "step": step,
                       "elapsed": clock.elapsed(), "losses": history, "curve": curve, "best": best,
                       "stopped": stopped, "rate": rate, "cuts": cuts})
    bar.close()
    if best["weights"] is not None:
        module.load_state_dict(best["weights"])
    return TrainLog(clock.elapsed(), history, curve, best["step"], stopped, cuts)


class Stopwatch:
    def __init__(self, already: float = 0.0) -> None:
        self.start = time.perf_counter() - already

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
