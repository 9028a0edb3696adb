"""Progress on stderr, one look for every phase of a run: a tqdm bar where the work is counted
(setting up methods, decoding, divergence verdicts), a one-line status where it is one step
(loading the model, writing the report). Libraries' own bars and advice are silenced
(``quiet_transformers``), in this process and in every Ray actor."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def status(text: str) -> None:
    """One line naming what starts now; flushed, so it shows before a long silent step."""
    print(text, file=sys.stderr, flush=True)


@contextmanager
def bar(desc: str, total: int, unit: str, initial: int = 0, disable: bool = False) -> Iterator[Any]:
    from tqdm import tqdm

    with tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
              disable=disable) as b:
        yield b


def quiet_transformers() -> None:
    """Library progress bars and advice would drown the harness's own progress output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
