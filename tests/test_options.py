"""Aliases and presets in the neutral option layer (``base/options.py``): another project's names for
our options, converted to our meaning before anything loads, and named sets of settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import pytest

from base.errors import UserError
from base.options import Alias, Preset, alias_values, describe_options, option, parse_options


@dataclass(frozen=True)
class Toy:
    """Two options; upstream calls ``levels`` ``passes`` (one fewer) and ``width`` ``k`` (the same)."""

    ALIASES: ClassVar[tuple[Alias, ...]] = (
        Alias("passes", "levels", "levels = passes + 1", help="expansion passes",
              to_ours=lambda v: v + 1, from_ours=lambda v: v - 1),
        Alias("k", "width", "width = k"),
    )
    PRESETS: ClassVar[dict[str, Preset]] = {"paper": Preset({"passes": 4, "k": 8}, "the paper's setting")}

    levels: int = option(3, min=1, max=10, help="levels drafted")
    width: int = option(2, min=1, max=16)
    name: str = option("x")


def test_an_alias_sets_our_option_in_our_meaning():
    assert parse_options(Toy, {"passes": "4", "k": "5"}, where="toy") == Toy(levels=5, width=5)
    assert parse_options(Toy, {"levels": "5", "passes": "4"}, where="toy").levels == 5  # two names that agree
    assert alias_values(Toy(levels=5, width=5)) == {"passes": 4, "k": 5}
    assert alias_values(Toy(levels=5)) != alias_values(Toy(levels=6))


def test_two_names_that_disagree_are_refused():
    with pytest.raises(UserError, match=r"toy.levels=4 and toy.passes=4 set levels to 4 and 5 "
                                        r"\(levels = passes \+ 1\); give one of the two names"):
        parse_options(Toy, {"levels": "4", "passes": "4"}, where="toy")


def test_an_alias_out_of_range_is_told_in_its_own_terms():
    with pytest.raises(UserError, match=r"bad value for toy.passes: 10 is above the maximum 9 \(levels = passes \+ 1\)"):
        parse_options(Toy, {"passes": 10}, where="toy")
    with pytest.raises(UserError, match=r"bad value for toy.passes: -1 is below the minimum 0"):
        parse_options(Toy, {"passes": -1}, where="toy")
    with pytest.raises(UserError, match=r"bad value for toy.levels: 0 is below the minimum 1$"):
        parse_options(Toy, {"levels": 0}, where="toy")  # our own name checked in ours
    with pytest.raises(UserError, match="bad value for toy.k: expected an integer, got 'wide'"):
        parse_options(Toy, {"k": "wide"}, where="toy")


def test_a_preset_is_a_base_that_the_same_layer_overrides():
    assert parse_options(Toy, {"preset": "paper"}, where="toy") == Toy(levels=5, width=8)
    assert parse_options(Toy, {"preset": "paper", "width": "3"}, where="toy") == Toy(levels=5, width=3)
    assert parse_options(Toy, {"preset": "paper", "passes": "1"}, where="toy") == Toy(levels=2, width=8)
    with pytest.raises(UserError, match="unknown preset toy.preset=blog; valid presets for toy: paper"):
        parse_options(Toy, {"preset": "blog"}, where="toy")


def test_later_layers_override_earlier_ones_under_either_name():
    assert parse_options(Toy, {"width": "4"}, {"k": "9"}, where="toy").width == 9
    assert parse_options(Toy, {"k": "9"}, {"width": "4"}, where="toy").width == 4
    assert parse_options(Toy, {"levels": "2"}, {"preset": "paper"}, where="toy") == Toy(levels=5, width=8)
    assert parse_options(Toy, {"preset": "paper"}, {"levels": "2"}, where="toy") == Toy(levels=2, width=8)
    # names that disagree across layers are an override, not a conflict
    assert parse_options(Toy, {"levels": "4"}, {"passes": "4"}, where="toy").levels == 5


def test_without_aliases_nothing_changes():
    @dataclass(frozen=True)
    class Plain:
        n: int = option(1, min=1)

    with pytest.raises(UserError, match="unknown option plain.preset; valid options for plain: n$"):
        parse_options(Plain, {"preset": "x"}, where="plain")
    assert alias_values(Plain()) == {} and len(describe_options(Plain)) == 1


def test_list_shows_both_names_and_the_mapping():
    lines = describe_options(Toy)
    assert lines[:3] == ["levels=3 (int, 1..10): levels drafted", "width=2 (int, 1..16)", "name=x (str)"]
    assert lines[3] == "passes=2 (int, 0..9): expansion passes; sets levels: levels = passes + 1"
    assert lines[4] == "k=2 (int, 1..16): sets width: width = k"
    assert lines[5] == "preset=paper: passes=4, k=8 (= levels=5, width=8): the paper's setting"


def test_recorded_options_hold_our_names_only():
    """Manifests and baselines record ``asdict``: an alias or a preset leaves no trace of its own, so
    records written before aliases existed compare equal to records written with them."""
    assert asdict(parse_options(Toy, {"preset": "paper"}, where="toy")) == {"levels": 5, "width": 8, "name": "x"}
