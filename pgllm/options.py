"""Options that several commands share, each defined once (help text and default included)."""

from __future__ import annotations

import typer

from .client import DEFAULT_MODEL, MODEL_ENV

MODEL_HELP = "The model (pg_llm keeps several, by name)."

# PGLLM_MODEL, else gpt2-small: the rule of client.default_model, which the library follows too.
MODEL = typer.Option(DEFAULT_MODEL, "--model", "-m", envvar=MODEL_ENV, help=MODEL_HELP)

# The same, as a positional argument (`pgllm export MODEL`).
MODEL_ARGUMENT = typer.Argument(DEFAULT_MODEL, envvar=MODEL_ENV, help=MODEL_HELP)
