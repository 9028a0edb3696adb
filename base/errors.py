"""User-facing errors: the CLI prints them as one line and exits 2, never with a traceback."""


class UserError(Exception):
    """Something the user can fix: the message says what was wrong and what to do."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """An exception's first line (or its type): enough to name what went wrong in a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
