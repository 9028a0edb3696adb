"""Plant regressions in the CI gate's suite and see `harness check` catch each one.

Runs the gate's suite (every method with its shipped defaults, replaying the committed
baseline's costs) once to write a baseline on this machine, then once per planted
regression and ``--unchanged`` more times with the code as it is. Prints one row per run:
the exit code of ``check`` and the metrics it failed. Nothing here is a timed test: the
numbers belong in an issue note or the docs, with the machine beside them.

    python benchmarks/planted_regressions.py --unchanged 5
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.cli import main  # noqa: E402

BASELINE = ROOT / "tests" / "baselines" / "smollm2-135m-cpu-float32.json"
RUN = ["run", "--methods", "vanilla,medusa,firp,eagle,sps,pld,lookahead,self_spec", "--tasks", "builtin",
       "--limit", "6", "--max-new-tokens", "24", "--dtype", "float32", "--device", "cpu",
       "--costs-from", str(BASELINE)]


@contextlib.contextmanager
def patched(obj: object, name: str, value: object) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def slower_pld(share: float) -> contextlib.AbstractContextManager[None]:
    """PLD spends ``share`` more time on every generation (as if each step were that much dearer)."""
    from methods.core.decoder import Decoder
    from methods.pld import PromptLookupDecoder

    def generate(self, *args, **kwargs):
        start = time.perf_counter()
        gen = Decoder.generate(self, *args, **kwargs)
        time.sleep(share * (time.perf_counter() - start))
        return gen

    return patched(PromptLookupDecoder, "generate", generate)


def one_token_fewer() -> contextlib.AbstractContextManager[None]:
    import methods.pld as pld

    real = pld.lookup
    return patched(pld, "lookup", lambda *a, **k: real(*a, **k)[:-1])


def extra_sync() -> contextlib.AbstractContextManager[None]:
    from methods.eagle import EagleDecoder

    real = EagleDecoder.draft

    def draft(self, root, root_t, room):
        root_t.item()
        return real(self, root, root_t, room)

    return patched(EagleDecoder, "draft", draft)


def changed_vanilla_token() -> contextlib.AbstractContextManager[None]:
    from methods.core.decoder import Decoder
    from methods.vanilla import VanillaDecoder

    def generate(self, *args, **kwargs):
        gen = Decoder.generate(self, *args, **kwargs)
        gen.tokens[5] = (gen.tokens[5] + 1) % self.engine.config.vocab_size
        return gen

    return patched(VanillaDecoder, "generate", generate)


def changed_pick() -> contextlib.AbstractContextManager[None]:
    from methods.firp import FirpDecoder

    real = FirpDecoder.pass_cost
    return patched(FirpDecoder, "pass_cost", lambda self, tree, curve: 1.3 * real(self, tree, curve))


PLANTS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "pld 30% more time per step": lambda: slower_pld(0.3),
    "pld proposes one token fewer": one_token_fewer,
    "eagle: one more host sync per step": extra_sync,
    "vanilla: one token changed": changed_vanilla_token,
    "firp: a changed auto pick (its pass priced 30% dearer)": changed_pick,
}


def run_and_check(work: Path, name: str, baseline: Path, run: list[str]) -> tuple[int, list[str]]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main([*run, "--out", str(work / name)]) == 0
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["check", str(work / name), "--baseline", str(baseline)])
    failed = sorted({f"{cells[1]}: {cells[3]}" for line in buf.getvalue().splitlines() if "REGRESSION" in line
                     for cells in [[c.strip() for c in line.split("│")]]})
    return code, failed


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unchanged", type=int, default=5, help="runs of the unchanged code (default 5)")
    parser.add_argument("--only", default=None, help="substrings, comma-separated: run only the plants whose name has one")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds per example (run --repeats; default 1)")
    parser.add_argument("--keep", default=None, metavar="DIR", help="keep the run folders in DIR (default: a temporary one)")
    args = parser.parse_args(argv)
    from methods.core.hardware import machine, machine_label

    print(f"machine: {machine_label(machine('cpu'))}; --repeats {args.repeats}")
    run = [*RUN, "--repeats", str(args.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main([*run, "--out", str(work / "base")]) == 0
            assert main(["baseline", str(work / "base"), "-o", str(work / "baseline.json")]) == 0
        print("| run | check exit | failed rows (method: metric) |\n|---|---|---|")
        for name, plant in PLANTS.items():
            if args.only and not any(part in name for part in args.only.split(",")):
                continue
            with plant():
                code, failed = run_and_check(work, re.sub(r"\W+", "-", name), work / "baseline.json", run)
            print(f"| {name} | {code} | {'; '.join(failed) or '-'} |", flush=True)
        passes = 0
        for i in range(args.unchanged):
            code, failed = run_and_check(work, f"unchanged-{i}", work / "baseline.json", run)
            passes += code == 0
            print(f"| unchanged code, run {i + 1} | {code} | {'; '.join(failed) or '-'} |", flush=True)
        if args.unchanged:
            print(f"unchanged code passed {passes} of {args.unchanged}")
    return 0


if __name__ == "__main__":
    sys.exit(main_())
