"""What every benchmark shares: a server to measure on, the GPT-2 tokenizer in it."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import psycopg


@contextmanager
def server(dsn: str | None):
    """The given server, or a private temporary one with pg_llm built from this tree."""
    if dsn:
        yield dsn
        return
    from pgllm.cluster import Cluster
    from pgllm.extension import build_and_install, create_or_update

    home = Path(tempfile.mkdtemp(prefix="pgllm-bench-", dir="/tmp"))
    os.chmod(home, 0o755)  # the postgres OS user must reach it when we are root
    os.environ["PGLLM_HOME"] = str(home)
    cluster = Cluster(home)
    try:
        print("starting a private PostgreSQL server and building pg_llm ...", flush=True)
        cluster.start()
        build_and_install(cluster.pg_config)
        with psycopg.connect(cluster.dsn()) as conn:
            create_or_update(conn)
        yield cluster.dsn()
    finally:
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)


def load_gpt2_tokenizer(conn: psycopg.Connection, model: str) -> None:
    """The bundled GPT-2 tokenizer for `model` (replacing any), as `pgllm tokenizer` loads it."""
    from pgllm.bundled import gpt2_tokenizer_files
    from pgllm.commands.tokenizer import load

    vocab, merges = (f.read_bytes() for f in gpt2_tokenizer_files())
    with conn.transaction():
        load(conn, model, vocab, merges, replace=True)
