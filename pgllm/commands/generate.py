"""`pgllm generate PROMPT`: generate text with a model stored in the database.

Tokens are printed as the server produces them (--stream, the default); --no-stream prints the
text at the end; --beam-width N runs beam search and prints the N hypotheses, best first.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from .. import db
from ..client import PGLLMClient
from ..errors import PgllmError
from ..options import MODEL


def generate(
    ctx: typer.Context,
    prompt: str = typer.Argument(..., help="The text to continue."),
    model: str = MODEL,
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", help="Tokens to generate at most."),
    temperature: float = typer.Option(1.0, "--temperature", "-t", help="0 for greedy decoding."),
    top_k: int = typer.Option(50, "--top-k", help="Sample among the k likeliest tokens (0: all)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Sample within the smallest set of tokens reaching this "
                                "probability (1: all)."),
    seed: int = typer.Option(None, "--seed", help="Make sampling reproducible.", show_default="random"),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print tokens as they are generated."),
    beam_width: int = typer.Option(None, "--beam-width", help="Beam search with N beams; prints N hypotheses.",
                                   show_default="off: sampling"),
) -> None:
    """Generate text after PROMPT: streamed token by token, or by beam search."""
    if beam_width is not None:
        # beam search is deterministic: sampling options would be silently ignored
        given = [f"--{name.replace('_', '-')}" for name in ("temperature", "top_k", "top_p", "seed")
                 if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") == "COMMANDLINE"]
        if given:
            raise PgllmError(f"--beam-width does not sample: {', '.join(given)} would be ignored",
                             hint="leave them out, or drop --beam-width to sample")
    err = Console(stderr=True)
    with db.connect(ctx.obj["dsn"]) as conn:
        client = PGLLMClient(conn, model)
        if beam_width is not None:
            with err.status(f"beam search with {beam_width} beams ({model})"):
                candidates = client.beam_search(prompt, beam_width=beam_width, max_tokens=max_tokens)
            for c in candidates:
                typer.echo(f"{c.rank}\t{c.score:.4f}\t{c.text}")
        elif stream:
            for event in client.stream(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                       top_p=top_p, seed=seed):
                sys.stdout.write(event.token)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            with err.status(f"generating with {model}"):
                text = client.generate(prompt, temperature=temperature, max_tokens=max_tokens, top_k=top_k,
                                       top_p=top_p, seed=seed)
            typer.echo(text)
