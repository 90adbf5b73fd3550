"""Progress display for long work: on stderr, and only when stderr is a terminal.

Keeping it off pipes and logs leaves stdout for results and stderr for the one-line error.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TransferSpeedColumn)


def _progress(*columns) -> Progress:
    console = Console(stderr=True)
    return Progress(*columns, console=console, transient=True, disable=not console.is_terminal)


def bytes_progress() -> Progress:
    """A bar for work measured in bytes."""
    return _progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                     TimeElapsedColumn())


def count_progress() -> Progress:
    """A bar for work measured in items (prompts, rows)."""
    return _progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def spinner() -> Progress:
    """For work whose size is unknown (e.g. the server's part of an import)."""
    return _progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
