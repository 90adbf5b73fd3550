"""The foundation: the pgllm command, the embedded server, `pgllm install`, the schema."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path

import psycopg
import pytest

from pgllm.cluster import Cluster, is_root
from pgllm.db import resolve_dsn

from .conftest import EXT_VERSION, REPO, make_home, run_pgllm

UNPRIVILEGED_USER = "pgllmtest"


def test_help_lists_the_subcommands():
    proc = run_pgllm("--help")
    assert proc.returncode == 0, proc.stderr
    for name in ("install", "server"):
        assert name in proc.stdout


def test_status_json_reports_the_server_and_extension(cluster, cli):
    result = cli("server", "status", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["running"] is True
    assert info["dsn"] == cluster.dsn()
    assert info["extension_version"] == EXT_VERSION
    assert info["server_version"].startswith(("15", "16", "17", "18"))
    assert Path(info["data_directory"]) == cluster.data


def test_status_text_through_the_console_script(cluster):
    proc = run_pgllm("server", "status")
    assert proc.returncode == 0, proc.stderr
    assert "running           yes" in proc.stdout
    assert f"pg_llm installed  {EXT_VERSION}" in proc.stdout
    assert str(cluster.log_file) in proc.stdout


def test_start_is_idempotent_and_install_updates_in_place(cluster, cli):
    result = cli("server", "start")
    assert result.exit_code == 0 and "already running" in result.output
    result = cli("install")
    assert result.exit_code == 0, result.output
    assert f"extension pg_llm {EXT_VERSION} is up to date" in result.output


def test_regression_suite(cluster, tmp_path):
    """ext/test through pg_regress, as `make installcheck` runs it."""
    pgxs = Path(subprocess.run([str(cluster.pg_config), "--pgxs"], capture_output=True, text=True).stdout.strip())
    pg_regress = pgxs.parent.parent / "test" / "regress" / "pg_regress"
    tests = sorted(p.stem for p in (REPO / "ext" / "test" / "sql").glob("*.sql"))
    os.chmod(tmp_path, 0o777)
    # --bindir: the psql beside the server (as PGXS passes it), not the one pg_regress was built with
    proc = subprocess.run([str(pg_regress), f"--bindir={cluster.bindir}", f"--inputdir={REPO / 'ext' / 'test'}",
                           f"--outputdir={tmp_path}",
                           f"--host={cluster.run_dir}", f"--port={cluster.port}", f"--user={cluster.role}",
                           "--dbname=contrib_regression", *tests], capture_output=True, text=True)
    diffs = tmp_path / "regression.diffs"
    assert proc.returncode == 0, proc.stdout + (diffs.read_text() if diffs.exists() else "")


def test_connection_resolution_order(monkeypatch, cluster):
    monkeypatch.setenv("PGLLM_DSN", "postgresql://from-env/x")
    monkeypatch.setenv("PGHOST", "libpq-host")
    assert resolve_dsn("postgresql://explicit/x") == ("postgresql://explicit/x", None)
    assert resolve_dsn(None) == ("postgresql://from-env/x", None)
    monkeypatch.delenv("PGLLM_DSN")
    assert resolve_dsn(None) == ("", None)  # libpq reads PGHOST itself
    monkeypatch.delenv("PGHOST")
    dsn, embedded = resolve_dsn(None)
    assert embedded is not None and dsn == cluster.dsn()


def test_libpq_variables_are_honoured(cluster, cli, monkeypatch):
    """PGHOST/PGPORT/PGUSER/PGDATABASE name the server when nothing else does."""
    monkeypatch.setenv("PGHOST", str(cluster.run_dir))
    monkeypatch.setenv("PGPORT", str(cluster.port))
    monkeypatch.setenv("PGUSER", cluster.role)
    monkeypatch.setenv("PGDATABASE", "pgllm")
    result = cli("install")
    assert result.exit_code == 0, result.output


def _assert_one_line_error(proc_or_result, *needles: str) -> str:
    code = getattr(proc_or_result, "returncode", getattr(proc_or_result, "exit_code", None))
    err = proc_or_result.stderr
    assert code not in (0, None)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_unreachable_dsn_is_one_error_line(cluster):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_pgllm("--dsn", f"postgresql://nobody@127.0.0.1:{port}/x", "install")
    _assert_one_line_error(proc, "cannot connect", f"127.0.0.1:{port}")


@pytest.fixture(scope="module")
def tcp_cluster(cluster):
    """A second embedded server that also listens on TCP, with a password-protected role."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = Cluster(make_home())
    c.start(port=port)
    with psycopg.connect(c.dsn(), autocommit=True) as conn:
        conn.execute("CREATE ROLE alice LOGIN PASSWORD 'right-password'")
    yield c
    c.stop()
    shutil.rmtree(c.home, ignore_errors=True)


