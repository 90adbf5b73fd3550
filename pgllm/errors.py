"""The one exception type that the CLI turns into a single `Error: ...` line, and a server error as one line."""

import psycopg


class PgllmError(Exception):
    """An expected failure: bad input or a missing prerequisite, with what to do about it.

    `hint` is shown after the message on the same line, so that every failure stays one line.
    """

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


def database_error_line(e: psycopg.Error) -> str:
    """A server error as one line: the message, then the hint or detail when there is one."""
    diag = getattr(e, "diag", None)
    message = diag.message_primary if diag is not None and diag.message_primary else ""
    if not message:
        text = str(e).strip()
        message = text.splitlines()[0] if text else type(e).__name__
    extra = diag.message_hint or diag.message_detail if diag is not None else None
    return f"{message} ({extra})" if extra else message
