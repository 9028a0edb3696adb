"""The FIRP paper's claims against a run: each verdict from plain numbers, no run needed."""

from __future__ import annotations

import math

import pytest

from harness.claims import FAILS, HOLDS, UNMEASURED, firp_claims

NAN = math.nan


def m(speedup=NAN, draft=NAN, length=NAN, rate=NAN, rouge=NAN):
    return {"speedup_geomean": speedup, "speedup_ci_low": speedup * 0.9, "speedup_ci_high": speedup * 1.1,
            "draft_size": draft, "mean_accepted_length": length, "draft_acceptance_rate": rate, "rouge2": rouge}


ALL = ["vanilla", "firp", "medusa", "lookahead", "self_spec"]


def by_claim(rows):
    return {r.claim: r for r in rows}


def test_every_claim_holds_when_this_run_bears_it_out():
    rows = by_claim(firp_claims({
        "vanilla": m(1.0, 0.0, 1.0, NAN, 0.150),
        "firp": m(2.2, 1.5, 2.1, 0.45, 0.150),
        "medusa": m(1.5, 10.5, 1.9, 0.30, 0.150),
        "lookahead": m(1.2, 20.0, 1.4, 0.10, 0.150),
        "self_spec": m(1.0, 4.0, 1.5, 0.40, 0.150),
    }, ALL))
    assert list(rows) == ["1.9-3x speedup over vanilla", "faster than medusa", "faster than lookahead",
                          "faster than self_spec", "drafts about 7x fewer tokens per step than medusa",
                          "better per-step draft accuracy than medusa's heads", "Rouge-2 maintained against vanilla"]
    assert all(r.verdict == HOLDS and r.needed == "" for r in rows.values()), rows
    assert "2.20x [1.98, 2.42]" in rows["1.9-3x speedup over vanilla"].numbers
    assert rows["faster than medusa"].numbers.endswith(": 1.47x")
    assert rows["drafts about 7x fewer tokens per step than medusa"].numbers.endswith(": 7.0x")
    assert "acceptance rate 45%" in rows["better per-step draft accuracy than medusa's heads"].numbers


def test_claims_that_this_run_contradicts_do_not_hold():
    rows = by_claim(firp_claims({
        "vanilla": m(1.0, 0.0, 1.0, NAN, 0.150),
        "firp": m(1.2, 3.0, 2.1, 0.25, 0.120),
        "medusa": m(1.5, 9.0, 1.9, 0.30, 0.150),  # accepts less per step, but a larger share of its depth
        "pld": m(1.1, 2.0, 1.2, 0.2, 0.15),  # a baseline the paper did not use, present here: compared too
    }, ["vanilla", "firp", "medusa", "pld"]))
    assert rows["1.9-3x speedup over vanilla"].verdict == FAILS
    assert rows["faster than medusa"].verdict == FAILS and rows["faster than pld"].verdict == HOLDS
    assert rows["drafts about 7x fewer tokens per step than medusa"].verdict == FAILS  # 3x
    assert rows["better per-step draft accuracy than medusa's heads"].verdict == FAILS  # the rate is lower
    assert rows["Rouge-2 maintained against vanilla"].verdict == FAILS  # 0.120 < 98% of 0.150


@pytest.mark.parametrize("ratio_draft, verdict", [(10.5 / 1.5, HOLDS), (5.25, HOLDS), (5.2, FAILS)])
def test_about_seven_times_fewer_allows_a_quarter_below(ratio_draft, verdict):
    rows = by_claim(firp_claims({"vanilla": m(1.0, 0.0, 1.0), "firp": m(1.9, 1.0, 2.0, 0.5, NAN),
                                 "medusa": m(1.5, ratio_draft, 1.5, 0.3)}, ["vanilla", "firp", "medusa"]))
    assert rows["drafts about 7x fewer tokens per step than medusa"].verdict == verdict
    assert rows["1.9-3x speedup over vanilla"].verdict == HOLDS  # 1.9x exactly is the claim's low end


