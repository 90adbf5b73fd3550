"""Progress display for long work: on stderr, and only when stderr is a terminal.

Keeping it off pipes and logs leaves stdout for results and stderr for the one-line error.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TransferSpeedColumn)


def progress_bar(*columns) -> Progress:
    """A progress display of these columns (rich's), shown on stderr while it is a terminal."""
    console = Console(stderr=True)
    return Progress(*columns, console=console, transient=True, disable=not console.is_terminal)


def bytes_progress() -> Progress:
    """A bar for work measured in bytes."""
    return progress_bar(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                     TimeElapsedColumn())


def count_progress() -> Progress:
    """A bar for work measured in items (prompts, rows)."""
    return progress_bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def spinner() -> Progress:
    """For work whose size is unknown (e.g. the server's part of an import)."""
    return progress_bar(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
