"""`pgllm eval`: a model's mean loss and perplexity on a dataset (llm_eval), with a progress bar of
the rows done (llm_eval reports them at debug1, as llm_train its steps)."""

from __future__ import annotations

import json

import psycopg
import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from .. import db
from ..options import MODEL, MODEL_POSITIONAL
from ..progress import progress_bar


def eval_(
    ctx: typer.Context,
    model_arg: str = MODEL_POSITIONAL,
    model: str = MODEL,
    dataset: str = typer.Option("val", "--dataset", "-d", help="The dataset of llm_dataset to evaluate on."),
    max_rows: int = typer.Option(None, "--max-rows", min=1, help="Only the first N rows.",
                                 show_default="every row"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Rows per forward pass."),
    any_tokenizer: bool = typer.Option(False, "--any-tokenizer", help="Evaluate even on a dataset made with "
                                       "another tokenizer than the model's (pg_llm.check_dataset_tokenizer = off)."),
) -> None:
    """Mean cross-entropy and perplexity of a model on a dataset (no training, nothing written)."""
    name = model_arg or model
    with db.session(ctx.obj["dsn"]) as pg, progress_bar(TextColumn(f"evaluating {name}"), BarColumn(bar_width=20),
                                                        MofNCompleteColumn(), TextColumn("rows"),
                                                        TimeElapsedColumn()) as progress:
        pg.require_model(name, hint="pgllm models lists them")
        task = progress.add_task("eval", total=None)

        def on_notice(diag: psycopg.errors.Diagnostic) -> None:
            detail = diag.message_detail or ""
            if diag.severity_nonlocalized == "DEBUG" and detail.startswith('{"event": "llm_eval.rows"'):
                event = json.loads(detail)
                progress.update(task, completed=event["done"], total=event["rows"])

        pg.conn.add_notice_handler(on_notice)
        if any_tokenizer:
            pg.execute("SET LOCAL pg_llm.check_dataset_tokenizer = off")
        pg.execute("SET LOCAL client_min_messages = debug1")
        loss, ppl, rows, tokens = pg.execute("SELECT * FROM {llm_eval}(%s, %s, %s, %s)",
                                             (name, dataset, max_rows, batch_size)).fetchone()
    typer.echo(f'model "{name}" on dataset "{dataset}": loss {loss:.4f}, perplexity {ppl:.2f} '
               f"({rows} rows, {tokens} tokens)")