def test_claims_this_run_cannot_decide_say_what_would():
    # FIRP beside vanilla alone, on tasks without reference texts
    rows = by_claim(firp_claims({"vanilla": m(1.0, 0.0, 1.0), "firp": m(2.0, 1.5, 2.0, 0.5)}, ["vanilla", "firp"]))
    for name in ("medusa", "lookahead", "self_spec"):
        assert rows[f"faster than {name}"].verdict == UNMEASURED
        assert rows[f"faster than {name}"].needed == f"add {name} to --methods"
    for claim in ("drafts about 7x fewer tokens per step than Medusa", "better per-step draft accuracy than Medusa's heads"):
        assert rows[claim].verdict == UNMEASURED and rows[claim].needed == "add medusa to --methods"
    rouge = rows["Rouge-2 maintained against vanilla"]
    assert rouge.verdict == UNMEASURED and "xsum" in rouge.needed
    assert rows["1.9-3x speedup over vanilla"].verdict == HOLDS
    # FIRP took plain steps throughout: its drafts cannot be compared, and the row says how to make it draft
    rows = by_claim(firp_claims({"vanilla": m(1.0, 0.0, 1.0), "firp": m(0.98, 0.0, 1.0, NAN),
                                 "medusa@tree=8x4x2": m(1.3, 9.0, 1.8, 0.3)}, ["vanilla", "firp", "medusa@tree=8x4x2"]))
    for claim in ("drafts about 7x fewer tokens per step than medusa@tree=8x4x2",
                  "better per-step draft accuracy than medusa@tree=8x4x2's heads"):
        assert rows[claim].verdict == UNMEASURED and "firp@tree=trained" in rows[claim].needed
    assert "faster than medusa" not in rows  # the variant answers for medusa
    # no vanilla: no speedup and no Rouge-2 comparison
    rows = by_claim(firp_claims({"firp": m(NAN, 1.5, 2.0), "medusa": m(NAN, 9.0, 1.8)}, ["firp", "medusa"]))
    speed = next(r for c, r in rows.items() if c.startswith("1.9-3x"))
    assert speed.verdict == UNMEASURED and "--no-baseline" in speed.needed
    assert rows["Rouge-2 maintained against vanilla"].verdict == UNMEASURED
    assert rows["drafts about 7x fewer tokens per step than medusa"].verdict == HOLDS  # 6.0x: counts need no baseline


def test_no_claims_without_firp_beside_another_method():
    assert firp_claims({"firp": m(NAN, 1.5, 2.0)}, ["firp"]) == []
    assert firp_claims({"vanilla": m(1.0), "medusa": m(1.5, 9.0, 1.8)}, ["vanilla", "medusa"]) == []


def test_firp_taking_plain_steps_decides_no_comparison_with_a_baseline():
    """Where FIRP's cost fit chose plain steps, 1.00x against another method's 1.00x compares two
    fits, not FIRP's drafting: not measured, with the always-drafting variant named."""
    rows = by_claim(firp_claims({"vanilla": m(1.0, 0.0, 1.0, NAN, 0.15), "firp": m(1.004, 0.0, 1.0, NAN, 0.15),
                                 "medusa": m(1.001, 0.0, 1.0, NAN, 0.15)}, ["vanilla", "firp", "medusa"]))
    assert rows["faster than medusa"].verdict == UNMEASURED
    assert "firp@tree=trained" in rows["faster than medusa"].needed
    speed = rows["1.9-3x speedup over vanilla"]
    assert speed.verdict == FAILS and "firp@tree=trained" in speed.needed and "drafted nothing" in speed.numbers


def test_a_rouge_drop_from_numerics_alone_is_not_the_method():
    metrics = {"vanilla": m(1.0, 0.0, 1.0, NAN, 0.056), "firp": m(1.2, 4.0, 1.9, 0.3, 0.049)}
    numerics = by_claim(firp_claims(metrics, ["vanilla", "firp"], {"firp": {"divergences": 11, "real": 0}}))
    assert numerics["Rouge-2 maintained against vanilla"].verdict == UNMEASURED
    assert "float32" in numerics["Rouge-2 maintained against vanilla"].needed
    real = by_claim(firp_claims(metrics, ["vanilla", "firp"], {"firp": {"divergences": 11, "real": 1}}))
    assert real["Rouge-2 maintained against vanilla"].verdict == FAILS
