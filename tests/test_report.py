"""Reports: metrics on hand-made results (edge cases included) and a real headless browser."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from harness.metrics import acceptance_by_position, bootstrap_geomean_ci, draft_acceptance_rate, first_divergence, records_frame, rouge2, summarize
from harness.report import build_report


def _turn(tokens, accepted, drafts, text, t):
    return {"tokens": tokens, "text": text, "wall_time": t, "accepted": accepted, "draft_sizes": drafts,
            "draft_time": 0.01 * len(accepted) if any(drafts) else None,
            "verify_time": 0.02 * len(accepted) if any(drafts) else None, "prompt_tokens": 5}


def _record(method, ex, turn, task="builtin", category="chat", reference=None):
    return {"task": task, "example_id": ex, "category": category, "method": method, "reference": reference,
            "turns": [turn], "new_tokens": len(turn["tokens"]), "target_forwards": len(turn["accepted"]),
            "wall_time": turn["wall_time"], "skipped": None}


def make_run(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    recs = [
        _record("vanilla", "a", _turn([1, 2, 3, 4], [1, 1, 1, 1], [0, 0, 0, 0], "the cat sat down", 1.0),
                reference="the cat sat down", category="summarization"),
        _record("medusa", "a", _turn([1, 2, 3, 4], [1, 3], [0, 6], "the cat sat down", 0.5),
                reference="the cat sat down", category="summarization"),
        _record("vanilla", "b", _turn([5, 6, 7], [1, 1, 1], [0, 0, 0], "answer is 7", 0.8), reference="7",
                category="math"),
        _record("medusa", "b", _turn([5, 6, 9], [1, 1, 1], [0, 6, 6], "answer is 9", 1.0), reference="7",
                category="math"),
        _record("vanilla", "c", _turn([], [], [], "", 0.1)),  # zero new tokens
        _record("medusa", "c", _turn([], [], [], "", 0.1)),
    ]
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    manifest = {"config": {"model": "smollm2-135m", "max_new_tokens": 4}, "dtype": "float32", "status": "complete",
                "started": "now", "model": {"weight_bytes": 1000},
                "environment": {"device": "cpu", "cpu": "test cpu", "torch_threads": 2, "gpu": None},
                "tasks": {"builtin": {"hash": "h"}}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_metrics_on_hand_made_results(tmp_path):
    frame = records_frame(json.loads(l) for l in (make_run(tmp_path / "r") / "results.jsonl").read_text().splitlines())
    s = summarize(frame, by=("method",), weight_bytes=1000).set_index("method")
    assert s.loc["vanilla", "mean_accepted_length"] == pytest.approx(7 / 7)
    assert s.loc["medusa", "mean_accepted_length"] == pytest.approx(7 / 5)
    assert s.loc["medusa", "draft_size"] == pytest.approx(18 / 5)
    assert s.loc["medusa", "exact_match"] == pytest.approx(2 / 3)
    # per-prompt tokens/s ratios 2.0 and 0.8; example c (no tokens) is excluded and counted
    assert s.loc["medusa", "speedup_geomean"] == pytest.approx((2.0 * 0.8) ** (1 / 2))
    assert s.loc["medusa", "speedup_excluded"] == 1
    assert s.loc["medusa", "speedup_total"] == pytest.approx((7 / 1.5) / (7 / 1.8))
    assert s.loc["medusa", "length_differs"] == 0
    assert s.loc["vanilla", "rouge2"] == pytest.approx(1.0)
    assert s.loc["medusa", "answer_accuracy"] == 0.0 and s.loc["vanilla", "answer_accuracy"] == 1.0
    assert s.loc["vanilla", "bandwidth_gb_s"] == pytest.approx(1000 * 7 / 1.9 / 1e9)


def _speedup_frame(method_tokens, method_time, base_tokens, base_time, method_steps=None, base_steps=None):
    """One example, vanilla vs m; ``*_steps`` are (accepted, step_times) per target forward."""
    def rec(method, tokens, t, steps):
        accepted, times = steps if steps else ([1] * len(tokens), None)
        turn = {"tokens": tokens, "text": "x", "wall_time": t, "accepted": accepted, "draft_sizes": [0] * len(accepted)}
        if times is not None:
            turn["step_times"] = times
        return _record(method, "a", turn)
    return records_frame([rec("vanilla", base_tokens, base_time, base_steps),
                          rec("m", method_tokens, method_time, method_steps)])


def test_speedup_compares_equal_work():
    # identical outputs: the per-token and the wall-time definitions agree
    s = summarize(_speedup_frame([1, 2, 3, 4], 0.5, [1, 2, 3, 4], 1.0)).set_index("method")
    assert s.loc["m", "speedup_geomean"] == pytest.approx(2.0) == s.loc["m", "speedup_wall_time"]
    assert s.loc["m", "speedup_total"] == pytest.approx(2.0) and s.loc["m", "length_differs"] == 0
    # twice as long an output in twice the time is the same speed: 1.0, not 0.5
    s = summarize(_speedup_frame(list(range(8)), 2.0, list(range(4)), 1.0)).set_index("method")
    assert s.loc["m", "speedup_geomean"] == pytest.approx(1.0)
    assert s.loc["m", "speedup_wall_time"] == pytest.approx(0.5)
    assert s.loc["m", "length_differs"] == 1
    # zero new tokens: excluded with a count, never divided by
    s = summarize(_speedup_frame([], 0.1, [1, 2], 1.0)).set_index("method")
    assert math.isnan(s.loc["m", "speedup_geomean"]) and s.loc["m", "speedup_excluded"] == 1


def test_speedup_over_the_common_prefix():
    """Both emit 20 common tokens, then diverge; the method commits 2 per step at the same step cost."""
    base = list(range(40))
    method = list(range(20)) + [99] * 30
    from harness.metrics import paired_with_baseline, paired_speedups

    frame = _speedup_frame(method, 1.25, base, 4.0, method_steps=([2] * 25, [0.05] * 25),
                           base_steps=([1] * 40, [0.1] * 40))
    sp = paired_speedups(paired_with_baseline(frame).query("method == 'm'"))
    assert sp["speedup_prefix"] == pytest.approx((20 * 0.1) / (10 * 0.05)) and sp["prefix_examples"] == 1
    # a common prefix shorter than the minimum is left out
    sp = paired_speedups(paired_with_baseline(frame).query("method == 'm'"), min_prefix=21)
    assert math.isnan(sp["speedup_prefix"]) and sp["prefix_examples"] == 0


def test_metric_edge_cases():
    assert acceptance_by_position([0, 3, 3], [0, 0, 0]) == [0.0, 0.0, 0.0]  # never accepts a draft
    assert acceptance_by_position([0], [0]) == [] and math.isnan(draft_acceptance_rate([0], [0]))  # never drafts
    assert bootstrap_geomean_ci([2.0]) == (2.0, 2.0)  # a single example
    lo, hi = bootstrap_geomean_ci([1.0, 2.0, 4.0])
    assert 1.0 <= lo <= 2.0 <= hi <= 4.0
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1 and first_divergence([1, 2], [1, 2, 3]) == 2
    assert rouge2("", "") == 1.0 and rouge2("the cat sat", "the cat sat") == 1.0


def _drafting_run(path: Path) -> Path:
    """Vanilla: 8 tokens in 1.0 s. m: 9 tokens in 0.5 s over 5 passes whose drafts reach depths
    0 (prefill), 3, 3, 2, 1 and accept 0, 2, 0, 2, 0 of them."""
    path.mkdir(parents=True, exist_ok=True)
    base = _turn(list(range(8)), [1] * 8, [0] * 8, "x", 1.0)
    base.update(draft_depths=[0] * 8, accepted_drafts=[0] * 8)
    m = _turn(list(range(9)), [1, 3, 1, 3, 1], [0, 5, 5, 3, 1], "x", 0.5)  # a tree: 5 nodes, 3 deep
    m.update(draft_depths=[0, 3, 3, 2, 1], accepted_drafts=[0, 2, 0, 2, 0])
    recs = [_record("vanilla", "a", base), _record("m", "a", m)]
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    manifest = json.loads((make_run(tmp := path.parent / (path.name + "-base")) / "manifest.json").read_text())
    shutil.rmtree(tmp)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_draft_metrics_the_field_reports(tmp_path):
    from harness.results import read_records

    run = _drafting_run(tmp_path / "run")
    s = summarize(records_frame(read_records(run / "results.jsonl"))).set_index("method")
    assert s.loc["m", "draft_acceptance_rate"] == pytest.approx(4 / 9)  # accepted / drafted depth, not nodes
    assert s.loc["m", "draft_depth_per_step"] == pytest.approx(9 / 5)
    assert s.loc["m", "accepted_drafts_per_step"] == pytest.approx(4 / 5)
    # position 1: 2 of the 4 steps that drafted; 2: 2 of the 3 that reached it; 3: 0 of 2
    assert s.loc["m", "acceptance_by_position"] == pytest.approx([0.5, 2 / 3, 0.0])
    # drafting 0.01 s and verifying 0.02 s per step: shares of their sum, not of wall time
    assert s.loc["m", "draft_share"] == pytest.approx(1 / 3) and s.loc["m", "verify_share"] == pytest.approx(2 / 3)
    # measured 18 tok/s over vanilla's 8; every draft accepted: (5 passes + 9 drafted) / 0.5 s = 28 tok/s
    assert s.loc["m", "speedup_geomean"] == pytest.approx(2.25)
    assert s.loc["m", "speedup_bound"] == pytest.approx(3.5)
    assert s.loc["m", "bound_reached"] == pytest.approx(2.25 / 3.5)
    assert s.loc["vanilla", "speedup_bound"] == pytest.approx(1.0)  # no draft: its own ceiling
    assert math.isnan(s.loc["vanilla", "draft_acceptance_rate"]) and s.loc["vanilla", "acceptance_by_position"] == []
    page = build_report(run).read_text()
    table = page[page.index('id="drafts-table"'):page.index("</table>", page.index('id="drafts-table"'))]
    for cell in ("1.80", "0.80", "44%", "50%", "33%", "67%", "2.25x", "3.50x", "64%"):
        assert f"<td>{cell}</td>" in table, cell
    assert "<td class=\"l\">vanilla</td>" not in table  # the baseline drafts nothing
    assert "Acceptance by draft position</figcaption>" in page and 'id="acceptance-position-legend-m"' in page


def test_records_without_draft_depths_still_load_check_and_render(tmp_path):
    """Records written before the per-step depths: the new metrics are missing ("–"), nothing fails;
    a depth list that does not match the steps is refused in one line."""
    from base.errors import UserError
    from harness.results import check_record, read_records

    run = make_run(tmp_path / "run")
    records = read_records(run / "results.jsonl")
    assert not any("draft_depths" in t for r in records for t in r["turns"])
    s = summarize(records_frame(records)).set_index("method")
    for key in ("draft_acceptance_rate", "draft_depth_per_step", "speedup_bound", "bound_reached"):
        assert math.isnan(s.loc["medusa", key]), key
    assert s.loc["medusa", "acceptance_by_position"] == []
    timed = summarize(records_frame(r for r in records if r["example_id"] != "c")).set_index("method")
    assert timed.loc["medusa", "draft_share"] == pytest.approx(1 / 3)  # timed before depths were recorded
    page = build_report(run).read_text()
    table = page[page.index('id="drafts-table"'):page.index("</table>", page.index('id="drafts-table"'))]
    assert table.count("<td>–</td>") >= 5 and "medusa" in table
    bad = dict(records[1], turns=[dict(records[1]["turns"][0], draft_depths=[0])])
    with pytest.raises(UserError, match="1 draft_depths for 2 steps"):
        check_record(bad, "results.jsonl:2")


def test_claims_section_only_when_firp_runs_beside_another_method(tmp_path):
    def with_methods(name: str, rename: dict[str, str], keep: set[str]) -> str:
        run = make_run(tmp_path / name)
        recs = [json.loads(l) for l in (run / "results.jsonl").read_text().splitlines()]
        recs = [dict(r, method=rename.get(r["method"], r["method"])) for r in recs]
        recs = [r for r in recs if r["method"] in keep]
        (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        manifest = json.loads((run / "manifest.json").read_text())
        manifest["config"]["methods"] = [m for m in ("vanilla", "firp", "medusa") if m in keep]
        (run / "manifest.json").write_text(json.dumps(manifest))
        return build_report(run).read_text()

    assert "Claims of the FIRP paper" not in with_methods("no-firp", {}, {"vanilla", "medusa"})
    assert "Claims of the FIRP paper" not in with_methods("firp-alone", {"medusa": "firp"}, {"firp"})
    page = with_methods("firp-vanilla", {"medusa": "firp"}, {"vanilla", "firp"})
    assert page.count('<section id="claims">') == 1 and page.index('id="claims"') < page.index('id="charts"')
    table = page[page.index('id="claims-table"'):page.index("</table>", page.index('id="claims-table"'))]
    assert "does not hold here" in table  # 1.26x, short of 1.9x
    assert table.count("not measured in this run") >= 5 and "add medusa to --methods" in table
    assert "add self_spec to --methods" in table and "add lookahead to --methods" in table


def add_third_method_and_divergences(run: Path) -> Path:
    """pld beside medusa (three colours to keep apart), and a divergence file with a numerics and a real case."""
    lines = (run / "results.jsonl").read_text().splitlines()
    extra = []
    for line in lines:
        rec = json.loads(line)
        if rec["method"] == "medusa":
            rec["method"] = "pld"
            for turn in rec["turns"]:
                turn["wall_time"] *= 0.8
            rec["wall_time"] *= 0.8
            extra.append(json.dumps(rec))
    (run / "results.jsonl").write_text("\n".join(lines + extra) + "\n")
    divs = [
        {"task": "builtin", "example_id": "b", "method": "medusa", "turn": 0, "position": 2, "vanilla_token": 7,
         "method_token": 9, "chosen_gap": 0.0, "top2_gap": 0.0, "reference_gap": 0.01, "error": 0.05,
         "tolerance": 0.05, "verdict": "numerics", "near_tie": True},
        {"task": "builtin", "example_id": "b", "method": "pld", "turn": 0, "position": 2, "vanilla_token": 7,
         "method_token": 9, "chosen_gap": 3.0, "top2_gap": 0.5, "reference_gap": 3.1, "error": 0.05,
         "tolerance": 0.05, "verdict": "real", "near_tie": False},
    ]
    (run / "divergences.jsonl").write_text("".join(json.dumps(d) + "\n" for d in divs))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"]["methods"] = ["vanilla", "medusa", "pld"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def test_report_opens_with_one_line_answer_pivot_and_verdicts(tmp_path):
    from harness.report import headline

    run = add_third_method_and_divergences(make_run(tmp_path / "run"))
    page = build_report(run).read_text()
    # pld: medusa's outputs in 0.8x the time, so the fastest; its speedup is over the 2 examples with tokens
    # (the empty example is excluded from speedups)
    from harness.metrics import records_frame, summarize

    s = summarize(records_frame(json.loads(l) for l in (run / "results.jsonl").read_text().splitlines()))
    best = s[s.method != "vanilla"].sort_values("speedup_geomean").iloc[-1]
    assert best.method == "pld"
    line = f"fastest: pld {best.speedup_geomean:.2f}x [{best.speedup_ci_low:.2f}, {best.speedup_ci_high:.2f}] " \
           "over 2 examples; 1 real divergence from vanilla"
    assert line in page
    assert page.index('id="headline"') < page.index('id="summary"')
    assert headline(s.iloc[:0], []) == "no completed generations yet"
    slow = s.assign(speedup_geomean=s.speedup_geomean.where(s.method == "vanilla", 0.5))
    assert headline(slow, []).startswith("fastest: vanilla; no method beats it here (best: ")
    # the pivot: one row per category, one column per method, each cell its speedup and accepted length
    assert page.count('<table class="categories">') == 1
    pivot = page[page.index('<table class="categories">'):]
    pivot = pivot[:pivot.index("</table>")]
    assert pivot.count("<tr><td") == 3 and all(c in pivot for c in ("summarization", "math", "chat"))
    assert pivot.count('<th class="group name">') == 2  # medusa, pld
    assert pivot.count('<span class="speedup">') == 6 and pivot.count('<span class="mal">') == 6
    # the verdicts: per method, the rows themselves collapsed
    verdicts = page[page.index('<table class="verdicts">'):]
    verdicts = verdicts[:verdicts.index("</table>")]
    assert "REAL DISCREPANCY" in page and 'class="alarm"' in page
    assert '<details class="divergence-rows">' in page
    assert "Tokens processed per step</strong>" in page and "Draft tokens verified per step</strong>" in page


def test_report_build_emits_no_warnings(tmp_path, caplog):
    """No matplotlib legend warning (it is logged, not warned) nor any Python warning, with or without
    methods beside vanilla."""
    import logging
    import warnings

    vanilla_only = make_run(tmp_path / "v")
    lines = [l for l in (vanilla_only / "results.jsonl").read_text().splitlines() if '"vanilla"' in l]
    (vanilla_only / "results.jsonl").write_text("\n".join(lines) + "\n")
    full = add_third_method_and_divergences(make_run(tmp_path / "f"))
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error")
        build_report(vanilla_only)
        build_report(full)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "vanilla only" in (vanilla_only / "report.html").read_text()


def test_report_is_self_contained(tmp_path):
    out = build_report(make_run(tmp_path / "run"))
    page = out.read_text()
    assert page.count("<svg") >= 4 and "<script" not in page
    for needle in ('src="http', 'href="http', "@import", "url(http"):
        assert needle not in page
    assert 'class="summary"' in page and "diverges at token 2" in page and '<mark class="diverge">' in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_in_headless_chromium(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    out = build_report(add_third_method_and_divergences(make_run(tmp_path / "run")))
    errors: list[str] = []
    requests: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(out.as_uri())
        assert page.locator("table.summary tbody tr").count() >= 3
        assert page.locator("figure.chart svg").count() == 5  # four charts and the per-category one
        assert page.locator("details.example").count() == 3
        assert page.locator("#headline").inner_text().startswith("fastest: pld ")
        # the pivot and the per-method divergence summary are there; the divergence rows start collapsed
        assert page.locator("table.categories tbody tr").count() == 3
        assert page.locator("table.verdicts tbody tr").count() == 2
        assert not page.locator("details.divergence-rows").evaluate("d => d.open")
        assert page.locator("table.verdicts tr.real td.realcount").inner_text() == "1"
        # one colour per method, the same in every chart: read each legend entry's drawn colour
        colours = page.evaluate("""() => {
            const out = {};
            for (const g of document.querySelectorAll('figure.chart svg g[id*="-legend-"]')) {
                const [chart, method] = g.id.split('-legend-');
                const shape = [...g.querySelectorAll('path, use')].find(e => !e.closest('defs'));
                const style = getComputedStyle(shape);
                const paint = [style.fill, style.stroke].find(c => c && c !== 'none' && c !== 'rgb(255, 255, 255)');
                (out[method] = out[method] || {})[chart] = paint;
            }
            return out;
        }""")
        assert set(colours) == {"vanilla", "medusa", "pld"}, colours
        for method, by_chart in colours.items():
            assert len(set(by_chart.values())) == 1, (method, by_chart)
        assert len(colours["medusa"]) >= 4 and len(colours["pld"]) >= 4  # in (nearly) every chart
        per_method = {m: next(iter(c.values())) for m, c in colours.items()}
        assert len(set(per_method.values())) == 3, per_method  # and different methods, different colours
        assert per_method["vanilla"] == "rgb(140, 140, 140)"  # vanilla: always the same grey
        # nothing overflows a 1400-pixel window, and the summary table fits its box
        assert page.evaluate("document.documentElement.scrollWidth") <= 1400
        box = page.evaluate("""() => { const b = document.querySelector('#summary-box');
                                       return [b.scrollWidth, b.clientWidth]; }""")
        assert box[0] <= box[1], box
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert all(u.startswith("file://") for u in requests), requests
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_console_summary_fits_100_columns(tmp_path):
    """Long task and variant names included: no line over 100 columns, nothing cut to an ellipsis."""
    from rich.console import Console

    from harness.summary import print_summary

    run = make_run(tmp_path / "run")
    lines = (run / "results.jsonl").read_text().splitlines()
    long_task = "spec_bench:summarization+math_reasoning"
    extra = []
    for line in lines:
        rec = json.loads(line)
        rec["task"] = long_task
        if rec["method"] == "medusa":
            rec["method"] = "medusa@tree=8x4x2@heads=runs/medusa-heads"
        extra.append(json.dumps(rec))
    (run / "results.jsonl").write_text("\n".join(lines + extra) + "\n")
    console = Console(width=100, record=True, color_system=None)
    print_summary(run, console=console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "…" not in text and "..." not in text
    for header in ("speedup", "proc.", "draft", "exact", "len."):
        assert header in text
    rows = text.splitlines()
    header = next(line for line in rows if " method " in line)
    for column, name in (("task", long_task), ("method", "medusa@tree=8x4x2@heads=runs/medusa-heads")):
        start = header.index(column)  # a folded name continues on the next lines of its own column
        cells = "".join(line[start:].split(" ")[0] if len(line) > start else "" for line in rows)
        assert name in cells


def test_report_says_how_each_method_was_trained_and_what_its_tree_predicted(tmp_path):
    from harness.report import build_report
    from methods.core.training import training_summary

    run = make_run(tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    meta = {"train_config": {"data": ["/x/gsm8k/train.jsonl", "/x/boolq/dev.jsonl"], "limit": 1200, "epochs": 3,
                             "max_new_tokens": 96, "lr": 0.0003, "patience": 3},
            "train_sequences": 1124, "train_steps": 450, "stopped": "plateau", "best_step": 300,
            "val_metric": "teacher-forced accepted length, best 12-node tree",
            "val_curve": [{"step": 150, "value": 1.9}, {"step": 300, "value": 2.07}, {"step": 450, "value": 2.05}],
            "train_time_s": 600.0}
    choice = {"draft_size": 8, "processed": 9, "predicted_speedup": 1.61}
    manifest["methods"] = {"vanilla": {}, "medusa": {"training": training_summary(meta), "tree_choice": choice}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    page = build_report(run).read_text()
    table = page[page.index('id="training-table"'):page.index("</table>", page.index('id="training-table"'))]
    assert "gsm8k/train.jsonl, boolq/dev.jsonl (first 1200 prompts)" in table and "plateau (best step 300), patience 3" in table
    assert "<td class=\"lr\">0.0003</td>" in table  # the peak learning rate, which methods may set apart
    assert "2.070 (teacher-forced accepted length, best 12-node tree)" in table
    assert "1.61x" in table and "8 nodes, 9 processed" in table
    assert "vanilla" not in table  # untrained methods have no row
    # a broader set and a step ceiling are said too
    meta["train_config"].update(limit=3000, self_prompts=1000, max_steps=1000)
    manifest["methods"]["medusa"]["training"] = training_summary(meta)
    (run / "manifest.json").write_text(json.dumps(manifest))
    page = build_report(run).read_text()
    assert "(first 3000 prompts; + 1000 self-written)" in page and "at most 1000 steps" in page
    # summary requests and a continued run are said too
    meta["train_config"].update(summary_prompts=1000, init_from="runs/medusa-heads-broad")
    manifest["methods"]["medusa"]["training"] = training_summary(meta)
    (run / "manifest.json").write_text(json.dumps(manifest))
    page = build_report(run).read_text()
    assert "+ 1000 self-written; + 1000 summary requests; continued from runs/medusa-heads-broad" in page
    # a held rate cut at each stall (schedule=plateau) is said, with the steps of the cuts
    meta["train_config"].update(schedule="plateau", lr_factor=0.3)
    meta["lr_cuts"] = [400, 650]
    manifest["methods"]["medusa"]["training"] = training_summary(meta)
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert "plateau (best step 300), patience 3; lr held, cut 0.3x at steps 400, 650" in build_report(run).read_text()
    # a file trained in stages: every stage's steps, rate, stop and minutes, oldest first
    meta["continued_from"] = {"folder": "runs/medusa-heads-broad", "train_steps": 1700, "best_step": 1700,
                              "stopped": "budget", "lr_cuts": [1450], "train_time_s": 900.0,
                              "train_config": {"lr": 0.001, "schedule": "plateau", "max_steps": 1700},
                              "val_curve": [{"step": 1700, "value": 1.99}]}
    manifest["methods"]["medusa"]["training"] = training_summary(meta)
    (run / "manifest.json").write_text(json.dumps(manifest))
    page = build_report(run).read_text()
    table = page[page.index('id="training-table"'):page.index("</table>", page.index('id="training-table"'))]
    assert "<td>1700 + 450</td>" in table and "<td class=\"lr\">0.001, then 0.0003</td>" in table and "<td>25.0</td>" in table
    assert ("lr held, cut 0.3x at steps 400, 650, at most 1000 steps; continued from a run of 1700 steps that stopped: budget "
            "(best step 1700); lr held, cut 0.3x at step 1450, at most 1700 steps") in table
    assert "trained in 2 stages" in table and "continued from runs/medusa-heads-broad" not in table
    # a continuation that never beat its start says so
    meta.update(best_step=0)
    manifest["methods"]["medusa"]["training"] = training_summary(meta)
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert "plateau (best step 0, its start), patience 3" in build_report(run).read_text()
    assert training_summary({"fc.weight": 1}) is None  # a foreign checkpoint's config says nothing


def test_environment_holds_the_baseline_step_against_the_bandwidth_limit(tmp_path):
    """The machine's label, and vanilla's median decode step (prefill steps left out, per turn)
    as a fraction of the limit the manifest's read bandwidth and step bytes set."""
    run = make_run(tmp_path / "run")
    recs = [json.loads(l) for l in (run / "results.jsonl").read_text().splitlines()]
    # prefills of 0.5 s and 0.6 s: counted, they would move the median to 40.0 ms
    recs[0]["turns"][0]["step_times"] = [0.5, 0.036, 0.038, 0.040]
    recs[2]["turns"][0]["step_times"] = [0.6, 0.040, 0.037]
    recs[1]["turns"][0]["step_times"] = [0.5, 0.001]  # medusa's steps are not the baseline's (37.5 ms)
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    manifest = json.loads((run / "manifest.json").read_text())
    page = build_report(run).read_text()
    assert "Machine: <strong>test cpu, 2 threads</strong>" in page  # an older manifest: what it has
    assert 'id="roofline"' not in page  # no decode limit recorded: no fraction to show
    manifest["environment"].update(machine={"kind": "cpu", "name": "AMD EPYC", "vector_units": ["AVX2"],
                                            "threads": 2, "torch": "2.13.0"}, read_bandwidth_gbs=24.4)
    manifest["decode_limit"] = {"context": 180, "context_rule": "median prompt tokens + half of max_new_tokens",
                                "step_bytes": 269_000_000, "read_bandwidth_gbs": 24.4, "step_limit_ms": 11.025}
    (run / "manifest.json").write_text(json.dumps(manifest))
    page = build_report(run).read_text()
    assert "Machine: <strong>AMD EPYC (AVX2), 2 threads</strong>" in page and "24.4 GB/s" in page
    assert "vanilla: 38.0 ms a step, limit 11.0 ms (bandwidth 24.4 GB/s × 269 MB): 29% of the limit" in page


