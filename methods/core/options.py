"""Moved to ``base.options`` (below ``methods/`` and ``tasks/``); this path stays for the methods' imports."""

from base.options import (  # noqa: F401
    Alias,
    NoOptions,
    Preset,
    alias_values,
    describe_options,
    option,
    parse_options,
)
