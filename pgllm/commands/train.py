"""`pgllm train`: run llm_train in chunks, each its own transaction, with a live progress bar.

All chunks follow one learning-rate schedule: its length (--total-steps, default: the step
counter now plus --steps) is passed to every call. A crash or Ctrl-C loses at most the chunk in
progress (its transaction rolls back); what was committed stays, and the next run continues
from there. The server reports each step at debug1 level (train_event reads those reports; README,
"Training progress"); the progress bar shows them.
"""

from __future__ import annotations

import json
import math
import time

import psycopg
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .. import db
from ..errors import PgllmError
from ..options import MODEL


def train_event(diag: psycopg.errors.Diagnostic) -> dict | None:
    """llm_train's progress report carried by a server message, or None for any other message.

    With client_min_messages = debug1, llm_train sends one DEBUG1 message per step and one at the
    end of the call; each has a JSON object as its detail, whose "event" is "llm_train.step" (with
    model, step, done, steps, total_steps, loss, lr, grad_norm, tokens_per_s) or "llm_train.end"
    (with model, steps, seconds, loading_s, training_s, writing_s). Fields may be added, never
    renamed (README, "Training progress").
    """
    detail = diag.message_detail
    if diag.severity_nonlocalized != "DEBUG" or not detail or not detail.startswith("{"):
        return None
    try:
        event = json.loads(detail)
    except ValueError:
        return None
    if not isinstance(event, dict) or not str(event.get("event", "")).startswith("llm_train."):
        return None
    return event