def test_report_says_which_methods_took_plain_steps_and_why(tmp_path):
    from methods.core.fitting import fitted

    run = make_run(tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["methods"] = {"vanilla": {}, "medusa": {"fitted": fitted(0.88, "the 1-node tree")}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    page = build_report(run).read_text()
    table = page[page.index('id="fitted-table"'):page.index("</table>", page.index('id="fitted-table"'))]
    assert "plain steps" in table and "0.88x" in table and "the 1-node tree" in table
    assert "<td class=\"l\">vanilla</td>" not in table  # only methods that fitted their drafts have a row
    manifest["methods"]["medusa"]["fitted"] = fitted(1.3, "the 4-node tree")
    (run / "manifest.json").write_text(json.dumps(manifest))
    page = build_report(run).read_text()
    assert "<td class=\"l\">drafts</td>" in page and "1.30x" in page


EIGHT = ["vanilla", "medusa", "firp", "eagle", "sps", "pld", "lookahead", "self_spec"]


def make_eight_method_run(path: Path) -> Path:
    """Every method of the project over two tasks of three categories each, with the training,
    fitting and draft-parameter rows a real run of all eight writes (long texts included)."""
    from methods.core.fitting import fitted
    from methods.core.training import training_summary

    path.mkdir(parents=True, exist_ok=True)
    recs = []
    for task, categories in (("spec_bench", ("summarization", "math_reasoning", "multi-turn_conversation")),
                             ("mt_bench", ("writing", "roleplay", "extraction"))):
        for i, category in enumerate(categories):
            for j, method in enumerate(EIGHT):
                depth = 0 if method == "vanilla" else 1 + j % 5
                turn = _turn(list(range(12)), [1] * 12 if method == "vanilla" else [1] + [2] * 5 + [1],
                             [0] * 12 if method == "vanilla" else [0] + [3 * depth] * 6, "the cat sat down",
                             1.0 if method == "vanilla" else 0.6 + 0.05 * j)
                turn["draft_depths"] = [0] + [depth] * (len(turn["accepted"]) - 1)
                turn["accepted_drafts"] = [a - 1 if a > 1 else 0 for a in turn["accepted"]]
                recs.append(_record(method, f"{category}-{i}", turn, task=task, category=category,
                                    reference="the cat sat down"))
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    meta = {"train_config": {"data": ["/work/shared/data/spec_bench/question.jsonl",
                                      "/work/shared/data/gsm8k/train.jsonl", "/work/shared/data/xsum/train.jsonl"],
                             "limit": 3000, "epochs": 3, "max_new_tokens": 96, "self_prompts": 1000,
                             "summary_prompts": 1000, "max_steps": 1000, "init_from": "runs/firp-maps-broad-layer-12"},
            "train_sequences": 3761, "train_steps": 1000, "stopped": "step ceiling", "best_step": 950,
            "val_metric": "teacher-forced accepted length, best 12-node tree",
            "val_curve": [{"step": 950, "value": 2.07}], "train_time_s": 3600.0}
    methods = {m: {"draft_parameters": {"parameters": 997_056 * (k % 3), "bytes": 3_988_224 * (k % 3)},
                   "drafter": "3 heads, each with its own LM head (Medusa-1 as published)"}
               for k, m in enumerate(EIGHT)}
    for m in ("medusa", "firp", "eagle", "sps"):
        methods[m]["training"] = training_summary(meta)
        methods[m]["tree_choice"] = {"draft_size": 12, "processed": 30, "predicted_speedup": 1.61}
    for m in ("eagle", "sps", "pld", "lookahead"):
        methods[m]["fitted"] = fitted(0.88, "the 3-token draft of depth 3 at the measured verify cost of 4 rows")
    manifest = {"config": {"model": "smollm2-135m", "max_new_tokens": 128, "methods": EIGHT}, "dtype": "bfloat16",
                "status": "complete", "started": "now", "model": {"weight_bytes": 1000}, "methods": methods,
                "environment": {"device": "cpu", "cpu": "test cpu", "torch_threads": 2, "gpu": None},
                "tasks": {"spec_bench": {"hash": "h"}, "mt_bench": {"hash": "i"}}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_with_eight_methods_fits_1400_pixels(tmp_path):
    """All eight methods in a 1400-pixel window: no table runs past the page's column and no
    scrolling box hides columns at its right (the category pivot and the training table did)."""
    playwright = pytest.importorskip("playwright.sync_api")
    out = build_report(make_eight_method_run(tmp_path / "run"))
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(out.as_uri())
        for sel in ("table.categories", "#training-table", "#drafts-table", "#fitted-table", "table.summary"):
            assert page.locator(sel).count() == 1, sel
        assert page.locator("table.categories thead th.group").count() == 7  # one column per method
        assert page.locator("#claims-table tbody tr").count() >= 10  # FIRP beside the seven others
        page.evaluate("for (const d of document.querySelectorAll('details')) d.open = true")
        overflow = page.evaluate("""() => {
            const right = document.body.getBoundingClientRect().right;
            const out = [];
            for (const box of document.querySelectorAll('.scroll'))
                if (box.scrollWidth > box.clientWidth + 1) out.push(['hidden at the right', box.id || box.firstElementChild.className || box.firstElementChild.id, box.scrollWidth, box.clientWidth]);
            for (const t of document.querySelectorAll('table'))
                if (t.getBoundingClientRect().right > right + 1) out.push(['past the page', t.id || t.className, t.getBoundingClientRect().right, right]);
            if (document.documentElement.scrollWidth > 1400) out.push(['page', document.documentElement.scrollWidth]);
            return out;
        }""")
        page.screenshot(path=str(tmp_path / "eight.png"), full_page=True)
        browser.close()
    assert overflow == [], overflow
