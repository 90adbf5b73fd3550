"""`pgllm train`: run llm_train in chunks, each its own transaction, with a live progress bar.

With --adapter it trains that LoRA adapter of the model (llm_train(..., adapter => ...)) instead
of the model: the base stays frozen, and the step counter, schedule and training lock are the
adapter's (llm_adapter.step and .schedule, llm_adapter_train_lock).

All chunks follow one learning-rate schedule, which the run chooses and says first: `--schedule
new` (the default) warms up and decays over this run's steps (or --total-steps), starting at the
model's step counter; `--schedule continue` follows the schedule of the model's last pgllm train
run (llm_train_state.schedule), e.g. after Ctrl-C, and refuses one that has ended. A crash or
Ctrl-C loses at most the chunk in progress (its transaction rolls back); what was committed
stays. The server reports each step at debug1 level (train_event reads those reports; README,
"Training progress"); the progress bar shows them.
"""

from __future__ import annotations

import json
import math
import time

import psycopg
import typer
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

from .. import db, interrupt
from ..errors import PgllmError, database_error_line
from ..options import MODEL
from ..progress import progress_bar

SCHEDULES = ("new", "continue")
# options that shape a schedule: --schedule continue takes them from the record instead
SHAPING = ("lr_max", "lr_min", "warmup", "total_steps")


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


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def describe(s: dict) -> str:
    """A schedule in one line."""
    return (f"warmup {s['warmup']} to lr {s['lr_max']:.3g}, cosine to {s['lr_min']:.3g} at step {s['total_steps']} "
            f"(from step {s['start']})")


