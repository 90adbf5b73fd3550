"""Test fixtures: a real PostgreSQL server started by the suite, with a fresh build of pg_llm.

The server is pgllm's own embedded cluster in a temporary PGLLM_HOME, so the suite also runs
the code users run (`pgllm server start`, `pgllm install`). It never touches system directories.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from pgllm.cli import app
from pgllm.cluster import Cluster, is_root
from pgllm.extension import build_and_install, create_or_update
from pgllm.installation import control_file_version

REPO = Path(__file__).resolve().parent.parent
# The extension's version: default_version of its control file (the one source of it).
EXT_VERSION = control_file_version(REPO / "ext" / "pg_llm.control")
PGLLM_BIN = Path(sys.executable).parent / "pgllm"

# Variables that would point pgllm somewhere other than the test server.
_FOREIGN_ENV = ("PGLLM_DSN", "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE",
                "PGSERVICEFILE", "PGPASSWORD", "PGLLM_MODEL")


def make_home(prefix: str = "pgllm-test-") -> Path:
    """A temporary PGLLM_HOME that the postgres OS user can reach when we are root."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(home, 0o755)
    return home


@pytest.fixture(scope="session")
def cluster():
    for var in _FOREIGN_ENV:
        os.environ.pop(var, None)
    home = make_home()
    os.environ["PGLLM_HOME"] = str(home)
    c = Cluster(home)
    c.start()
    build_and_install(c.pg_config)
    with psycopg.connect(c.dsn()) as conn:
        create_or_update(conn)
    yield c
    c.stop()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def dsn(cluster) -> str:
    """The database `pgllm` of the test server, with pg_llm created."""
    return cluster.dsn()


@pytest.fixture(scope="module")
def pg(dsn):
    """A connection to `dsn` (autocommit) for a whole test module: its models stay between tests."""
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


@pytest.fixture
def db(cluster):
    """A new database with pg_llm created, dropped after the test: tests cannot see each other's models."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = cluster.dsn(name)
    with psycopg.connect(url) as conn:
        conn.execute("CREATE EXTENSION pg_llm")
    yield url
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def conn(db):
    with psycopg.connect(db, autocommit=True) as c:
        yield c


@pytest.fixture
def cli(cluster):
    """Run `pgllm ARGS` in-process through Typer's runner; returns the click Result."""
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(app, list(args), input=input, catch_exceptions=False)

    return invoke


def run_pgllm(*args: str, env: dict | None = None, user: str | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed console script, optionally as another OS user (root only)."""
    argv = [str(PGLLM_BIN), *args]
    if user is not None:
        assert is_root()
        env_args = [f"{k}={v}" for k, v in (env or {}).items()]
        argv = ["runuser", "-u", user, "--", "env", *env_args, *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
