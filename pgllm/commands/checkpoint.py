"""`pgllm checkpoint save|load|list|delete`: snapshots of a model kept in the database.

A snapshot holds the parameters, the AdamW moments and the training position (step, data
position), so that a load puts training back exactly where it was.
"""

from __future__ import annotations

import typer

from .. import db
from ..errors import PgllmError
from ..options import MODEL
from ..progress import spinner

app = typer.Typer(help="Save, load, list and delete snapshots of a model kept in the database.",
                  no_args_is_help=True)


@app.command("save")
def save(ctx: typer.Context, model: str = MODEL,
         note: str = typer.Option(None, "--note", help="A note kept with the snapshot.", show_default="none")) -> None:
    """Snapshot the model: parameters, optimizer state and training position."""
    with db.session(ctx.obj["dsn"]) as pg, spinner() as progress:
        progress.add_task(f"saving {model}")
        id_ = pg.execute("SELECT {llm_checkpoint_save}(%s, %s)", (model, note)).fetchone()[0]
        step = pg.execute("SELECT step FROM {llm_checkpoint} WHERE id = %s", (id_,)).fetchone()[0]
    typer.echo(f"saved checkpoint {id_} of model {model!r} at step {step}")


@app.command("load")
def load(ctx: typer.Context, id: int = typer.Argument(..., help="The checkpoint (see pgllm checkpoint list)."),
         model: str = typer.Option(None, "--model", "-m", help="The checkpoint's model, as a check (a checkpoint "
                                   "loads into its own model only).", show_default="the checkpoint's own")) -> None:
    """Put a model back exactly as it was when the snapshot was taken."""
    with db.session(ctx.obj["dsn"]) as pg, spinner() as progress:
        progress.add_task(f"loading checkpoint {id}")
        row = pg.execute("SELECT model FROM {llm_checkpoint} WHERE id = %s", (id,)).fetchone()
        if row is None:
            raise PgllmError(f"checkpoint {id} does not exist", hint="pgllm checkpoint list shows them")
        if model is not None and model != row[0]:
            raise PgllmError(f"checkpoint {id} is of model {row[0]!r}, not {model!r}",
                             hint=f"load it into {row[0]!r} (pgllm checkpoint load {id}), then copy that model "
                                  f"if you want another one (pgllm models cp {row[0]} {model})")
        model = row[0]
        step = pg.execute("SELECT {llm_checkpoint_load}(%s, %s)", (model, id)).fetchone()[0]
    typer.echo(f"loaded checkpoint {id} into model {model!r}: step {step}")


@app.command("list")
def list_(ctx: typer.Context,
          model: str = typer.Option(None, "--model", "-m", help="Only this model's.",
                                    show_default="every model's")) -> None:
    """List the snapshots: id, model, step, size, time and note."""
    with db.session(ctx.obj["dsn"]) as pg:
        rows = pg.execute(
            "SELECT c.id, c.model, c.step, to_char(c.created_at, 'YYYY-MM-DD HH24:MI:SS'), "
            "       (SELECT coalesce(sum(octet_length(t.data) + coalesce(octet_length(t.m) + octet_length(t.v), 0)), 0)"
            "          FROM {llm_checkpoint_tensor} t WHERE t.checkpoint_id = c.id), coalesce(c.note, '') "
            "FROM {llm_checkpoint} c WHERE %s::text IS NULL OR c.model = %s ORDER BY c.id",
            (model, model)).fetchall()
    if not rows:
        typer.echo("no checkpoints" + (f" of model {model!r}" if model else ""))
        return
    header = ("id", "model", "step", "created", "size", "note")
    table = [header] + [(str(i), m, str(s), t, f"{b / 1e6:.1f} MB", n) for i, m, s, t, b, n in rows]
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    for r in table:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


@app.command("delete")
def delete(ctx: typer.Context, id: int = typer.Argument(..., help="The checkpoint to delete.")) -> None:
    """Delete a snapshot."""
    with db.session(ctx.obj["dsn"]) as pg:
        row = pg.execute("DELETE FROM {llm_checkpoint} WHERE id = %s RETURNING model", (id,)).fetchone()
    if row is None:
        raise PgllmError(f"checkpoint {id} does not exist", hint="pgllm checkpoint list shows them")
    typer.echo(f"deleted checkpoint {id} of model {row[0]!r}")
