"""`pgllm dataset`: tokenize text files into fixed-length training rows of llm_dataset.

Each input file is one document (or several, with --split-on); documents are joined with
<|endoftext|> into one token stream, which is cut into rows of block_size tokens, each with its
target (the same tokens shifted by one). Rows go to llm_dataset with COPY, batch_size at a time,
all in one transaction: a failure (a token id beyond the model's vocabulary, an unreadable file)
leaves the table as it was.
"""

from __future__ import annotations

import glob
import os
import socket
import time
from pathlib import Path

import json

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from .. import db, interrupt, tokenizer_files
from ..bundled import gpt2_hf_tokenizer
from ..errors import PgllmError
from ..optional import need
from ..options import MODEL
from ..progress import progress_bar

EOT = "<|endoftext|>"


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by the patterns (shell-style globs, ** included), each once, in path order
    (the order does not depend on how the shell split them between --input and arguments)."""
    files: list[Path] = []
    seen = set()
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) if glob.has_magic(pattern) \
            else [os.path.expanduser(pattern)]
        if not matches:
            raise PgllmError(f'no file matches "{pattern}"')
        for m in matches:
            p = Path(m)
            if p.is_dir():
                if not glob.has_magic(pattern):
                    raise PgllmError(f'"{m}" is a directory', hint="give the files, e.g. DIR/*.txt")
                continue
            if not p.exists():
                raise PgllmError(f'input file "{m}" not found')
            if p.resolve() not in seen:
                seen.add(p.resolve())
                files.append(p)
    if not files:
        raise PgllmError("no input files", hint="pass --input FILE or a glob such as 'corpus/*.txt'")
    return sorted(files, key=str)


def read_documents(path: Path, split_on: str | None) -> list[str]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PgllmError(f'cannot read "{path}": {e.strerror}') from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PgllmError(f'"{path}", line {line}: not valid UTF-8 text') from None
    if split_on is None:
        return [text] if text else []
    docs, current = [], []
    for line in text.splitlines(keepends=True):
        if line.rstrip("\r\n") == split_on:
            docs.append("".join(current))
            current = []
        else:
            current.append(line)
    docs.append("".join(current))
    return [d for d in docs if d.strip()]


# ---- tokenizers -------------------------------------------------------------------------------

def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _transformers():
    from transformers import AutoTokenizer, GPT2TokenizerFast  # checked by dataset() before it connects
    return AutoTokenizer, GPT2TokenizerFast


class HFTokenizer:
    """A transformers tokenizer: `gpt2` (the Hub's, or the bundled files when the Hub is out of
    reach; both are OpenAI's GPT-2 files) or a local directory."""

    def __init__(self, name: str):
        AutoTokenizer, GPT2TokenizerFast = _transformers()
        if name == "gpt2":
            tok = None
            try:
                tok = GPT2TokenizerFast.from_pretrained("gpt2", local_files_only=True)
            except Exception:
                if _hub_reachable():
                    try:
                        tok = GPT2TokenizerFast.from_pretrained("gpt2")
                    except Exception:
                        tok = None
            if tok is None or len(tok) != 50257:
                tok = gpt2_hf_tokenizer()
            self.description = "GPT-2 (transformers)"
        else:
            path = Path(name)
            if not path.is_dir():
                raise PgllmError(f'tokenizer "{name}" is neither gpt2, db nor a directory',
                                 hint="--tokenizer gpt2 | DIR (a saved Hugging Face tokenizer) | db")
            try:
                tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except Exception as e:
                raise PgllmError(f'cannot load the tokenizer in "{name}": {str(e).splitlines()[0]}') from None
            self.description = f"{name} (transformers)"
        self.tok = tok
        self.label = f"{name} (transformers)"
        backend = getattr(tok, "backend_tokenizer", None)
        self.fingerprint = None if backend is None else tokenizer_files.fingerprint(
            *tokenizer_files.from_tokenizer_json(json.loads(backend.to_str()), name))
        self.eot = tok.convert_tokens_to_ids(EOT) if EOT in tok.get_vocab() else tok.eos_token_id
        if self.eot is None:
            raise PgllmError(f"the tokenizer has no {EOT} (or end-of-sequence) token to separate documents")

    def encode(self, docs: list[str]) -> list[list[int]]:
        return self.tok(docs, add_special_tokens=False)["input_ids"] if docs else []


class DBTokenizer:
    """llm_encode inside the database, with the model's tokenizer tables."""

    def __init__(self, pg: db.Pgllm, model: str):
        self.pg, self.model = pg, model
        row = pg.execute("SELECT token_id FROM {llm_bpe_vocab} WHERE model = %s AND token = %s",
                         (model, EOT)).fetchone()
        if row is None:
            raise PgllmError(f'model "{model}" has no tokenizer with {EOT} in the database',
                             hint=f"load one with pgllm tokenizer --model {model}")
        self.eot = row[0]
        self.description = f'llm_encode (model "{model}")'
        self.label = f"model {model}"
        self.fingerprint = pg.execute("SELECT {llm_tokenizer_fingerprint}(%s)", (model,)).fetchone()[0]

    def encode(self, docs: list[str]) -> list[list[int]]:
        return [self.pg.execute("SELECT {llm_encode}(%s, %s)", (d, self.model)).fetchone()[0] for d in docs]


# ---- rows -------------------------------------------------------------------------------------

# The validation split, by document: a document goes to the validation set when its share, a hash
# of its text in [0, 1), is below --val-fraction. Deterministic, independent of the documents'
# order, and the same for files and for --query (the server computes it for both).
def doc_share(doc: str) -> str:
    return f"(pg_catalog.hashtextextended({doc}, 0) & 2147483647) / 2147483648.0"


def val_documents(pg: db.Pgllm, docs: list[str], val_fraction: float) -> list[bool]:
    """For each document, whether it goes to the validation set."""
    if not val_fraction or not docs:
        return [False] * len(docs)
    return [r[0] for r in pg.execute(f"SELECT {doc_share('d')} < %s FROM unnest(%s::text[]) WITH ORDINALITY "
                                     "AS u(d, i) ORDER BY i", (val_fraction, docs))]


def clear(pg: db.Pgllm, dataset: str) -> None:
    """Empty one dataset; when it is the only one, the ids restart from 1 too."""
    others = pg.execute("SELECT EXISTS (SELECT 1 FROM {llm_dataset} WHERE dataset <> %s)", (dataset,)).fetchone()[0]
    if others:
        pg.execute("DELETE FROM {llm_dataset} WHERE dataset = %s", (dataset,))
    else:
        pg.execute("TRUNCATE {llm_dataset} RESTART IDENTITY")


class RowWriter:
    """Cuts the token stream into rows and COPYs them, batch_size rows at a time."""

    def __init__(self, pg: db.Pgllm, block_size: int, batch_size: int, vocab: int, model: str, dataset: str,
                 tokenizer, hint: str):
        self.pg, self.T, self.batch_size, self.vocab, self.model = pg, block_size, batch_size, vocab, model
        self.dataset, self.tokenizer, self.hint = dataset, tokenizer, hint
        self.buffer = np.zeros(0, dtype=np.int64)
        self.pending: list[np.ndarray] = []
        self.rows = 0
        self.tokens = 0

    def add(self, ids: list[int], where: str) -> None:
        a = np.asarray(ids, dtype=np.int64)
        if a.size and (a.min() < 0 or a.max() >= self.vocab):
            bad = int(a[(a < 0) | (a >= self.vocab)][0])
            raise PgllmError(f"{where}: token id {bad} is outside model \"{self.model}\"'s vocabulary "
                             f"(0 .. {self.vocab - 1})", hint=f"{self.hint}; nothing was written")
        self.tokens += a.size
        self.buffer = np.concatenate([self.buffer, a])
        # a row needs T + 1 tokens (its target reaches one further); rows overlap by that one token
        n = (self.buffer.size - 1) // self.T
        if n > 0:
            self.pending.extend(self.buffer[i * self.T:(i + 1) * self.T + 1] for i in range(n))
            self.buffer = self.buffer[n * self.T:]
        while len(self.pending) >= self.batch_size:
            self.flush(self.batch_size)

    def flush(self, n: int | None = None) -> None:
        n = len(self.pending) if n is None else n
        if n == 0:
            return
        batch, self.pending = self.pending[:n], self.pending[n:]
        with self.pg.conn.cursor() as cur:
            with self.pg.copy(cur, "COPY {llm_dataset} (dataset, tokens, target, tokenizer, tokenizer_fingerprint) "
                                   "FROM STDIN") as copy:
                for r in batch:
                    copy.write_row((self.dataset, r[:-1].tolist(), r[1:].tolist(), self.tokenizer.label,
                                    self.tokenizer.fingerprint))
        self.rows += n

    @property
    def leftover(self) -> int:
        return max(0, self.buffer.size - 1)


def list_datasets(dsn: str | None) -> None:
    """--list: the llm_datasets view."""
    with db.session(dsn) as pg:
        rows = pg.execute("SELECT dataset, rows, block_size, tokens, tokenizer FROM {llm_datasets} "
                          "ORDER BY dataset").fetchall()
    if not rows:
        typer.echo("no datasets (make one with pgllm dataset --input FILES or --query SQL)")
        return
    table = [("dataset", "rows", "block size", "tokens", "tokenizer")] + [
        (d, str(r), str(b), str(t), tok or "unknown (rows written by hand)") for d, r, b, t, tok in rows]
    widths = [max(len(r[c]) for r in table) for c in range(5)]
    for r in table:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def drop_dataset(dsn: str | None, name: str) -> None:
    """--drop NAME: llm_dataset_drop."""
    with db.session(dsn) as pg:
        n = pg.execute("SELECT {llm_dataset_drop}(%s)", (name,)).fetchone()[0]
    if n == 0:
        raise PgllmError(f'dataset "{name}" does not exist', hint="pgllm dataset --list lists them")
    typer.echo(f'dropped dataset "{name}": {n} rows')


def model_defaults(pg: db.Pgllm, model: str, block_size: int | None, tokenizer: str | None, hint: str):
    """The model's configuration, and --block-size and --tokenizer defaulting to what fits it: its
    n_positions, and its own tokenizer when it has one in the database (else GPT-2's)."""
    cfg = pg.require_model(model, hint=hint)
    if block_size is None:
        block_size = cfg.n_positions
    if block_size > cfg.n_positions:
        raise PgllmError(f'--block-size {block_size} is larger than model "{model}"\'s n_positions '
                         f'{cfg.n_positions}', hint=f"leave it out for {cfg.n_positions}")
    has_own = pg.execute("SELECT EXISTS (SELECT 1 FROM {llm_bpe_vocab} WHERE model = %s)", (model,)).fetchone()[0]
    if tokenizer is None:
        tokenizer = "db" if has_own else "gpt2"
    return cfg, block_size, tokenizer, has_own


def dataset(
    ctx: typer.Context,
    input: list[str] = typer.Option(None, "--input", "-i", help="Text files or globs ('corpus/*.txt'); "
                                    "repeat the option or list several files after it.", show_default="none: --query"),
    query: str = typer.Option(None, "--query", "-q", help="Instead of files: a SELECT whose first column (text) "
                              "is one document per row, tokenized in the server (llm_dataset_build).",
                              show_default="none: --input files"),
    val_fraction: float = typer.Option(0.0, "--val-fraction", min=0.0, max=0.99, help="This fraction of the "
                                       "documents goes to --val-dataset instead (by a hash of each document's "
                                       "text: the same split on every run, for files and for --query)."),
    val_dataset: str = typer.Option("val", "--val-dataset", help="The dataset of --val-fraction."),
    more: list[str] = typer.Argument(None, metavar="[FILES]...", help="More input files (what a shell glob "
                                     "after --input expands to).", show_default=False),
    tokenizer: str = typer.Option(None, "--tokenizer", help="db (llm_encode in the database, with --model's "
                                  "tokenizer), gpt2 (transformers; the bundled GPT-2 files when the Hub is out of "
                                  "reach) or DIR (a saved Hugging Face tokenizer).",
                                  show_default="db when --model has a tokenizer, else gpt2"),
    model: str = MODEL,
    block_size: int = typer.Option(None, "--block-size", min=1, help="Tokens per row.",
                                   show_default="--model's n_positions"),
    batch_size: int = typer.Option(512, "--batch-size", min=1, help="Rows per COPY."),
    dataset_name: str = typer.Option("train", "--dataset", "-d", help="The dataset the rows go to (llm_dataset.dataset)."),
    truncate: bool = typer.Option(False, "--truncate", help="Empty the dataset first (in the same transaction); "
                                  "other datasets are kept."),
    split_on: str = typer.Option(None, "--split-on", help="A line that separates documents inside a file, "
                                 "e.g. % for fortune files.", show_default="none: one document per file"),
    list_: bool = typer.Option(False, "--list", help="List the datasets (rows, block size, tokens, tokenizer) "
                               "and do nothing else."),
    drop: str = typer.Option(None, "--drop", metavar="NAME", help="Delete dataset NAME and do nothing else.",
                             show_default="none"),
) -> None:
    """Tokenize text files (or the rows of a query) into fixed-length (tokens, target) rows of llm_dataset.

    The rows must fit --model: token ids within its vocabulary, --block-size within its n_positions.
    Each row records the tokenizer it was made with; --list and --drop manage datasets.
    """
    if list_ or drop is not None:
        if input or more or query is not None or (list_ and drop is not None):
            raise PgllmError("--list and --drop do nothing else: give one alone")
        return list_datasets(ctx.obj["dsn"]) if list_ else drop_dataset(ctx.obj["dsn"], drop)
    if query is not None:
        if input or more:
            raise PgllmError("give either --input files or --query, not both")
        if tokenizer not in (None, "db"):
            raise PgllmError("--query tokenizes in the server, with --model's tokenizer", hint="drop --tokenizer")
        return from_query(ctx.obj["dsn"], query, model, block_size, dataset_name, truncate, val_fraction,
                          val_dataset)
    if not input:
        raise PgllmError("no input", hint="pass --input FILE, a glob such as 'corpus/*.txt', or --query SQL")
    if val_fraction and val_dataset == dataset_name:
        raise PgllmError(f'--val-dataset must differ from --dataset ("{dataset_name}")')
    files = expand_inputs(list(input) + list(more or []))
    if tokenizer not in (None, "db"):  # before connecting: a missing package is the first thing to hear about
        need("pgllm dataset --tokenizer gpt2|DIR", "transformers", alternative="or use --tokenizer db")
    start = time.monotonic()
    with db.session(ctx.obj["dsn"]) as pg:
        cfg, block_size, tokenizer, has_own = model_defaults(
            pg, model, block_size, tokenizer, hint="the rows are checked against its vocabulary: register it first "
                                                   "(pgllm import or pgllm init), or pass --model")
        if tokenizer != "db":
            need("pgllm dataset --tokenizer gpt2|DIR", "transformers", alternative="or use --tokenizer db")
        tok = DBTokenizer(pg, model) if tokenizer == "db" else HFTokenizer(tokenizer)
        hint = ("use the model's tokenizer: --tokenizer db" if has_own and tokenizer != "db"
                else "use the model's tokenizer")
        names = [dataset_name, val_dataset] if val_fraction else [dataset_name]
        for name in names:
            if truncate:
                clear(pg, name)
            pg.execute("SELECT {llm_dataset_check_tokenizer}(%s, NULL, false, %s)", (name, tok.fingerprint))
        writers = [RowWriter(pg, block_size, batch_size, cfg.vocab, model, name, tok, hint) for name in names]
        n_docs = 0
        total_bytes = sum(f.stat().st_size for f in files)
        with progress_bar(TextColumn("[bold]tokenizing"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[rows]} rows"), TimeElapsedColumn()) as progress:
            task = progress.add_task("files", total=len(files), rows=0)
            for f in files:
                docs = read_documents(f, split_on)
                for ids, val in zip(tok.encode(docs), val_documents(pg, docs, val_fraction)):
                    writers[val].add(list(ids) + [tok.eot], str(f))
                    n_docs += 1
                progress.update(task, advance=1, rows=sum(w.rows + len(w.pending) for w in writers))
                interrupt.check()
            for w in writers:
                w.flush()
        if writers[0].rows == 0:
            raise PgllmError(f"the input has {writers[0].tokens} tokens, too few for one row of {block_size} "
                             f"(+1 for the target)", hint="lower --block-size; nothing was written")
        pg.conn.commit()
        totals = [pg.execute("SELECT count(*) FROM {llm_dataset} WHERE dataset = %s", (w.dataset,)).fetchone()[0]
                  for w in writers]
    elapsed = time.monotonic() - start
    tokens = sum(w.tokens for w in writers)
    into = "; ".join(f"{w.rows} rows of {block_size} tokens ({w.leftover} tokens left over) into dataset "
                     f"\"{w.dataset}\", which has {t} rows" for w, t in zip(writers, totals))
    typer.echo(f"{len(files)} files ({total_bytes / 1e6:.1f} MB), {n_docs} documents, {tokens} tokens "
               f"with {tok.description} -> {into}; in {elapsed:.1f} s")


def from_query(dsn: str | None, query: str, model: str, block_size: int | None, name: str, truncate: bool,
               val_fraction: float, val_dataset: str) -> None:
    """--query: llm_dataset_build in one transaction; with --val-fraction two calls over the same
    query, each keeping the documents of its side of a hash of the document's text."""
    if val_fraction and val_dataset == name:
        raise PgllmError(f'--val-dataset must differ from --dataset ("{name}")')
    start = time.monotonic()
    with db.session(dsn) as pg, progress_bar(TextColumn("tokenizing in the server"), TimeElapsedColumn()) as bar:
        cfg, block_size, _, has_own = model_defaults(
            pg, model, block_size, None, hint="its tokenizer and vocabulary are used: register it first "
                                              "(pgllm import or pgllm init), or pass --model")
        if not has_own:
            raise PgllmError(f'model "{model}" has no tokenizer in the database, which --query uses',
                             hint=f"load one with pgllm tokenizer --model {model}")
        bar.add_task("query")
        parts = [(name, query)]
        if val_fraction:
            # the document's hash in [0, 1): deterministic, independent of the rows' order
            share = doc_share("q.doc::text")
            inner = query.strip().rstrip(";")
            parts = [(name, f"SELECT q.doc FROM ({inner}) AS q(doc) WHERE {share} >= {val_fraction!r}"),
                     (val_dataset, f"SELECT q.doc FROM ({inner}) AS q(doc) WHERE {share} < {val_fraction!r}")]
        written = {}
        for dataset, q in parts:
            if truncate:
                clear(pg, dataset)
            written[dataset] = pg.execute("SELECT {llm_dataset_build}(%s, %s, %s, %s)",
                                          (q, dataset, model, block_size)).fetchone()[0]
        if sum(written.values()) == 0:
            raise PgllmError(f"the query's documents are too few tokens for one row of {block_size} (+1 for the "
                             f"target)", hint="lower --block-size; nothing was written")
    where = ", ".join(f'{n} rows into dataset "{d}"' for d, n in written.items())
    typer.echo(f"{where} ({block_size} tokens each, tokenized in the server with model \"{model}\"'s tokenizer) "
               f"in {time.monotonic() - start:.1f} s")