def choose_schedule(ctx: typer.Context, what: str, recorded, how: str, start_step: int, steps: int,
                    lr_max: float, lr_min: float, warmup: int | None, total_steps: int | None) -> dict:
    """The run's schedule: {"start", "total_steps", "warmup", "lr_max", "lr_min"}, steps numbered as
    the step counter of `what` (model "m" or adapter "a"), whose last run recorded `recorded`."""
    if how == "new":
        length = total_steps if total_steps is not None else steps
        if warmup is None:
            warmup = min(2000, max(1, length // 10))
        return {"start": start_step, "total_steps": start_step + length, "warmup": warmup, "lr_max": lr_max,
                "lr_min": lr_min}
    given = [f"--{name.replace('_', '-')}" for name in SHAPING
             if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") == "COMMANDLINE"]
    if given:
        raise PgllmError(f"--schedule continue follows the recorded schedule: {', '.join(given)} would change it",
                         hint="leave them out, or start a new schedule with --schedule new")
    if not isinstance(recorded, dict) or not all(k in recorded for k in ("start", "total_steps", "warmup",
                                                                          "lr_max", "lr_min")):
        raise PgllmError(f'{what} has no schedule of pgllm train to continue (it is at step {start_step})',
                         hint="use --schedule new")
    if start_step >= recorded["total_steps"]:
        raise PgllmError(f'the schedule of {what} ended at step {recorded["total_steps"]} (it is at step '
                         f'{start_step}): its learning rate is at its floor, {recorded["lr_min"]:.3g}',
                         hint="start a new one with --schedule new")
    return {k: recorded[k] for k in ("start", "total_steps", "warmup", "lr_max", "lr_min")}


def adapter_base(ctx: typer.Context, pg: db.Pgllm, adapter: str, model: str) -> str:
    """The base model of `adapter`; --model, when given on the command line, must name it."""
    row = pg.execute("SELECT model FROM {llm_adapter} WHERE adapter = %s", (adapter,)).fetchone()
    if row is None:
        raise PgllmError(f'adapter "{adapter}" does not exist', hint="pgllm adapter create makes one; pgllm adapter "
                         "list shows those you may read")
    given = getattr(ctx.get_parameter_source("model"), "name", "DEFAULT") == "COMMANDLINE"  # not PGLLM_MODEL
    if given and model != row[0]:
        raise PgllmError(f'adapter "{adapter}" belongs to model "{row[0]}", not "{model}"',
                         hint="leave out --model: an adapter trains on its own base")
    return row[0]


def bar_columns(end: int) -> list:
    """The progress bar: step, a short bar, loss, validation loss, learning rate, tokens/s and time,
    all of it within 80 columns."""
    return [TextColumn("step {task.fields[step]}/" + str(end)), BarColumn(bar_width=12),
            TextColumn("loss {task.fields[loss]}{task.fields[val]} lr {task.fields[lr]} {task.fields[tps]} tok/s"),
            TimeElapsedColumn()]


def train(
    ctx: typer.Context,
    model: str = MODEL,
    steps: int = typer.Option(..., "--steps", min=1, help="Optimizer steps to run.", show_default=False),
    schedule: str = typer.Option("new", "--schedule", help="new: warm up and decay again over this run (from the "
                                 "model's step); continue: follow the schedule of the model's last pgllm train run."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Rows of llm_dataset per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Micro-batches per optimizer step."),
    lr_max: float = typer.Option(2.5e-4, "--lr-max", help="Peak learning rate."),
    lr_min: float = typer.Option(0.0, "--lr-min", help="Floor the cosine decays to."),
    warmup: int = typer.Option(None, "--warmup", min=0, help="Linear warmup steps.",
                               show_default="a tenth of the schedule, at most 2000"),
    total_steps: int = typer.Option(None, "--total-steps", min=1, help="Length of a new schedule in steps "
                                    "(longer than --steps: this run does its first --steps).",
                                    show_default="--steps"),
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
                                     "(llm_train_log.val_loss): before training, at every commit and every "
                                     "--eval-every steps.", show_default="none"),
    eval_every: int = typer.Option(0, "--eval-every", min=0, help="Steps between validation losses; 0 = at "
                                   "each commit only."),
    eval_rows: int = typer.Option(None, "--eval-rows", min=1, help="Validation rows used (the first N).",
                                  show_default="every row"),
    commit_every: int = typer.Option(100, "--commit-every", min=1, help="Steps per transaction."),
    threads: int = typer.Option(None, "--threads", min=0, help="pg_llm.threads for this run.",
                                show_default="the server's setting"),
    any_tokenizer: bool = typer.Option(False, "--any-tokenizer", help="Train even on a dataset made with another "
                                       "tokenizer than the model's (pg_llm.check_dataset_tokenizer = off)."),
    adapter: str = typer.Option(None, "--adapter", "-a", help="Train this LoRA adapter (pgllm adapter create) "
                                "instead of the model; the model is the adapter's base and stays frozen.",
                                show_default="none: the model itself"),
) -> None:
    """Train a model, or a LoRA adapter of it, on llm_dataset with llm_train, committing every N steps."""
    if schedule not in SCHEDULES:
        raise PgllmError(f"--schedule must be new or continue, not {schedule!r}")
    if eval_dataset is None and (eval_every or eval_rows):
        raise PgllmError("--eval-every and --eval-rows need --eval-dataset", hint="e.g. --eval-dataset val")
    with db.session(ctx.obj["dsn"]) as pg:
        conn = pg.conn
        if adapter is not None:
            model = adapter_base(ctx, pg, adapter, model)
        pg.require_model(model, hint="pgllm import or pgllm init creates it")
        what = f'adapter "{adapter}" of model "{model}"' if adapter is not None else f'model "{model}"'
        # what is trained: its training lock, and the table with its step counter and schedule
        lock, state, key, name = (("llm_adapter_train_lock", "llm_adapter", "adapter", adapter) if adapter is not None
                                  else ("llm_train_lock", "llm_train_state", "model", model))
        # one run per model (or adapter): this session keeps its training lock until it ends, and a
        # second run fails here (the other run's pid in the error) instead of sharing the schedule
        pg.execute(f"SELECT {{{lock}}}(%s)", (name,))
        row = pg.execute(f"SELECT step, schedule FROM {{{state}}} WHERE {key} = %s", (name,)).fetchone()
        start_step, recorded = row if row else (0, None)
        plan = choose_schedule(ctx, what, recorded, schedule, start_step, steps, lr_max, lr_min, warmup, total_steps)
        conn.commit()
        if threads is not None:
            conn.execute("SELECT set_config('pg_llm.threads', %s, false)", (str(threads),))
        if any_tokenizer:
            conn.execute("SET pg_llm.check_dataset_tokenizer = off")
        conn.execute("SET client_min_messages = debug1")
        conn.commit()

        end = start_step + steps
        typer.echo(f"training {what} from step {start_step} to {end} on dataset \"{dataset}\": "
                   f"{'new' if schedule == 'new' else 'continued'} schedule, {describe(plan)}")
        length = plan["total_steps"] - plan["start"]
        if plan["warmup"] > length:
            typer.echo(f"note: the warmup ({plan['warmup']} steps) is longer than the schedule ({length} steps): the "
                       f"learning rate rises to {plan['lr_max'] * length / plan['warmup']:.3g} and never reaches "
                       f"--lr-max", err=True)
        val_before = None
        if eval_dataset is not None:
            val_before = pg.execute("SELECT loss FROM {llm_eval}(%s, %s, %s, adapter => %s)",
                                    (model, eval_dataset, eval_rows, adapter)).fetchone()[0]
            conn.commit()
        history: list[tuple[int, float, float, float]] = []  # (step, loss, lr, tokens/s)
        val_history: list[tuple[int, float]] = []  # (step, val_loss)
        committed = 0
        commits = 0
        started = time.monotonic()
        with progress_bar(*bar_columns(end)) as progress:
            task = progress.add_task("train", total=steps, step=start_step, loss="-",
                                     val="" if val_before is None else f" val {val_before:.3f}", lr="-", tps="-")

            def on_notice(diag: psycopg.errors.Diagnostic) -> None:
                event = train_event(diag)
                if event is not None and event["event"] == "llm_train.eval" and event["val_loss"] is not None:
                    val_history.append((event["step"], event["val_loss"]))
                    progress.update(task, val=f" val {event['val_loss']:.3f}")
                if event is None or event["event"] != "llm_train.step":
                    return
                step, loss, lr, tps = event["step"], event["loss"], event["lr"], event["tokens_per_s"]
                history.append((step, loss, lr, tps))
                progress.update(task, completed=committed + event["done"], step=step, loss=f"{loss:.3f}",
                                lr=f"{lr:.1e}", tps=f"{tps:.0f}")

            conn.add_notice_handler(on_notice)
            try:
                while committed < steps:
                    n = min(commit_every, steps - committed)
                    pg.execute(
                        "SELECT {llm_train}(%s, %s, beta1 => %s, beta2 => %s, eps => %s, wd => %s, lr_max => %s, "
                        "warmup => %s, batch_size => %s, grad_accum => %s, grad_clip => %s, lr_min => %s, "
                        "total_steps => %s, dropout => %s, seed => %s, dataset => %s, eval_dataset => %s, "
                        "eval_every => %s, eval_rows => %s, schedule_start => %s, adapter => %s)",
                        (model, n, beta1, beta2, eps, wd, plan["lr_max"], plan["warmup"], batch_size, grad_accum,
                         grad_clip, plan["lr_min"], plan["total_steps"], dropout, seed, dataset, eval_dataset,
                         eval_every, eval_rows, plan["start"], adapter))
                    pg.execute(f"UPDATE {{{state}}} SET schedule = %s::jsonb WHERE {key} = %s",
                               (json.dumps(plan), name))
                    conn.commit()
                    committed += n
                    commits += 1
                    progress.update(task, completed=committed)
                    interrupt.check()
            except (KeyboardInterrupt, psycopg.Error) as e:
                kept = [h for h in history if h[0] <= start_step + committed]
                where = (f"{committed} of {steps} steps committed ({what} is at step "
                         f"{start_step + committed}); the chunk in progress was rolled back"
                         + (f"; last committed loss {kept[-1][1]:.4f}" if kept else ""))
                if isinstance(e, KeyboardInterrupt) or (interrupt.requested()
                                                        and isinstance(e, psycopg.errors.QueryCanceled)):
                    raise PgllmError(f"interrupted: {where}", exit_code=130) from None
                raise PgllmError(f"{database_error_line(e)}; {where}") from None
        elapsed = time.monotonic() - started
    losses = [h[1] for h in history]
    rates = [h[3] for h in history]
    first = f"{losses[0]:.4f}" if losses else "-"
    last = f"{losses[-1]:.4f}" if losses else "-"
    rate = f"{sum(rates) / len(rates):.0f}" if rates else "-"
    vals = ([val_before] if val_before is not None else []) + [v for _, v in val_history]
    typer.echo(f"trained {what}: steps {start_step + 1}..{end} of a {length}-step schedule "
               f"({'new' if schedule == 'new' else 'continued'}, from step {plan['start']}), loss {first} -> {last}"
               + (f", val loss {vals[0]:.4f} -> {vals[-1]:.4f}" if vals else "")
               + f", {rate} tokens/s per step, {elapsed:.1f} s ({plural(commits, 'commit')})")
