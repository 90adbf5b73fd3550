"""`pgllm init`: a new model with GPT-2's initial weights, made inside the server (no download)."""

from __future__ import annotations

import time
from dataclasses import astuple

import typer

from .. import db
from ..progress import spinner

EXISTING = "the model's own; needed for a new model"


def init(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Name of the model to create (or re-initialise, with --replace)."),
    n_layer: int = typer.Option(None, "--n-layer", help="Transformer blocks.", show_default=EXISTING),
    n_head: int = typer.Option(None, "--n-head", help="Attention heads (must divide --d-model).", show_default=EXISTING),
    d_model: int = typer.Option(None, "--d-model", help="Embedding width.", show_default=EXISTING),
    n_positions: int = typer.Option(None, "--n-positions", help="Context length.", show_default=EXISTING),
    vocab: int = typer.Option(None, "--vocab", help="Vocabulary size (50257 for GPT-2's tokenizer).",
                              show_default=EXISTING),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation: the same seed gives the same weights."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite the model's existing weights "
                                 "(also clears its optimizer state, training state and training log)."),
) -> None:
    """Create a model with GPT-2's initial weights (options left out: from its existing configuration)."""
    start = time.perf_counter()
    with db.session(ctx.obj["dsn"]) as pg, spinner() as progress:
        progress.add_task(f"initialising {model}")
        n = pg.execute("SELECT {llm_init}(%s, %s, %s, %s, %s, %s, %s, %s)",
                       (model, n_layer, n_head, d_model, n_positions, vocab, seed, replace)).fetchone()[0]
        cfg = pg.model_config(model)
    typer.echo("initialised model {!r}: {:,} parameters (n_layer={}, n_head={}, d_model={}, n_positions={}, "
               "vocab={}, seed {}) in {:.1f} s".format(model, n, *astuple(cfg), seed, time.perf_counter() - start))
