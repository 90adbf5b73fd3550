"""`pgllm models [list|rm|cp|mv]`: every model in the database (the llm_models view), and a
model's lifecycle (llm_model_drop, llm_model_copy, llm_model_rename)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from .. import db
from ..progress import spinner

app = typer.Typer(help="List, delete, copy and rename models (pgllm models alone lists them).",
                  invoke_without_command=True)


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


@app.callback()
def models(ctx: typer.Context) -> None:
    """List the models: shape, parameters, stored size, step, last training and validation loss."""
    if ctx.invoked_subcommand is None:
        list_(ctx)


@app.command("list")
def list_(ctx: typer.Context) -> None:
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


@app.command("rm")
def rm(ctx: typer.Context, model: str = typer.Argument(..., help="The model to delete.")) -> None:
    """Delete a model and all of it: weights, optimizer and training state, training log, snapshots,
    tokenizer, and the server's shared copies of its weights (llm_model_drop)."""
    with db.session(ctx.obj["dsn"]) as pg:
        row = pg.execute("SELECT stored_bytes, step, checkpoints, tokenizer FROM {llm_models} WHERE model = %s",
                         (model,)).fetchone()
        pg.execute("SELECT {llm_model_drop}(%s)", (model,))
    stored, step, checkpoints, tokenizer = row if row else (None, 0, 0, False)
    typer.echo(f"deleted model {model!r}: {_size(stored)} of weights at step {step}, "
               f"{checkpoints} checkpoint{'' if checkpoints == 1 else 's'}"
               + (", its tokenizer" if tokenizer else ""))


@app.command("cp")
def cp(ctx: typer.Context, source: str = typer.Argument(..., help="The model to copy."),
       target: str = typer.Argument(..., help="The new model's name."),
       checkpoints: bool = typer.Option(False, "--checkpoints", help="Copy its snapshots too.")) -> None:
    """Copy a model: shape, weights, optimizer and training state, training log, tokenizer
    (llm_model_copy)."""
    with db.session(ctx.obj["dsn"]) as pg, spinner() as progress:
        progress.add_task(f"copying {source} to {target}")
        pg.execute("SELECT {llm_model_copy}(%s, %s, %s)", (source, target, checkpoints))
    typer.echo(f"copied model {source!r} to {target!r}" + (" with its checkpoints" if checkpoints else ""))


@app.command("mv")
def mv(ctx: typer.Context, model: str = typer.Argument(..., help="The model to rename."),
       new_name: str = typer.Argument(..., help="Its new name (gpt2-small: replaces the unused built-in row).")) -> None:
    """Rename a model; everything of it follows (llm_model_rename)."""
    with db.session(ctx.obj["dsn"]) as pg:
        pg.execute("SELECT {llm_model_rename}(%s, %s)", (model, new_name))
    typer.echo(f"renamed model {model!r} to {new_name!r}")
