"""`pgllm init`: a new model with GPT-2's initial weights, made inside the server (no download)."""

from __future__ import annotations

import time

import typer

from .. import db
from ..progress import spinner


def init(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Name of the model to create (or re-initialise, with --replace)."),
    n_layer: int = typer.Option(None, "--n-layer", help="Transformer blocks.", show_default=False),
    n_head: int = typer.Option(None, "--n-head", help="Attention heads (must divide --d-model).", show_default=False),
    d_model: int = typer.Option(None, "--d-model", help="Embedding width.", show_default=False),
    n_positions: int = typer.Option(None, "--n-positions", help="Context length.", show_default=False),
    vocab: int = typer.Option(None, "--vocab", help="Vocabulary size (50257 for GPT-2's tokenizer).", show_default=False),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation: the same seed gives the same weights."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite the model's existing weights "
                                 "(also clears its optimizer state, training state and training log)."),
) -> None:
    """Create a model with GPT-2's initial weights (options left out: from its existing configuration)."""
    start = time.perf_counter()
    with db.connect(ctx.obj["dsn"]) as conn, spinner() as progress:
        progress.add_task(f"initialising {model}")
        n = conn.execute("SELECT llm_init(%s, %s, %s, %s, %s, %s, %s, %s)",
                         (model, n_layer, n_head, d_model, n_positions, vocab, seed, replace)).fetchone()[0]
        row = conn.execute("SELECT n_layer, n_head, d_model, n_positions, vocab FROM llm_model_config "
                           "WHERE model = %s", (model,)).fetchone()
    typer.echo("initialised model {!r}: {:,} parameters (n_layer={}, n_head={}, d_model={}, n_positions={}, "
               "vocab={}, seed {}) in {:.1f} s".format(model, n, *row, seed, time.perf_counter() - start))
