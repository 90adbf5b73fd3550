"""Building the pg_llm extension with PGXS and creating it in a database."""

from __future__ import annotations

import ctypes.util
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import psycopg

from .cluster import pg_config_values
from .errors import PgllmError

EXTENSION = "pg_llm"


def source_dir() -> Path:
    ext = Path(__file__).resolve().parent.parent / "ext"
    if not (ext / "Makefile").exists():
        raise PgllmError(f"the extension sources are not at {ext}",
                         hint="run pgllm from a source checkout (pip install -e .)")
    return ext


def check_prerequisites(pg_config: Path) -> dict[str, str]:
    """Everything PGXS needs, each missing piece named with the package that provides it."""
    cfg = pg_config_values(pg_config)
    major = cfg["version"].split()[-1].split(".")[0]
    if not (Path(cfg["includedir-server"]) / "postgres.h").exists():
        raise PgllmError(f"PostgreSQL server headers not found in {cfg['includedir-server']}",
                         hint=f"install them: apt-get install postgresql-server-dev-{major}")
    for tool, package in (("make", "make"), ("gcc", "gcc")):
        if shutil.which(tool) is None:
            raise PgllmError(f"{tool} not found", hint=f"install it: apt-get install {package}")
    if ctypes.util.find_library("openblas") is None:
        raise PgllmError("OpenBLAS not found", hint="install it: apt-get install libopenblas-dev")
    for key in ("pkglibdir", "sharedir"):
        target = Path(cfg[key]) / ("extension" if key == "sharedir" else "")
        if not os.access(target, os.W_OK):
            raise PgllmError(f"cannot write PostgreSQL's directory {target}",
                             hint="run `pgllm install` as root (sudo), or use the embedded server (no --dsn)")
    return cfg


def check_same_major(conn: psycopg.Connection, cfg: dict[str, str]) -> None:
    """The extension must be built for the server's major version."""
    server = conn.execute("SHOW server_version_num").fetchone()[0]
    server_major = int(server) // 10000
    built_major = int(cfg["version"].split()[-1].split(".")[0])
    if server_major != built_major:
        raise PgllmError(f"the server runs PostgreSQL {server_major} but pg_config is for {built_major}",
                         hint="pass --pg-config of the server's own installation")


def build_dir(ext: Path, cfg: dict[str, str]) -> Path:
    """Out-of-tree build folder, kept between installs: one per source tree and set of server
    headers, so that installing into another tree of the same PostgreSQL reuses the objects."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    headers = os.path.realpath(cfg["includedir-server"])
    key = hashlib.sha1(f"{ext}|{headers}|{cfg['version']}".encode()).hexdigest()[:12]
    return cache / "pgllm" / f"build-{key}"


def build_and_install(pg_config: Path) -> dict[str, str]:
    cfg = check_prerequisites(pg_config)
    ext = source_dir()
    build = build_dir(ext, cfg)
    build.mkdir(parents=True, exist_ok=True)
    make = ["make", "-C", str(build), "-f", str(ext / "Makefile"), f"VPATH={ext}", f"PG_CONFIG={pg_config}"]
    for target in (["-j", str(os.cpu_count() or 1)], ["install"]):
        proc = subprocess.run(make + target, capture_output=True, text=True)
        if proc.returncode != 0:
            output = (proc.stderr + proc.stdout).strip().splitlines()
            errors = [line for line in output if "error:" in line or "cannot" in line] or output[-1:]
            raise PgllmError(f"building the extension failed: {errors[0] if errors else 'make exited ' + str(proc.returncode)}")
    return cfg


def create_or_update(conn: psycopg.Connection) -> tuple[str | None, str]:
    """CREATE EXTENSION, or ALTER EXTENSION ... UPDATE; returns (old version, new version)."""
    row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = %s", (EXTENSION,)).fetchone()
    old = row[0] if row else None
    try:
        if old is None:
            conn.execute(f"CREATE EXTENSION IF NOT EXISTS {EXTENSION}")
        else:
            conn.execute(f"ALTER EXTENSION {EXTENSION} UPDATE")
    except psycopg.errors.InsufficientPrivilege as e:
        raise PgllmError(f"not allowed to create the extension: {e.diag.message_primary}",
                         hint="connect as a superuser to install pg_llm") from None
    except psycopg.errors.UndefinedFile as e:
        raise PgllmError(f"the server cannot find pg_llm: {e.diag.message_primary}",
                         hint="the extension must be installed on the database server's machine; use --pg-config to pick that installation") from None
    new = conn.execute("SELECT extversion FROM pg_extension WHERE extname = %s", (EXTENSION,)).fetchone()[0]
    conn.commit()
    return old, new
