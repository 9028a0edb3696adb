"""Planted regressions: each one, slipped into otherwise unchanged code, fails `harness check`
with exit 1 on the metric it breaks, and the unchanged code passes.

Every run replays the committed CI baseline's measured costs (``--costs-from``), so the
methods' fitted choices are the same on any machine, and the baseline of this module is
written from a first run on this machine, so speed is compared too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from harness.cli import main

pytestmark = pytest.mark.slow
COSTS = Path(__file__).parent / "baselines" / "smollm2-135m-cpu-float32.json"
RUN = ["run", "--methods", "vanilla,pld,medusa", "--tasks", "builtin", "--limit", "3", "--max-new-tokens", "16",
       "--dtype", "float32", "--device", "cpu", "--costs-from", str(COSTS)]


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    assert main([*RUN, "--out", str(root / "base")]) == 0
    assert main(["baseline", str(root / "base"), "-o", str(root / "baseline.json")]) == 0
    return root


def check(gate: Path, name: str, capsys, *extra: str) -> tuple[int, str, list[str]]:
    """Run the suite into ``name``, check it against the module's baseline: (exit code, output, failed rows)."""
    capsys.readouterr()
    assert main([*RUN, "--out", str(gate / name)]) == 0
    capsys.readouterr()
    code = main(["check", str(gate / name), "--baseline", str(gate / "baseline.json"), *extra])
    out = capsys.readouterr().out
    return code, out, [line for line in out.splitlines() if "REGRESSION" in line]


def test_the_baseline_records_what_the_gate_reads(gate):
    data = json.loads((gate / "baseline.json").read_text())
    assert data["costs"]["pinned"] is True and data["costs"]["curve"]["sizes"]
    assert set(data["tokens"]) == {"vanilla", "pld", "medusa"} and set(data["choices"]) >= {"medusa"}
    entry = next(e for e in data["entries"] if e["method"] == "vanilla")
    assert entry["syncs_per_step"] > 0 and entry["forwards_per_token"] == 1.0 and entry["draft_size"] == 0.0


def test_unchanged_code_passes(gate, capsys):
    """Speed with a wide margin here: a CI machine's noise is not this test's subject
    (benchmarks/planted_regressions.py measures the false-alarm rate at the default margin)."""
    code, out, failed = check(gate, "unchanged", capsys, "--speed-margin", "0.25")
    assert code == 0 and not failed, out
    assert "counters and choices not compared" not in out and "speed not compared" not in out


def test_a_changed_token_in_vanilla_fails(gate, capsys, monkeypatch):
    from methods.core.decoder import Decoder
    from methods.vanilla import VanillaDecoder

    def altered(self, *args, **kwargs):
        gen = Decoder.generate(self, *args, **kwargs)
        gen.tokens[3] = (gen.tokens[3] + 1) % self.engine.config.vocab_size
        return gen

    monkeypatch.setattr(VanillaDecoder, "generate", altered)
    code, out, failed = check(gate, "token", capsys, "--speedup-floor", "0")
    assert code == 1 and any(row.split("│")[1].strip() == "vanilla" and "token ids" in row for row in failed), out


def test_a_drafter_proposing_one_token_fewer_fails(gate, capsys, monkeypatch):
    import methods.pld as pld

    real = pld.lookup
    monkeypatch.setattr(pld, "lookup", lambda *a, **k: real(*a, **k)[:-1])
    code, out, failed = check(gate, "fewer", capsys, "--speedup-floor", "0")
    assert code == 1 and any("pld" in row and "draft_size" in row for row in failed), out


def test_an_extra_host_synchronisation_per_step_fails(gate, capsys, monkeypatch):
    from methods.pld import PromptLookupDecoder

    real = PromptLookupDecoder.draft

    def draft(self, root, root_t, room):
        root_t.item()
        return real(self, root, root_t, room)

    monkeypatch.setattr(PromptLookupDecoder, "draft", draft)
    code, out, failed = check(gate, "sync", capsys, "--speedup-floor", "0")
    assert code == 1 and failed and all("pld" in row and "syncs_per_step" in row for row in failed), out


def test_a_changed_auto_pick_fails(gate, capsys, monkeypatch):
    from methods.medusa import MedusaDecoder

    monkeypatch.setattr(MedusaDecoder, "processed", lambda self, tree: 3 * tree.size)  # every tree priced dearer
    code, out, failed = check(gate, "pick", capsys, "--speedup-floor", "0")
    assert code == 1 and any("medusa" in row and "choice at setup" in row for row in failed), out


def test_a_slower_step_fails_on_the_same_machine(gate, capsys, monkeypatch):
    """PLD spends twice as long on every generation: its speedups, paired example by example
    with the baseline's, fall wholly below 1 (the other methods' rows stay ok)."""
    from methods.core.decoder import Decoder
    from methods.pld import PromptLookupDecoder

    def slower(self, *args, **kwargs):
        start = time.perf_counter()
        gen = Decoder.generate(self, *args, **kwargs)
        time.sleep(time.perf_counter() - start)
        return gen

    monkeypatch.setattr(PromptLookupDecoder, "generate", slower)
    code, out, failed = check(gate, "slow", capsys)
    assert code == 1 and any("pld" in row and "speedup" in row for row in failed), out
    assert all("speedup" in row for row in failed), out  # nothing but speed changed
