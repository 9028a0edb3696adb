"""Methods that verify one static token tree per step, filled by trained drafters (Medusa, FIRP).

Such a method answers three questions about its drafter, and this base does the rest: the
``tree`` option (``auto``, ``trained``, a shape or paths), the cost-fitted choice of ``auto``,
the layout and candidate index the decode loop needs, plain steps where no tree pays, and
the manifest record of what was chosen and why. The three questions:

* ``processed(tree)``: tokens one target pass runs for the tree (FIRP adds pseudo tokens);
* ``pass_cost(tree, curve)``: that pass in units of a one-token pass (FIRP's pseudo tokens
  run only the layers after their map's);
* ``draft_probe()``: one step's drafting work outside the pass, timed once per setup.
"""

from __future__ import annotations

from typing import Any, ClassVar

from methods.core.cost import CostCurve, pick_tree
from methods.core.decoder import Decoder
from methods.core.errors import UserError
from methods.core.files import cache_root
from methods.core.fitting import RateGuard, fitted
from methods.core.options import option
from methods.core.tree import Tree, TreeLayout, parse_tree

TREE_AUTO, TREE_TRAINED = "auto", "trained"
TREE_HELP = ("auto (default: the trained tree of the highest predicted speedup on this hardware's measured "
             "verify cost, or plain steps where none beats vanilla), trained (the trainer's default, always "
             "drafting), top-k per depth (4x2x1), JSON paths, or a JSON file")


def tree_option() -> Any:
    """The ``tree`` field of a static-tree method's options."""
    return option(TREE_AUTO, help=TREE_HELP)


def check_tree_option(value: str) -> None:
    """Options validation: ``auto``, ``trained``, or a tree ``parse_tree`` reads."""
    if value not in (TREE_AUTO, TREE_TRAINED):
        parse_tree(value)


class StaticTreeDecoder(Decoder):
    """Base of Medusa and FIRP. A subclass loads its drafter, sets ``draft_depth`` (the deepest
    tree it fills) and calls ``choose_tree`` with its weights' config.json."""

    default_tree: ClassVar[str] = "3x2x1"  # used when the weights name no trained tree
    depth_noun: ClassVar[str] = "draft levels"  # what bounds the depth, for the error message
    guarded: ClassVar[bool] = False  # an ``auto`` tree drafts step by step under a ``RateGuard``

    draft_depth: int
    tree_spec: Any
    tree_choice: dict[str, Any] | None
    tree: Tree
    layout: TreeLayout
    fitted: dict[str, Any] | None
    drafting: bool

    # -- the three questions --------------------------------------------------------------
    def processed(self, tree: Tree) -> int:
        """Tokens a target pass over ``tree`` runs: the root and the draft nodes."""
        return tree.size

    def pass_cost(self, tree: Tree, curve: CostCurve) -> float:
        """That pass on the measured curve, in one-token passes."""
        return curve(self.processed(tree))

    def draft_probe(self) -> None:
        """One step's drafting work outside the target pass (timed by ``auto``)."""
        raise NotImplementedError

    # -- the rest ---------------------------------------------------------------------------
    def choose_tree(self, weights_config: dict[str, Any]) -> None:
        """The tree this run verifies, its layout and whether the method drafts at all."""
        self.tree_spec, self.tree_choice = self.resolve_tree(self.options.tree, weights_config)
        self.tree = parse_tree(self.tree_spec)
        if self.tree.max_depth > self.draft_depth:
            raise UserError(f"tree depth {self.tree.max_depth} exceeds the {self.draft_depth} {self.depth_noun}")
        self.layout = TreeLayout.from_tree(self.tree, self.engine)
        self.candidate_index = self.tree.candidate_index.to(self.engine.device)
        # ``auto`` where no tree is predicted to beat vanilla: plain steps, the drafter never runs
        self.fitted = self.tree_choice["fitted"] if self.tree_choice else None
        self.drafting = self.fitted is None or self.fitted["drafting"]
        self.guard = (RateGuard(self.tree_choice["expected_accepted_length"], self.tree_choice["predicted_speedup"])
                      if self.guarded and self.drafting and self.tree_choice else None)

    def draft_this_step(self) -> bool:
        """Whether this step drafts: the fit chose a tree, and its guard (if any) says it pays."""
        return self.drafting and not self.guard_says_plain()

    def resolve_tree(self, value: str | None, weights_config: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
        """The tree spec for option ``value``, and the cost-fitted choice behind it (or None).

        ``auto`` needs the trainer's ``tree_search`` table in the weights' config.json; without
        one (upstream heads, older files) it falls back to the trained default tree. The
        choice's ``fitted`` record says whether any tree is predicted to beat a plain step
        (``methods.core.fitting``)."""
        value = value or TREE_AUTO
        trained = weights_config.get("default_tree") or self.default_tree
        if value == TREE_TRAINED:
            return trained, None
        if value != TREE_AUTO:
            return value, None
        table = [c for c in weights_config.get("tree_search") or []
                 if c.get("paths") and max(len(p) for p in c["paths"]) <= self.draft_depth]
        if not table:
            return trained, None
        from methods.core.cost import cost_curve, relative_call_cost  # looked up at call time: tests replace them

        curve = cost_curve(self.engine, self.model_name, cache_root())
        overhead = relative_call_cost(self.engine, self.draft_probe,
                                      f"{self.name}.draft_probe(depth={self.draft_depth})")
        choice = pick_tree(table, curve, lambda paths: self.processed(parse_tree(paths)), overhead,
                           lambda paths, c: self.pass_cost(parse_tree(paths), c))
        choice["fitted"] = fitted(choice["best_predicted_speedup"], f"the {choice['draft_size']}-node tree",
                                  basis="the trainer's accepted length per tree and this machine's measured costs")
        return choice["paths"], choice

    def tree_record(self) -> dict[str, Any]:
        """The manifest's account of the tree: spec, paths, draft size, and ``auto``'s choice."""
        return {"tree": self.tree_spec, "draft_size": self.tree.draft_size if self.drafting else 0,
                "tree_paths": [list(p) for p in self.tree.paths],
                **({"tree_choice": self.tree_choice, "fitted": self.fitted} if self.tree_choice else {})}
