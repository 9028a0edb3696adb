"""User-facing errors: the CLI prints them as one line and exits 2, never with a traceback."""


class UserError(Exception):
    """Something the user can fix: the message says what was wrong and what to do."""

    exit_code = 2
