"""Moved to ``base.errors`` (below ``methods/`` and ``tasks/``); this path stays for the methods' imports."""

from base.errors import (  # noqa: F401
    UserError,
    first_line,
)
