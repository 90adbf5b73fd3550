"""The one exception type that the CLI turns into a single `Error: ...` line."""


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
