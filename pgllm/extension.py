"""Building the pg_llm extension with PGXS and creating it in a database."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import psycopg

from . import DISTRIBUTION
from .errors import PgllmError
from .installation import control_file_version, pg_config_values
from .wheels import system_has_openblas, wheel_blas_library

EXTENSION = "pg_llm"


def source_dir() -> Path:
    """The extension's sources: pgllm/ext in an installed package (pyproject.toml maps the
    checkout's ext/ there), the checkout's ext/ in an editable install."""
    here = Path(__file__).resolve().parent
    for ext in (here / "ext", here.parent / "ext"):
        if (ext / "Makefile").is_file() and (ext / f"{EXTENSION}.control").is_file():
            return ext
    raise PgllmError(f"the extension sources are missing from {here / 'ext'}",
                     hint=f"reinstall pgllm: pip install --force-reinstall {DISTRIBUTION}")


def control_version(ext: Path | None = None) -> str:
    """default_version of the control file: the version `pgllm install` installs."""
    return control_file_version((ext or source_dir()) / f"{EXTENSION}.control")


def min_server_version() -> int:
    """The oldest PostgreSQL pg_llm builds for, as server_version_num: base/base.h says it."""
    header = (source_dir() / "src" / "base" / "base.h").read_text()
    return int(re.search(r"^#define PG_LLM_MIN_PG_VERSION_NUM (\d+)", header, re.M).group(1))


def check_version_supported(version_num: int, what: str) -> None:
    """Refuse a PostgreSQL older than pg_llm supports (version_num as server_version_num)."""
    oldest = min_server_version()
    if version_num < oldest:
        major = str(version_num // 10000) if version_num >= 100000 else f"{version_num // 10000}.{version_num // 100 % 100}"
        raise PgllmError(f"{what} is PostgreSQL {major}; pg_llm needs PostgreSQL {oldest // 10000} or newer",
                         hint="use a newer PostgreSQL: pass its pg_config and connection string")


def pg_config_version_num(cfg: dict[str, str]) -> int:
    """pg_config's "PostgreSQL 15.18 (Debian ...)" as server_version_num says it (150018)."""
    parts = [int(re.match(r"\d*", p).group() or 0) for p in cfg["version"].split()[1].split(".")] + [0, 0]
    if parts[0] >= 10:  # major.minor since PostgreSQL 10
        return parts[0] * 10000 + parts[1]
    return parts[0] * 10000 + parts[1] * 100 + parts[2]


def check_prerequisites(pg_config: Path) -> dict[str, str]:
    """Everything PGXS needs, each missing piece named with the package that provides it."""
    cfg = pg_config_values(pg_config)
    version = pg_config_version_num(cfg)
    check_version_supported(version, pg_config)
    major = version // 10000
    if not (Path(cfg["includedir-server"]) / "postgres.h").exists():
        raise PgllmError(f"PostgreSQL server headers not found in {cfg['includedir-server']}",
                         hint=f"install them: apt-get install postgresql-server-dev-{major}")
    for tool, package in (("make", "make"), ("gcc", "gcc")):
        if shutil.which(tool) is None:
            raise PgllmError(f"{tool} not found", hint=f"install it: apt-get install {package}")
    if subprocess.run(["gcc", "-E", "-x", "c", "-o", os.devnull, "-"], input="#include <zlib.h>\n",
                      capture_output=True, text=True).returncode != 0:
        raise PgllmError("zlib's header zlib.h not found (checkpoint files are gzip streams)",
                         hint="install it: apt-get install zlib1g-dev")
    if not system_has_openblas() and wheel_blas_library() is None:
        raise PgllmError("OpenBLAS not found",
                         hint="install it: apt-get install libopenblas-dev, or without root: pip install scipy-openblas32")
    for key in ("pkglibdir", "sharedir"):
        target = Path(cfg[key]) / ("extension" if key == "sharedir" else "")
        if not os.access(target, os.W_OK):
            raise PgllmError(f"cannot write PostgreSQL's directory {target}",
                             hint="run `pgllm install` as root (sudo), or use the embedded server (no --dsn)")
    return cfg


def check_same_major(conn: psycopg.Connection, cfg: dict[str, str]) -> None:
    """The extension must be built for the server's major version."""
    server = int(conn.execute("SHOW server_version_num").fetchone()[0])
    check_version_supported(server, "the server")
    server_major = server // 10000
    built_major = pg_config_version_num(cfg) // 10000
    if server_major != built_major:
        raise PgllmError(f"the server runs PostgreSQL {server_major} but pg_config is for {built_major}",
                         hint="pass --pg-config of the server's own installation")


def build_dir(ext: Path, cfg: dict[str, str]) -> Path:
    """Out-of-tree build folder, kept between installs: one per source tree and set of server
    headers, so that installing into another tree of the same PostgreSQL reuses the objects."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    headers = os.path.realpath(cfg["includedir-server"])
    # COPT (extra compiler options, as PGXS reads them: make test's warnings as errors) is part of the key
    key = hashlib.sha1(f"{ext}|{headers}|{cfg['version']}|{os.environ.get('COPT', '')}".encode()).hexdigest()[:12]
    return cache / "pgllm" / f"build-{key}"


def build_and_install(pg_config: Path, ext: Path | None = None) -> dict[str, str]:
    """make and make install of `ext` (default: the sources pgllm carries) out of tree, so that
    the sources may be read-only (a package installed by root, used by anyone)."""
    cfg = check_prerequisites(pg_config)
    ext = ext or source_dir()
    build = build_dir(ext, cfg)
    build.mkdir(parents=True, exist_ok=True)
    make = ["make", "-C", str(build), "-f", str(ext / "Makefile"), f"VPATH={ext}", f"PG_CONFIG={pg_config}"]
    # one build at a time per folder: two installs at once would write the same objects
    with open(build / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for target in (["-j", str(os.cpu_count() or 1)], ["install"]):
            returncode, output = run_make(make + target, sources=len(list((ext / "src").glob("*.c"))))
            if returncode != 0:
                errors = [line for line in output if "error:" in line or "cannot" in line] or output[-1:]
                raise PgllmError(f"building the extension failed: {errors[0] if errors else 'make exited ' + str(returncode)}")
    return cfg


def run_make(argv: list[str], sources: int) -> tuple[int, list[str]]:
    """make, with a bar of the C files compiled (a first build takes a minute); returns the exit
    code and make's output lines."""
    from .progress import count_progress

    output = []
    with count_progress() as progress:
        task = progress.add_task(f"building pg_llm ({argv[-1] if argv[-1] == 'install' else 'compiling'})",
                                 total=sources if argv[-1] != "install" else None)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            output.append(line.rstrip("\n"))
            if " -c -o " in line and line.rstrip().endswith(".c"):
                progress.advance(task)
        returncode = proc.wait()
    return returncode, output


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
