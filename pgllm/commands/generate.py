"""`pgllm generate PROMPT`: generate text with a model stored in the database.

Tokens are printed as the server produces them (--stream, the default); --no-stream prints the
text at the end; --beam-width N runs beam search and prints the N hypotheses, best first.
`--input FILE` generates after every prompt of a file in batches (llm_generate_batch): one prompt
per line (blank lines skipped), or with --jsonl one JSON string or {"prompt": ...} object per
line; outputs come in the input's order, one line each (newlines in a text written as \\n, as
COPY's text format does), or with --jsonl as JSON objects {"index", "prompt", "text"}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from .. import db
from ..client import PGLLMClient
from ..errors import PgllmError
from ..options import MODEL
from ..progress import count_progress, spinner

# Prompts per llm_generate_batch call: the server decodes pg_llm.batch_rows of them at once.
CHUNK = 64
ESCAPE = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def read_prompts(path: Path, jsonl: bool) -> list[str]:
    """The prompts of FILE ('-': standard input), in order."""
    try:
        data = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PgllmError(f"cannot read {path}: {e}") from None
    prompts = []
    for number, line in enumerate(data.splitlines(), 1):
        if not jsonl:
            if line:
                prompts.append(line)
            continue
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise PgllmError(f"line {number} of the input is not JSON: {e.msg}") from None
        if isinstance(item, dict):
            item = item.get("prompt")
        if not isinstance(item, str):
            raise PgllmError(f'line {number} of the input: expected a JSON string or an object with "prompt"')
        prompts.append(item)
    return prompts


def generate_file(client: PGLLMClient, path: Path, jsonl: bool, **settings) -> None:
    """Every prompt of the file, CHUNK per call, printed in order as each chunk completes."""
    prompts = read_prompts(path, jsonl)
    with count_progress() as progress:
        task = progress.add_task(f"generating with {client.model}", total=len(prompts))
        for start in range(0, len(prompts), CHUNK):
            part = prompts[start:start + CHUNK]
            for i, (prompt, text) in enumerate(zip(part, client.generate_batch(part, chunk=CHUNK, **settings))):
                if jsonl:
                    typer.echo(json.dumps({"index": start + i, "prompt": prompt, "text": text}, ensure_ascii=False))
                else:
                    typer.echo(text.translate(ESCAPE))
            progress.update(task, advance=len(part))


def generate(
    ctx: typer.Context,
    prompt: str = typer.Argument(None, help="The text to continue.", show_default="none: --input FILE"),
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
    input: Path = typer.Option(None, "--input", "-i", help="Generate after each prompt of FILE (one per line; "
                               "'-': standard input), decoded together in batches; outputs in order.",
                               show_default="none: PROMPT"),
    jsonl: bool = typer.Option(False, "--jsonl", help="With --input: JSON lines in and out."),
) -> None:
    """Generate text after PROMPT: streamed token by token, or by beam search; or after each
    prompt of a file (--input)."""
    if (prompt is None) == (input is None):
        raise PgllmError("give either PROMPT or --input FILE")
    if input is not None and beam_width is not None:
        raise PgllmError("--input generates with sampling or greedy decoding", hint="drop --beam-width")
    if beam_width is not None:
        # beam search is deterministic: sampling options would be silently ignored
        given = [f"--{name.replace('_', '-')}" for name in ("temperature", "top_k", "top_p", "seed")
                 if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") == "COMMANDLINE"]
        if given:
            raise PgllmError(f"--beam-width does not sample: {', '.join(given)} would be ignored",
                             hint="leave them out, or drop --beam-width to sample")
    with db.connect(ctx.obj["dsn"]) as conn:
        client = PGLLMClient(conn, model)
        if input is not None:
            generate_file(client, input, jsonl, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed)
        elif beam_width is not None:
            with spinner() as progress:
                progress.add_task(f"beam search with {beam_width} beams ({model})")
                candidates = client.beam_search(prompt, beam_width=beam_width, max_tokens=max_tokens)
            for c in candidates:  # tab-separated: a text's own tabs and newlines escaped, as COPY's text format
                typer.echo(f"{c.rank}\t{c.score:.4f}\t{c.text.translate(ESCAPE)}")
        elif stream:
            try:
                for event in client.stream(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                           top_p=top_p, seed=seed):
                    sys.stdout.write(event.token)
                    sys.stdout.flush()
            finally:
                sys.stdout.write("\n")  # an error after part of the text goes on a line of its own
                sys.stdout.flush()
        else:
            with spinner() as progress:
                progress.add_task(f"generating with {model}")
                text = client.generate(prompt, temperature=temperature, max_tokens=max_tokens, top_k=top_k,
                                       top_p=top_p, seed=seed)
            typer.echo(text)
