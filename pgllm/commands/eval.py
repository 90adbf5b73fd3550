"""`pgllm eval`: a model's mean loss and perplexity on a dataset (llm_eval)."""

from __future__ import annotations

import typer

from .. import db
from ..options import MODEL


def eval_(
    ctx: typer.Context,
    model_arg: str = typer.Argument(None, metavar="[MODEL]", help="The model (or --model).",
                                   show_default="--model"),
    model: str = MODEL,
    dataset: str = typer.Option("val", "--dataset", "-d", help="The dataset of llm_dataset to evaluate on."),
    max_rows: int = typer.Option(None, "--max-rows", min=1, help="Only the first N rows.",
                                 show_default="every row"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Rows per forward pass."),
) -> None:
    """Mean cross-entropy and perplexity of a model on a dataset (no training, nothing written)."""
    name = model_arg or model
    with db.session(ctx.obj["dsn"]) as pg:
        pg.require_model(name, hint="pgllm models lists them")
        loss, ppl, rows, tokens = pg.execute("SELECT * FROM {llm_eval}(%s, %s, %s, %s)",
                                             (name, dataset, max_rows, batch_size)).fetchone()
    typer.echo(f'model "{name}" on dataset "{dataset}": loss {loss:.4f}, perplexity {ppl:.2f} '
               f"({rows} rows, {tokens} tokens)")
