"""Drafters that really draft, for the tiny-model losslessness tests.

A losslessness test proves little when its drafter's guesses are never accepted: every step is
then a plain step, and the test passes with drafting switched off. Random heads and maps on a
random model are such drafters (their multi-token steps are close to none). The drafters here
are trained by the methods' own trainers on the tiny model's own greedy text, or built so the
target agrees with them often, and the tests require a minimum share of multi-token steps on
prompts the drafters never saw.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from tests.conftest import tiny_model

VOCAB = 97  # the tiny models' vocabulary
CORPUS_PROMPTS, PROMPT_LEN, ANSWER_LEN = 32, 6, 26


def held_out_prompts(n: int = 3, length: int = 6, alphabet: int = VOCAB) -> list[list[int]]:
    """Prompts drawn like the training corpus's but from other seeds (1000 on), so no test prompt is
    a training prompt."""
    return [torch.randint(0, alphabet, (length,), generator=torch.Generator().manual_seed(1000 + s)).tolist()
            for s in range(n)]


def multi_token_share(gens: Sequence[Any]) -> float:
    """The share of decode steps (the prefill aside) that committed more than one token."""
    steps = [a for g in gens for a in g.accepted[1:]]
    return sum(a > 1 for a in steps) / max(1, len(steps))


def assert_lossless(decoder: Any, vanilla: Any, prompts: Sequence[list[int]], new: int, min_share: float,
                    **generate: Any) -> list[Any]:
    """Greedy token ids equal vanilla's on every prompt, every step's tokens are accounted for, and
    at least ``min_share`` of the steps took more than one token (drafts were really verified).
    Returns the generations, for a test's own further checks."""
    gens = []
    for prompt in prompts:
        ref = vanilla.generate(prompt, new).tokens
        got = decoder.generate(prompt, new, **generate)
        assert got.tokens == ref, f"prompt {prompt}: tokens differ from vanilla's"
        assert sum(got.accepted) == len(got.tokens)
        gens.append(got)
    share = multi_token_share(gens)
    assert share >= min_share, f"only {share:.0%} of steps took more than one token (at least {min_share:.0%} required)"
    return gens


def confident_model(kind: str, scale: float = 20.0) -> Any:
    """The tiny model with its LM head scaled up: its next-token distributions become peaked, so a
    draft that skips sublayers usually picks the same token and passes a confidence threshold
    (a random model's flat distributions make self-speculation draft nothing)."""
    model = tiny_model(kind)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def noisy_copy(kind: str, sigma: float, folder: Path) -> str:
    """The tiny model with Gaussian noise of ``sigma`` on every weight, saved as an SpS draft: it
    mostly agrees with the target and sometimes does not, so both outcomes of verification run."""
    draft = tiny_model(kind)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * sigma)
    draft.save_pretrained(folder)
    return str(folder)


class TrainedDrafters:
    """Medusa heads, FIRP maps and EAGLE heads trained for each tiny model, once per test session.

    Each kind's corpus is the model's greedy answers to random prompts; the trainers are the
    methods' real ones (ridge-initialised FIRP maps, the stopping rule, the validation split).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._corpus: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self._trained: dict[str, str] = {}

    def corpus(self, kind: str, prompts: int = CORPUS_PROMPTS) -> list[dict[str, Any]]:
        if (kind, prompts) not in self._corpus:
            # all prompts in one batch (one pass per token): the model's own greedy continuations
            g = torch.Generator().manual_seed(0)
            batch = torch.randint(0, VOCAB, (prompts, PROMPT_LEN), generator=g)
            with torch.no_grad():
                out = tiny_model(kind).generate(batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                                max_new_tokens=ANSWER_LEN, min_new_tokens=ANSWER_LEN, pad_token_id=0)
            data = [{"ids": row.tolist(), "prompt_len": PROMPT_LEN} for row in out]
            self._corpus[kind, prompts] = data
        return self._corpus[kind, prompts]

    def _train(self, method: str, kind: str, options: dict[str, Any], prompts: int = CORPUS_PROMPTS, **config: Any) -> str:
        from dataclasses import replace

        from harness.train import toolkit
        from methods.core.training import TrainConfig

        name = (f"{method}-{kind}-{prompts}-" + "-".join(f"{k}{v}" for k, v in sorted({**options, **config}.items()))
                ).replace(" ", "")
        if name not in self._trained:
            out = self.root / name
            settings = {"epochs": 8, "lr": 3e-3, "batch_sequences": 4, "checkpoint_every": 1000, "val_fraction": 0.1,
                        "eval_every": 10, **config}
            cfg = TrainConfig(method=method, out=str(out), options=options, **settings)
            kit = replace(toolkit("cpu"), cache_dir=self.root / "cache" / kind)
            previous = os.environ.get("SPECDEC_HARNESS_CACHE")
            os.environ["SPECDEC_HARNESS_CACHE"] = str(self.root / "cache" / kind)
            try:
                trainer = importlib.import_module(f"methods.{method}.train").train
                trainer(cfg, tiny_model(kind), None, self.corpus(kind, prompts), f"tiny-{kind}-{prompts}", kit)
            finally:
                if previous is None:
                    os.environ.pop("SPECDEC_HARNESS_CACHE", None)
                else:
                    os.environ["SPECDEC_HARNESS_CACHE"] = previous
            self._trained[name] = str(out)
        return self._trained[name]

    def medusa(self, kind: str, layout: str = "shared", heads: int = 3) -> str:
        return self._train("medusa", kind, {"heads": heads, "layout": layout})

    def firp(self, kind: str, layers: Sequence[int], mode: str = "serialized", input: str = "prev") -> str:
        # ridge initialisation is closed-form and does most of the work; a few epochs refine it
        return self._train("firp", kind, {"K": len(layers), "layers": ",".join(map(str, layers)), "mode": mode,
                                          "input": input, "anchors_per_seq": 16}, epochs=2)

    def eagle(self, kind: str) -> str:
        # one fc and a decoder layer that predict the next feature learn slower than heads on
        # the target's own features: four times the corpus
        return self._train("eagle", kind, {}, prompts=4 * CORPUS_PROMPTS)

    @staticmethod
    def config(folder: str) -> dict[str, Any]:
        return json.loads((Path(folder) / "config.json").read_text())
