"""`pgllm log`: the loss curve from llm_train_log (or an adapter's, llm_adapter_train_log), in the terminal and
optionally as a PNG."""

from __future__ import annotations

from pathlib import Path

import typer

from .. import db
from ..errors import PgllmError
from ..optional import need
from ..options import MODEL


def chart(xs: list[int], ys: list[float], width: int, height: int) -> list[str]:
    """A line chart of ys over xs in text: one column per bucket of steps (its mean), a y axis."""
    width = min(width, len(ys))
    buckets = [ys[len(ys) * i // width:len(ys) * (i + 1) // width] or [ys[-1]] for i in range(width)]
    means = [sum(b) / len(b) for b in buckets]
    lo, hi = min(means), max(means)
    span = (hi - lo) or 1.0
    levels = [round((m - lo) / span * (height - 1)) for m in means]
    lines = []
    for row in range(height - 1, -1, -1):
        label = f"{lo + span * row / (height - 1):9.4f} |" if height > 1 else f"{lo:9.4f} |"
        cells = "".join("*" if level == row else ("." if level > row else " ") for level in levels)
        lines.append(label + cells)
    lines.append(" " * 10 + "+" + "-" * width)
    left, right = str(xs[0]), str(xs[-1])
    lines.append(" " * 11 + left + " " * max(1, width - len(left) - len(right)) + right + "  (step)")
    return lines


def write_png(path: Path, model: str, steps, losses, lrs, val: list[tuple[int, float]]) -> None:
    import matplotlib  # checked by log() before it connects
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, losses, color="tab:blue", linewidth=1.2, label="training loss")
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], color="tab:green", linewidth=1.2, marker="o",
                markersize=3, label="validation loss")
        ax.legend(loc="upper center")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, lrs, color="tab:orange", linewidth=1.0, alpha=0.7, label="learning rate")
    ax2.set_ylabel("learning rate", color="tab:orange")
    ax.set_title(f"{model}: training loss" + (" and validation loss" if val else ""))
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as e:
        raise PgllmError(f'cannot write "{path}": {e.strerror}') from None
    finally:
        plt.close(fig)


def log(
    ctx: typer.Context,
    model: str = MODEL,
    png: Path = typer.Option(None, "--png", help="Also write the curve (loss and learning rate) to this PNG file.",
                             show_default="none"),
    last: int = typer.Option(None, "--last", min=1, help="Only the last N steps.", show_default="every step"),
    width: int = typer.Option(72, "--width", min=8, help="Chart width in columns."),
    height: int = typer.Option(12, "--height", min=2, help="Chart height in rows."),
    adapter: str = typer.Option(None, "--adapter", "-a", help="The log of this LoRA adapter's training "
                                "(llm_adapter_train_log) instead of the model's.", show_default="none: the model's"),
) -> None:
    """Show the loss curves of a model's (or an adapter's) training: training loss, and validation loss when logged."""
    if png is not None:
        need("pgllm log --png", "matplotlib")  # before connecting
    # the adapter's log, or the model's: the same columns
    table, key, name = ("llm_adapter_train_log", "adapter", adapter) if adapter is not None else \
        ("llm_train_log", "model", model)
    with db.session(ctx.obj["dsn"]) as pg:
        rows = pg.execute(f"SELECT step, loss, lr, grad_norm, tokens_per_s, val_loss FROM {{{table}}} WHERE {key} = %s "
                          "ORDER BY step", (name,)).fetchall()
    if not rows:
        raise PgllmError(f'{key} "{name}" has no training log',
                         hint=f"train it with pgllm train{' --adapter' if adapter is not None else ''}")
    if last is not None:
        rows = rows[-last:]
    steps = [r[0] for r in rows]
    losses = [r[1] for r in rows]
    lrs = [r[2] for r in rows]
    rates = [r[4] for r in rows if r[4] is not None]
    val = [(r[0], r[5]) for r in rows if r[5] is not None]
    typer.echo(f"{name}: {len(rows)} steps ({steps[0]}..{steps[-1]}), loss {losses[0]:.4f} -> {losses[-1]:.4f} "
               f"(min {min(losses):.4f}), lr {lrs[-1]:.2e} now"
               + (f", {sum(rates) / len(rates):.0f} tokens/s on average" if rates else ""))
    for line in chart(steps, losses, width, height):
        typer.echo(line)
    if val:
        typer.echo(f"validation loss: {len(val)} points ({val[0][0]}..{val[-1][0]}), {val[0][1]:.4f} -> "
                   f"{val[-1][1]:.4f} (min {min(v[1] for v in val):.4f})")
        for line in chart([v[0] for v in val], [v[1] for v in val], width, height):
            typer.echo(line)
    if png is not None:
        write_png(png, name, steps, losses, lrs, val)
        typer.echo(f"wrote {png}")
