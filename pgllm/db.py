"""Which server to talk to, connecting to it, and the one way the CLI's SQL reaches pg_llm (Pgllm).

Order: --dsn, then PGLLM_DSN, then libpq's own PG* variables, then the embedded server
(started on demand).
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

from . import interrupt
from .cluster import Cluster
from .errors import PgllmError
from .npz import Config

# libpq variables that name a server; any of them means "the user chose a server".
LIBPQ_SERVER_VARS = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE", "PGSERVICEFILE")


def resolve_dsn(dsn: str | None) -> tuple[str, Cluster | None]:
    """The connection string to use, and the embedded cluster when that is the one chosen."""
    if dsn:
        return dsn, None
    if os.environ.get("PGLLM_DSN"):
        return os.environ["PGLLM_DSN"], None
    if any(os.environ.get(v) for v in LIBPQ_SERVER_VARS):
        return "", None
    cluster = Cluster.default()
    return cluster.dsn(), cluster


def redact(dsn: str) -> str:
    """The DSN without its password, for messages."""
    dsn = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", dsn)
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", dsn) or "(libpq environment)"


def connect(dsn: str | None, *, autocommit: bool = False, start: bool = True) -> psycopg.Connection:
    """Connect, starting the embedded server first when it is the one chosen."""
    target, cluster = resolve_dsn(dsn)
    if cluster is not None and start:
        cluster.start()
    try:
        return interrupt.watch(psycopg.connect(target, autocommit=autocommit))
    except psycopg.OperationalError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = re.sub(r'^connection to server at .*? failed: ', '', first)
        first = re.sub(r'^connection to server on socket .*? failed: ', '', first)
        hint = "check --dsn / PGLLM_DSN" if cluster is None else "run `pgllm server status`"
        if "password" in first:
            hint = "check the user name and password in the connection string"
        raise PgllmError(f"cannot connect to {redact(target)}: {first}", hint=hint) from None


class Pgllm:
    """pg_llm in one database: the CLI's SQL, each of pg_llm's names qualified with its schema.

    Statements name pg_llm's tables and functions in braces, `SELECT {llm_init}(%s)`; they run as
    `"schema"."llm_init"`, the schema being the extension's (pg_extension.extnamespace). A
    search_path that leaves that schema out, or puts objects of the same names before it, changes
    nothing: the engine names its own tables the same way (llm_table in ext/src/pg_llm.c).
    """

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn
        row = conn.execute("SELECT n.nspname FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n "
                           "ON n.oid = e.extnamespace WHERE e.extname = 'pg_llm'").fetchone()
        if row is None:
            # a database error, not a PgllmError: PGLLMClient's callers catch psycopg.Error
            raise psycopg.errors.UndefinedObject(f'the pg_llm extension is not installed in database '
                                                 f'"{conn.info.dbname}" (run pgllm install)')
        # a SQL_ASCII database sends text as bytes
        self.schema = row[0] if isinstance(row[0], str) else row[0].decode("utf-8")

    def sql(self, query: str) -> sql.Composed:
        """The statement with each {name} as "schema"."name" ({{ and }} for literal braces)."""
        names = {field for _, field, _, _ in string.Formatter().parse(query) if field}
        return sql.SQL(query).format(**{name: sql.Identifier(self.schema, name) for name in names})

    def name(self, name: str) -> str:
        """A qualified name as text, for arguments such as has_function_privilege's."""
        return sql.Identifier(self.schema, name).as_string(self.conn)

    def execute(self, query: str, params=None, **kwargs) -> psycopg.Cursor:
        return self.conn.execute(self.sql(query), params, **kwargs)

    def copy(self, cursor: psycopg.Cursor, query: str):
        return cursor.copy(self.sql(query))

    # ---- the queries several commands share ----

    def model_config(self, model: str) -> Config | None:
        """The model's architecture, or None when no model has this name."""
        row = self.execute("SELECT n_layer, n_head, d_model, n_positions, vocab FROM {llm_model_config} "
                           "WHERE model = %s", (model,)).fetchone()
        return Config(*row) if row else None

    def require_model(self, model: str, hint: str) -> Config:
        cfg = self.model_config(model)
        if cfg is None:
            raise PgllmError(f'model "{model}" does not exist', hint=hint)
        return cfg


@contextmanager
def session(dsn: str | None, **kwargs) -> Iterator[Pgllm]:
    """A connection to a database with pg_llm, as in `with db.session(dsn) as pg: pg.execute(...)`;
    committed at the end unless an exception escapes (then rolled back), then closed."""
    with connect(dsn, **kwargs) as conn:
        yield Pgllm(conn)
