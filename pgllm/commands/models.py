"""`pgllm models`: every model in the database (the llm_models view)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from .. import db


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def _loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def models(ctx: typer.Context) -> None:
    """List the models: shape, parameters, stored size, step, last training and validation loss."""
    with db.session(ctx.obj["dsn"]) as pg:
        rows = pg.execute("SELECT model, n_layer, n_head, d_model, n_positions, vocab, parameters, stored_bytes, "
                          "step, train_loss, val_loss, tokenizer, checkpoints, cached FROM {llm_models} "
                          "ORDER BY model").fetchall()
    if not rows:
        typer.echo("no models (create one with pgllm init or pgllm import)")
        return
    table = Table("model", "layers x heads x d", "positions", "vocab", "parameters", "stored", "step",
                  "train loss", "val loss", "tokenizer", "checkpoints", "cached")
    for (model, L, H, C, P, V, params, stored, step, train, val, tok, ckpt, cached) in rows:
        table.add_row(model, f"{L} x {H} x {C}", str(P), str(V), f"{params / 1e6:.2f} M", _size(stored), str(step),
                      _loss(train), _loss(val), "yes" if tok else "no", str(ckpt), cached or "-")
    Console(width=200).print(table)