def train(
    ctx: typer.Context,
    model: str = MODEL,
    steps: int = typer.Option(..., "--steps", min=1, help="Optimizer steps to run.", show_default=False),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Rows of llm_dataset per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Micro-batches per optimizer step."),
    lr_max: float = typer.Option(2.5e-4, "--lr-max", help="Peak learning rate."),
    lr_min: float = typer.Option(0.0, "--lr-min", help="Floor the cosine decays to."),
    warmup: int = typer.Option(None, "--warmup", min=0, help="Linear warmup steps.",
                               show_default="a tenth of the schedule, at most 2000"),
    total_steps: int = typer.Option(None, "--total-steps", min=1, help="Schedule length, counted from step 0.",
                                    show_default="the model's step counter + --steps"),
    beta1: float = typer.Option(0.9, "--beta1", help="AdamW decay rate of the gradient's running mean."),
    beta2: float = typer.Option(0.999, "--beta2", help="AdamW decay rate of the squared gradient's running mean."),
    eps: float = typer.Option(1e-8, "--eps", help="AdamW term added to the denominator, for stability."),
    wd: float = typer.Option(0.01, "--wd", help="AdamW weight decay (2-D tensors only)."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Global gradient-norm clip; 0 = off."),
    dropout: float = typer.Option(0.0, "--dropout", help="Dropout probability on embeddings, attention and "
                                  "residual branches (GPT-2's *_pdrop)."),
    seed: int = typer.Option(1337, "--seed", help="Seed of the dropout masks."),
    dataset: str = typer.Option("train", "--dataset", "-d", help="The dataset of llm_dataset to train on."),
    eval_dataset: str = typer.Option(None, "--eval-dataset", help="A dataset to measure the validation loss on "
                                     "(llm_train_log.val_loss), at every commit and every --eval-every steps.",
                                     show_default="none"),
    eval_every: int = typer.Option(0, "--eval-every", min=0, help="Steps between validation losses; 0 = at "
                                   "each commit only."),
    eval_rows: int = typer.Option(None, "--eval-rows", min=1, help="Validation rows used (the first N).",
                                  show_default="every row"),
    commit_every: int = typer.Option(100, "--commit-every", min=1, help="Steps per transaction."),
    threads: int = typer.Option(None, "--threads", min=0, help="pg_llm.threads for this run.",
                                show_default="the server's setting"),
) -> None:
    """Train a model on llm_dataset with llm_train, committing every N steps."""
    console = Console(stderr=True)
    with db.session(ctx.obj["dsn"]) as pg:
        conn = pg.conn
        pg.require_model(model, hint="pgllm import or pgllm init creates it")
        # one run per model: this session keeps the model's training lock until it ends, and a
        # second run fails here (the other run's pid in the error) instead of sharing the schedule
        pg.execute("SELECT {llm_train_lock}(%s)", (model,))
        row = pg.execute("SELECT step FROM {llm_train_state} WHERE model = %s", (model,)).fetchone()
        start_step = row[0] if row else 0
        total = total_steps if total_steps is not None else start_step + steps
        if warmup is None:
            warmup = min(2000, max(1, total // 10))
        if warmup > total:
            console.print(f"note: --warmup {warmup} is longer than the schedule ({total} steps): the learning rate "
                          f"rises to {lr_max * total / warmup:.3g} and never reaches --lr-max")
        conn.commit()
        if threads is not None:
            conn.execute("SELECT set_config('pg_llm.threads', %s, false)", (str(threads),))
        conn.execute("SET client_min_messages = debug1")
        conn.commit()

        if eval_dataset is None and (eval_every or eval_rows):
            raise PgllmError("--eval-every and --eval-rows need --eval-dataset", hint="e.g. --eval-dataset val")
        history: list[tuple[int, float, float, float]] = []  # (step, loss, lr, tokens/s)
        val_history: list[tuple[int, float]] = []  # (step, val_loss)
        committed = 0
        started = time.monotonic()
        with Progress(TextColumn("[bold]training[/] step {task.fields[step]}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]}{task.fields[val]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as progress:
            task = progress.add_task("train", total=steps, step=start_step, loss="-", val="", lr="-", tps="-")

            def on_notice(diag: psycopg.errors.Diagnostic) -> None:
                event = train_event(diag)
                if event is not None and event["event"] == "llm_train.eval" and event["val_loss"] is not None:
                    val_history.append((event["step"], event["val_loss"]))
                    progress.update(task, val=f"  val {event['val_loss']:.4f}")
                if event is None or event["event"] != "llm_train.step":
                    return
                step, loss, lr, tps = event["step"], event["loss"], event["lr"], event["tokens_per_s"]
                history.append((step, loss, lr, tps))
                progress.update(task, completed=committed + event["done"], step=step, loss=f"{loss:.4f}",
                                lr=f"{lr:.2e}", tps=f"{tps:.0f}")

            conn.add_notice_handler(on_notice)
            try:
                while committed < steps:
                    n = min(commit_every, steps - committed)
                    pg.execute(
                        "SELECT {llm_train}(%s, %s, beta1 => %s, beta2 => %s, eps => %s, wd => %s, lr_max => %s, "
                        "warmup => %s, batch_size => %s, grad_accum => %s, grad_clip => %s, lr_min => %s, "
                        "total_steps => %s, dropout => %s, seed => %s, dataset => %s, eval_dataset => %s, eval_every => %s, "
                        "eval_rows => %s)",
                        (model, n, beta1, beta2, eps, wd, lr_max, warmup, batch_size, grad_accum, grad_clip,
                         lr_min, total, dropout, seed, dataset, eval_dataset, eval_every, eval_rows))
                    conn.commit()
                    committed += n
                    progress.update(task, completed=committed)
            except (KeyboardInterrupt, psycopg.Error):
                kept = [h for h in history if h[0] <= start_step + committed]
                console.print(f"stopped: {committed} of {steps} steps committed (model \"{model}\" is at step "
                              f"{start_step + committed}); the chunk in progress was rolled back"
                              + (f"; last committed loss {kept[-1][1]:.4f}" if kept else ""))
                raise
        elapsed = time.monotonic() - started
    losses = [h[1] for h in history]
    rates = [h[3] for h in history]
    first = f"{losses[0]:.4f}" if losses else "-"
    last = f"{losses[-1]:.4f}" if losses else "-"
    rate = f"{sum(rates) / len(rates):.0f}" if rates else "-"
    typer.echo(f"trained model \"{model}\": steps {start_step + 1}..{start_step + steps} of a {total}-step "
               f"schedule, loss {first} -> {last}"
               + (f", val loss {val_history[0][1]:.4f} -> {val_history[-1][1]:.4f}" if val_history else "")
               + f", {rate} tokens/s per step, {elapsed:.1f} s "
               f"({math.ceil(steps / commit_every)} commits)")
