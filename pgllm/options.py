"""Options that several commands share, each defined once (help text and default included)."""

from __future__ import annotations

import typer

from .client import DEFAULT_MODEL, MODEL_ENV

MODEL_HELP = "The model (pg_llm keeps several, by name)."

# PGLLM_MODEL, else gpt2-small: the rule of client.default_model, which the library follows too.
MODEL = typer.Option(DEFAULT_MODEL, "--model", "-m", envvar=MODEL_ENV, help=MODEL_HELP)

# An optional positional MODEL beside --model (`pgllm export M` or `pgllm export --model M`); the
# command uses `model_arg or model`.
MODEL_POSITIONAL = typer.Argument(None, metavar="[MODEL]", help="The model (or --model).", show_default="--model")
