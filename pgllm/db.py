"""Which server to talk to, and connecting to it.

Order: --dsn, then PGLLM_DSN, then libpq's own PG* variables, then the embedded server
(started on demand).
"""

from __future__ import annotations

import os
import re

import psycopg

from .cluster import Cluster
from .errors import PgllmError

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
        return psycopg.connect(target, autocommit=autocommit)
    except psycopg.OperationalError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = re.sub(r'^connection to server at .*? failed: ', '', first)
        first = re.sub(r'^connection to server on socket .*? failed: ', '', first)
        hint = "check --dsn / PGLLM_DSN" if cluster is None else "run `pgllm server status`"
        if "password" in first:
            hint = "check the user name and password in the connection string"
        raise PgllmError(f"cannot connect to {redact(target)}: {first}", hint=hint) from None
