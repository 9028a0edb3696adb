"""The ``Decoder`` interface and the one decode loop every method runs.

A method says what to verify each step (``draft``) and, if it keeps state across steps,
what to remember from the verify pass (``update``). The base class owns the rest, the
same for every method and for the vanilla baseline: prefill, choosing tokens (greedy or
sampled), acceptance, keeping the accepted KV, stopping, the per-step record and its
timing. Vanilla decoding is this loop with a draft of just the root.

A step, in the spirit of EAGLE/Medusa's phase functions::

    draft = method.draft(root)                  # tokens + layout (+ injections)
    out   = engine.forward(draft.tokens, ...)   # one target pass over the whole layout
    acc   = accept(draft.layout, tokens, out)   # greedy or rejection sampling; one host sync
    engine.cache.keep(acc.nodes)                # the accepted path's KV, one gather
    method.update(draft, out, acc)              # e.g. the hidden state the next draft reads
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from methods.core.engine import Engine, ForwardOutput, Injection
from methods.core.errors import UserError
from methods.core.fitting import RateGuard
from methods.core.options import NoOptions, alias_values, parse_options
from methods.core.timing import HostSyncs, StepClock
from methods.core.tree import TreeLayout, chain_layout
from methods.core.verify import Acceptance, accept_greedy, accept_sampled, target_probs
from methods.core.weights import WeightsLocator


@dataclass(frozen=True)
class GenConfig:
    """What to generate: identical for every method of a run (it is part of a run's identity)."""

    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()
    temperature: float = 0.0   # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise UserError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens}")
        if not (self.temperature >= 0.0):
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop_ids", tuple(int(s) for s in self.stop_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Sampling:
    """This sequence's sampling settings, for a method that samples its drafts (``Decoder.sampling``)."""

    temperature: float
    top_p: float
    generator: torch.Generator


@dataclass
class Draft:
    """One step's proposal: the tokens of a layout, node 0 being the root (the last emitted token).

    ``injections`` add ephemeral tokens at inner layers (FIRP's pseudo chains): processed
    by the target pass, never committed; ``ephemeral`` counts them. A draft is a point mass
    unless ``q`` [n, V] gives the distribution each node's token was sampled from (SpS under
    sampling): sampled verification then accepts with min(1, p/q) and resamples from
    max(p - q, 0), as Leviathan et al. and Chen et al. define it.
    ``host_rows``: rows whose greedy token the method needs on the host (Lookahead's
    window); they travel with the acceptance, in the step's one transfer.
    ``all_logits``: the pass decodes every row, ephemeral ones included, in its one LM-head
    call; FIRP reads its pseudo tokens' drafts from them next step instead of paying a
    second pass over the 49k-row LM head (memory-bound: as dear for 3 rows as for 20).
    ``state``: the method's own values for this step, from ``draft`` to ``update`` (the loop
    hands the same ``Draft`` back), so a step's state need not live on the decoder.
    """

    tokens: torch.Tensor
    layout: TreeLayout
    injections: Sequence[Injection] = ()
    ephemeral: int = 0
    host_rows: torch.Tensor | None = None
    all_logits: bool = False
    state: Any = None
    q: torch.Tensor | None = None

    @property
    def processed(self) -> int:
        """Tokens the target pass processes beyond the one committed root."""
        return self.layout.n - 1 + self.ephemeral


@dataclass
class Generation:
    """One ``generate`` call's output.

    Per-step lists are columnar, one entry per target forward pass, prefill included:
    ``accepted[i]`` tokens committed (bonus included; vanilla: 1), ``draft_sizes[i]`` draft
    tokens verified, ``processed[i]`` tokens the pass processed beyond the committed root
    (draft tokens plus Lookahead's window or FIRP's pseudo tokens), ``step_times[i]`` its
    seconds, split into ``draft_times`` and ``verify_times``. ``draft_depths[i]`` is the
    depth of the step's draft (its longest root-to-leaf path: at most that many drafts can
    be accepted, whatever the tree's width) and ``accepted_drafts[i]`` how many of them
    verification accepted (before a stop token cuts the step's tokens): the acceptance rate
    and the per-position rates the field reports are read from these two, since a tree's
    node count says nothing about how deep it reaches. ``host_syncs`` counts the reads
    of tensor values on the host during the call (``HostSyncs``), prefill included.
    """

    tokens: list[int]
    accepted: list[int] = field(default_factory=list)
    draft_sizes: list[int] = field(default_factory=list)
    processed: list[int] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    draft_times: list[float] = field(default_factory=list)
    verify_times: list[float] = field(default_factory=list)
    draft_depths: list[int] = field(default_factory=list)
    accepted_drafts: list[int] = field(default_factory=list)
    stopped_by: str = "length"  # "length" | "eos"
    host_syncs: int = 0

    @property
    def target_forwards(self) -> int:
        return len(self.accepted)

    def mean_accepted_length(self) -> float:
        return len(self.tokens) / self.target_forwards if self.target_forwards else 0.0


def truncate_at_stop(tokens: list[int], stop: Collection[int], limit: int) -> tuple[list[int], bool]:
    """Cut accepted tokens at the first stop id (kept) and at ``limit``; report whether a stop was hit.

    Speculative methods accept several tokens at once, so the stop can sit mid-block;
    cutting here gives every method exactly the vanilla stopping semantics.
    """
    for i, t in enumerate(tokens[:limit]):
        if t in stop:
            return tokens[: i + 1], True
    return tokens[:limit], False


class Decoder:
    """A decoding strategy on a shared engine. Subclasses override the hooks, never the loop."""

    name: ClassVar[str] = "?"
    Options: ClassVar[type] = NoOptions
    weights: ClassVar[WeightsLocator | None] = None  # a trained method's weights: shipped, or given by an option
    # Whether the method decodes in the batched loop that ``--concurrency`` runs (several requests
    # per target pass). A method whose drafting cannot yet run there sets it False, and the harness
    # refuses it under --concurrency before the model loads, instead of failing mid-run.
    batchable: ClassVar[bool] = True
    sampling: Sampling | None = None  # set by ``generate`` for each sequence: None when greedy
    # A fitted draft whose realized acceptance is checked step by step (``methods.core.fitting``);
    # None where the method drafts unguarded. Slots of a batch share it (``fork`` copies the reference).
    guard: RateGuard | None = None

    def __init__(self, engine: Engine, options: Any = None, *, model_name: str = "", **raw: Any) -> None:
        """``options`` is the method's typed options; keyword arguments are parsed into them instead."""
        self.engine = engine
        self.model_name = model_name
        if options is None:
            options = parse_options(self.Options, raw, where=self.name)
        elif raw:
            raise TypeError("give either an options object or keyword options, not both")
        self.options = options
        self.setup()

    # -- hooks ----------------------------------------------------------------------------
    def setup(self) -> None:
        """Load weights and build per-shape constants once (the options are validated already)."""

    @classmethod
    def check_ready(cls, model_name: str, options: Any) -> None:
        """Raise ``UserError`` before the model loads if the method lacks something (weights, a skip set)."""
        if cls.weights is not None:
            cls.weights.check(model_name, options)

    def step_capacity(self) -> int:
        """Most tokens one step writes to the cache (layout nodes + ephemeral tokens)."""
        return 1

    def prefill(self, prompt_ids: Sequence[int]) -> ForwardOutput:
        return self.engine.forward(prompt_ids, logits_rows=slice(-1, None), commit=True)

    def begin(self, prompt_ids: Sequence[int], out: ForwardOutput) -> None:
        """Per-sequence state from the prefill pass (e.g. the hidden state the first draft reads)."""

    def draft(self, root: int, root_t: torch.Tensor, room: int) -> Draft:
        """This step's layout; ``room`` is how many drafts can still be used. Default: the root alone."""
        return Draft(root_t, chain_layout(0, self.engine))

    def update(self, draft: Draft, out: ForwardOutput, acc: Acceptance) -> None:
        """State for the next draft, from this step's pass and what was accepted."""

    def describe(self) -> dict[str, Any]:
        """The method's configuration, recorded in the results manifest."""
        from dataclasses import asdict

        aliases = alias_values(self.options)  # the same settings as the upstream code names them, where it does
        return {"name": self.name, **asdict(self.options), **({"aliases": aliases} if aliases else {}),
                "drafter": self.drafter(), "draft_parameters": self.draft_parameters(),
                **({"guard": self.guard.record()} if self.guard is not None else {})}

    def guard_says_plain(self) -> bool:
        """Whether the guard makes this step a plain one (asked once a step, by a drafting method)."""
        return self.guard is not None and self.guard.plain()

    def guard_counts(self) -> dict[str, int] | None:
        """The guard's decisions so far (``RateGuard.counts``), None without one: a record takes
        the difference around its timed generation, so warm-ups and other records are not in it."""
        return self.guard.counts() if self.guard is not None else None

    def observe(self, draft_nodes: int, tokens: int) -> None:
        """Tells the guard a drafted step's outcome (``tokens`` advanced); plain steps say nothing."""
        if self.guard is not None and draft_nodes > 1:
            self.guard.observe(tokens)

    def drafter(self) -> str:
        """What the method drafts with, in a few words: the report names two drafters of one method
        (Medusa's shared and per-head LM heads) apart by it, beside their parameter counts."""
        return "none: one token a pass"

    def draft_parameters(self) -> dict[str, int]:
        """Parameters the method adds beside the target model, and their bytes on disk (0 for a
        training-free method): the size of what it drafts with, as papers compare drafters."""
        if self.weights is None:
            return {"parameters": 0, "bytes": 0}
        return self.weights.size(self.model_name, self.options)

    def reserve(self, prompt_len: int, limit: int) -> None:
        """Start a sequence with every cache sized for ``limit`` tokens after ``prompt_len``.

        ``generate`` calls it, and the runner calls it first, outside the clock: the caches
        only grow, so no timed call pays for growing one (otherwise, after a warm-up shorter
        than the measured length, the first timed call, always the same method's, would)."""
        self.engine.reset(capacity=prompt_len + limit + self.step_capacity() + 1)

    # -- the loop -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int], config: GenConfig | int,
                 stop: Collection[int] = ()) -> Generation:
        """Decode after ``prompt_ids``; ``config`` may be just ``max_new_tokens`` (greedy, ``stop`` ids)."""
        if not isinstance(config, GenConfig):
            config = GenConfig(int(config), tuple(stop))
        engine = self.engine
        limit, stop_set = config.max_new_tokens, frozenset(config.stop_ids)
        generator = None
        if not config.greedy:
            generator = torch.Generator(device=engine.device)
            generator.manual_seed(config.seed)
        self.reserve(len(prompt_ids), limit)
        with HostSyncs() as syncs:
            gen = self._decode(prompt_ids, config, limit, stop_set, generator)
        gen.host_syncs = syncs.count
        return gen

    def _decode(self, prompt_ids: Sequence[int], config: GenConfig, limit: int, stop_set: frozenset[int],
                generator: torch.Generator | None) -> Generation:
        engine = self.engine
        clock = StepClock(engine.device)
        clock.mark()
        gen, root_t = self.start(prompt_ids, config, generator)
        clock.mark()
        done = gen.tokens[0] in stop_set
        root = gen.tokens[0]
        while not done and len(gen.tokens) < limit:
            draft = self.draft(root, root_t, limit - len(gen.tokens) - 1)
            clock.mark()
            layout = draft.layout
            past = engine.cache.length
            out = engine.forward(
                draft.tokens,
                position_ids=None if layout.positions is None else layout.positions + past,
                step_bias=layout.bias,
                injections=draft.injections,
                logits_rows=None if draft.all_logits else slice(0, layout.n),
            )
            logits = out.logits[: layout.n] if draft.all_logits else out.logits
            acc = self.accept(draft, logits, config, generator)
            engine.cache.keep(acc.nodes, acc.nodes_t)
            self.update(draft, out, acc)
            clock.mark()
            done = self.record_step(gen, draft, acc, stop_set, limit)
            root, root_t = gen.tokens[-1], acc.bonus_t
        gen.stopped_by = "eos" if done else "length"
        times = clock.seconds()  # on CUDA: the one synchronisation, after the last step
        gen.step_times = [times[0]] + [times[i] + times[i + 1] for i in range(1, len(times) - 1, 2)]
        gen.draft_times = [0.0] + times[1::2]
        gen.verify_times = [0.0] + times[2::2]
        return gen

    # -- the loop's phases, shared with the batched loop (``methods.core.batch``) ----------------
    def start(self, prompt_ids: Sequence[int], config: GenConfig,
              generator: torch.Generator | None) -> tuple[Generation, torch.Tensor]:
        """Prefill, the first token (greedy or drawn) and the method's per-sequence state:
        the new generation and its first token on the device (the first step's root)."""
        # what a method that samples its drafts needs: the run's settings and its one generator
        self.sampling = None if config.greedy else Sampling(config.temperature, config.top_p, generator)
        out = self.prefill(prompt_ids)
        if config.greedy:
            first_t = out.logits[-1].argmax().view(1)
        else:
            first_t = torch.multinomial(target_probs(out.logits[-1], config.temperature, config.top_p), 1,
                                        generator=generator)
        root = int(first_t[0])
        self.begin(prompt_ids, out)
        gen = Generation(tokens=[root], accepted=[1], draft_sizes=[0], processed=[0], draft_depths=[0],
                         accepted_drafts=[0])
        return gen, first_t

    @staticmethod
    def accept(draft: Draft, logits: torch.Tensor, config: GenConfig, generator: torch.Generator | None) -> Acceptance:
        """Which of the draft's tokens the target keeps: greedy, or rejection sampling with ``generator``."""
        if config.greedy:
            return accept_greedy(draft.layout, draft.tokens, logits, draft.host_rows)
        return accept_sampled(draft.layout, draft.tokens, logits, config.temperature, config.top_p,
                              generator, q=draft.q, host_rows=draft.host_rows)

    @staticmethod
    def record_step(gen: Generation, draft: Draft, acc: Acceptance, stop_set: frozenset[int], limit: int) -> bool:
        """The step's tokens, cut at a stop id and at ``limit``, and its counters into ``gen``;
        whether a stop id ended the sequence."""
        layout = draft.layout
        new, done = truncate_at_stop(acc.tokens, stop_set, limit - len(gen.tokens))
        gen.tokens.extend(new)
        gen.accepted.append(len(new))
        gen.draft_sizes.append(layout.draft_size)
        gen.processed.append(draft.processed)
        gen.draft_depths.append(layout.max_depth)  # a Python int, set when the layout was built
        gen.accepted_drafts.append(acc.accepted_drafts)
        return done

    def under_load(self, batch: int) -> Decoder:
        """This method with its drafting fitted to steps that serve ``batch`` sequences together
        (``methods.core.cost.under_load``): the same options, set up again where every cost it
        reads is the batched one, so a draft size or tree chosen as paying for one sequence is
        chosen afresh, down to plain steps, where the batch makes verification dear. Itself at
        batch 1."""
        if batch <= 1:
            return self
        from methods.core.cost import under_load
        from methods.core.files import cache_root

        with under_load(self.engine, self.model_name, cache_root(), batch):
            twin = type(self)(self.engine, self.options, model_name=self.model_name)
        if "label" in self.__dict__:
            twin.label = self.label
        return twin

    def fork(self, engine: Engine) -> Decoder:
        """This decoder, with its weights and settings, for one slot of a batch (``engine`` runs on
        the slot's view of the batch's cache). Per-sequence state starts anew with each request
        (``begin``); what a method learns across prompts (acceptance counts, a cost policy) is
        shared where it is held in place and per slot where it is reassigned. A method whose
        drafter keeps a cache of its own gives each slot its own (``Engine.fork``)."""
        twin = copy.copy(self)
        twin.engine = engine
        return twin