def test_wrong_password_is_one_error_line(tcp_cluster):
    proc = run_pgllm("--dsn", f"postgresql://alice:wrong@127.0.0.1:{tcp_cluster.port}/pgllm", "install")
    line = _assert_one_line_error(proc, "password authentication failed", "alice")
    assert "wrong" not in line  # the password is never echoed


def test_port_already_taken(tcp_cluster):
    home = make_home()
    proc = run_pgllm("server", "start", "--port", str(tcp_cluster.port), env={"PGLLM_HOME": str(home)})
    _assert_one_line_error(proc, f"port {tcp_cluster.port} is already in use")
    shutil.rmtree(home, ignore_errors=True)


def test_stale_postmaster_pid_is_cleared(tcp_cluster):
    """After a crash the lock file may name a PID that now belongs to another process."""
    tcp_cluster.stop()
    (tcp_cluster.data / "postmaster.pid").write_text(f"{os.getpid()}\n{tcp_cluster.data}\n")
    proc = run_pgllm("server", "start", env={"PGLLM_HOME": str(tcp_cluster.home)})
    assert proc.returncode == 0, proc.stderr
    assert tcp_cluster.running()


@pytest.mark.skipif(not is_root(), reason="needs root to give the data directory to another user")
def test_data_directory_owned_by_someone_else():
    home = make_home()
    (home / "data").mkdir(mode=0o700)
    (home / "data" / "PG_VERSION").write_text("15\n")  # root-owned: not the postgres user's
    proc = run_pgllm("server", "start", env={"PGLLM_HOME": str(home)})
    _assert_one_line_error(proc, "is owned by root")
    shutil.rmtree(home, ignore_errors=True)


def test_install_without_server_headers(cluster, tmp_path):
    """A PostgreSQL installation without postgresql-server-dev: install names the package."""
    home = make_home()
    bare = Cluster(home)
    bare.ensure_tree()
    # the link to the headers: pg/include/postgresql (Debian), pg/.../pginstall/include (PyPI's)
    include = next(Path(root) / d for root, dirs, _ in os.walk(home / "pg") for d in dirs
                   if (Path(root) / d).is_symlink() and "include" in (Path(root) / d).relative_to(home).parts)
    include.unlink()
    proc = run_pgllm("--dsn", cluster.dsn(), "install", "--pg-config", str(bare.pg_config))
    _assert_one_line_error(proc, "server headers not found", "apt-get install postgresql-server-dev-")
    shutil.rmtree(home, ignore_errors=True)


def _unprivileged_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", UNPRIVILEGED_USER], check=True)
        return pwd.getpwnam(UNPRIVILEGED_USER)


@pytest.mark.skipif(not is_root(), reason="runs as root to switch to an unprivileged user")
def test_embedded_server_as_an_ordinary_user(cluster):
    """The same commands work for a user who is not root: the server then runs as that user."""
    user = _unprivileged_user()
    home = make_home()
    os.chown(home, user.pw_uid, user.pw_gid)
    env = {"PGLLM_HOME": str(home), "HOME": str(home), "XDG_CACHE_HOME": str(home / "cache")}
    try:
        start = run_pgllm("server", "start", env=env, user=user.pw_name)
        assert start.returncode == 0, start.stderr
        status = run_pgllm("server", "status", "--json", env=env, user=user.pw_name)
        assert status.returncode == 0, status.stderr
        info = json.loads(status.stdout)
        assert info["running"] is True and f"{user.pw_name}@" in info["dsn"]
        assert (home / "data").stat().st_uid == user.pw_uid
        # Installing into the system's directories needs root, and says so.
        system = run_pgllm("--dsn", info["dsn"], "install", "--pg-config", shutil.which("pg_config")
                           or "/usr/lib/postgresql/15/bin/pg_config", env=env, user=user.pw_name)
        _assert_one_line_error(system, "cannot write PostgreSQL's directory")
        stop = run_pgllm("server", "stop", env=env, user=user.pw_name)
        assert stop.returncode == 0 and "stopped" in stop.stdout
    finally:
        run_pgllm("server", "stop", env=env, user=user.pw_name)
        shutil.rmtree(home, ignore_errors=True)
