"""pgllm as users get it: an sdist, the wheel built from it, installed into a fresh virtual
environment outside the checkout with only its runtime dependencies (from PyPI; no torch, no
transformers), used from another directory to install the extension and generate text, as an
ordinary user (the embedded server) and as root (an existing server named by --dsn/--pg-config).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from pathlib import Path

import psycopg
import pytest

import pgllm
from pgllm.cluster import Cluster, is_root
from pgllm.errors import PgllmError
from pgllm.extension import check_version_supported, control_version, pg_config_version_num

from .conftest import EXT_VERSION, REPO, run_pgllm
from .test_install import _unprivileged_user
from .weights import write_gpt2_tokenizer

# What `pgllm install` needs from the package: everything PGXS builds and installs.
EXT_FILES = ["Makefile", "pg_llm.control", "sql/pg_llm--0.1.0.sql", "sql/contrib/pg_llm_plproxy.sql", "src/model/npz.h", "src/model/tensors.def",
             "src/pg_llm.c"]
TINY = ["--n-layer", "2", "--n-head", "2", "--d-model", "32", "--n-positions", "64", "--vocab", "50257", "--seed", "11"]
PROMPT = "Hello from Postgres"


def test_one_version_each():
    """pgllm's version lives in pgllm/__init__.py (pyproject reads it); the extension's in its control file."""
    assert importlib.metadata.version(pgllm.DISTRIBUTION) == pgllm.__version__
    assert control_version() == EXT_VERSION


def test_the_distribution_name_is_ours():
    """pyproject's name is DISTRIBUTION (what hints tell users to install), not PyPI's other pgllm."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == pgllm.DISTRIBUTION == "pgllm-gpt2"
    assert project["scripts"] == {"pgllm": "pgllm.cli:main"}
    assert (REPO / "LICENSE").read_text().startswith("MIT License") and project["license"] == "MIT"


def test_servers_older_than_15_are_refused():
    with pytest.raises(PgllmError, match="the server is PostgreSQL 14; pg_llm needs PostgreSQL 15 or newer"):
        check_version_supported(140011, "the server")
    with pytest.raises(PgllmError, match="is PostgreSQL 9.6; pg_llm needs"):
        check_version_supported(90624, "the server")
    check_version_supported(150018, "the server")
    check_version_supported(180000, "the server")
    assert pg_config_version_num({"version": "PostgreSQL 15.18 (Debian 15.18-0+deb12u1)"}) == 150018
    assert pg_config_version_num({"version": "PostgreSQL 9.6.24"}) == 90624
    assert pg_config_version_num({"version": "PostgreSQL 18beta1"}) == 180000


def test_version_reports_the_database(cluster, dsn):
    proc = run_pgllm("--dsn", dsn, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"pgllm {pgllm.__version__} (carries pg_llm {EXT_VERSION})",
                                        f"pg_llm in the database: {EXT_VERSION} in {dsn}"]
    proc = run_pgllm("--version", "--dsn", "postgresql://nobody@127.0.0.1:1/x")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].startswith("pg_llm in the database: unknown, cannot connect to")


@pytest.fixture(scope="module")
def wheel_venv():
    """sdist -> wheel (as `python -m build` does: the wheel is proof that the sdist is complete)
    -> a fresh venv in /tmp holding pgllm and its runtime dependencies only."""
    work = Path(tempfile.mkdtemp(prefix="pgllm-release-", dir="/tmp"))
    work.chmod(0o755)
    try:
        dist = work / "dist"
        subprocess.run([sys.executable, "-c", "import sys; from setuptools.build_meta import build_sdist; "
                        "build_sdist(sys.argv[1])", str(dist)], cwd=REPO, check=True, capture_output=True)
        sdist = next(dist.glob("pgllm_gpt2-*.tar.gz"))
        with tarfile.open(sdist) as t:
            names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
        assert {f"ext/{f}" for f in EXT_FILES} <= names
        pip = [str(Path(sys.executable).parent / "pip"), "--disable-pip-version-check", "-q"]
        proc = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(sdist)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        wheel = next(dist.glob("pgllm_gpt2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            assert {f"pgllm/ext/{f}" for f in EXT_FILES} <= set(z.namelist())
        # a plain venv on the system's interpreter (every OS user can run it), filled by our pip
        base = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys._base_executable
        venv = work / "venv"
        subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
        proc = subprocess.run(pip + ["--python", str(venv / "bin" / "python"), "install", str(wheel)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        yield venv
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(venv: Path, *args: str, cwd: Path, env: dict, user: str | None = None) -> subprocess.CompletedProcess:
    """The venv's pgllm, from `cwd`, as `user` (or as ourselves) with only `env` added."""
    argv = [str(venv / "bin" / "pgllm"), *args]
    if user is not None:
        argv = ["runuser", "-u", user, "--", "env", *(f"{k}={v}" for k, v in env.items()), *argv]
        return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=600)
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=600, env={**os.environ, **env})


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


@pytest.mark.slow
def test_wheel_installs_anywhere(wheel_venv, conn):
    venv = wheel_venv
    site = next((venv / "lib").glob("python*/site-packages"))
    assert not (site / "torch").exists() and not (site / "transformers").exists()
    user = _unprivileged_user() if is_root() else None
    home = Path(tempfile.mkdtemp(prefix="pgllm-user-", dir="/tmp"))
    home.chmod(0o755)
    if user is not None:
        os.chown(home, user.pw_uid, user.pw_gid)
    # nothing of ours in the environment: the user's own home, cache and embedded server
    env = {"HOME": str(home), "PGLLM_HOME": str(home / "pgllm"), "XDG_CACHE_HOME": str(home / "cache"),
           "PATH": "/usr/local/bin:/usr/bin:/bin"}
    name = user.pw_name if user else None
    try:
        proc = run(venv, "install", cwd=home, env=env, user=name)
        assert proc.returncode == 0, proc.stderr
        assert f"building pg_llm {EXT_VERSION} from {site / 'pgllm' / 'ext'}" in proc.stdout
        assert f"created extension pg_llm {EXT_VERSION}" in proc.stdout
        for args in (["init", "tiny", *TINY], ["tokenizer", "--model", "tiny"]):
            proc = run(venv, *args, cwd=home, env=env, user=name)
            assert proc.returncode == 0, proc.stderr
        proc = run(venv, "generate", PROMPT, "--model", "tiny", "--max-tokens", "8", "--temperature", "0",
                   "--no-stream", cwd=home, env=env, user=name)
        assert proc.returncode == 0, proc.stderr
        # the same model, made by the checkout's build in the suite's server, says the same
        conn.execute("SELECT llm_init('tiny', 2, 2, 32, 64, 50257, seed => 11)")
        write_gpt2_tokenizer(conn, "tiny")
        want = conn.execute("SELECT llm_generate(%s, 8, temperature => 0, model => 'tiny')", (PROMPT,)).fetchone()[0]
        assert proc.stdout.rstrip("\n") == want and want.strip()

        proc = run(venv, "--version", cwd=home, env=env, user=name)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"pgllm {pgllm.__version__} (carries pg_llm {EXT_VERSION})\n"
                                      f"pg_llm in the database: {EXT_VERSION} in ")

        # the optional dependencies, absent here: one line each, naming the package and the extra
        (home / "corpus.txt").write_text("Some text.\n")
        (home / "model.safetensors").write_bytes(b"")
        for args, needle in [
            (["convert", "gpt2"], "pgllm convert gpt2 needs transformers and torch: pip install 'pgllm-gpt2[convert]'"),
            (["convert", "model.safetensors"], "needs safetensors: pip install 'pgllm-gpt2[convert]'"),
            (["dataset", "--input", "corpus.txt", "--model", "tiny", "--tokenizer", "gpt2"],
             "pgllm dataset --tokenizer gpt2|DIR needs transformers: pip install 'pgllm-gpt2[convert]'"),
            (["tokenizer", "--model", "tiny", "--train", "SELECT 'x'", "--truncate"],
             "pgllm tokenizer --train needs tokenizers: pip install 'pgllm-gpt2[tokenizer]'"),
            (["log", "--model", "tiny", "--png", "loss.png"],
             "pgllm log --png needs matplotlib: pip install 'pgllm-gpt2[plot]'"),
        ]:
            assert needle in one_error_line(run(venv, *args, cwd=home, env=env, user=name)), args

        if user is not None:
            # root, from elsewhere, installing into an existing server: its DSN and its pg_config
            # (the user's build folder is reused: nothing is compiled twice)
            status = run(venv, "server", "status", "--json", cwd=home, env=env, user=name)
            proc = run(venv, "--dsn", json.loads(status.stdout)["dsn"], "install",
                       "--pg-config", str(Cluster(home / "pgllm").pg_config), cwd=Path("/"),
                       env={"XDG_CACHE_HOME": str(home / "cache")})
            assert proc.returncode == 0, proc.stderr
            assert f"extension pg_llm {EXT_VERSION} is up to date" in proc.stdout
    finally:
        run(venv, "server", "stop", cwd=home, env=env, user=name)
        shutil.rmtree(home, ignore_errors=True)


def lowest_declared(requirements: list[str]) -> list[str]:
    """Each `name>=X` of pyproject's dependencies as `name==X` (pins stay as they are)."""
    return [r.replace(">=", "==") if ">=" in r else r for r in requirements]


@pytest.mark.slow
def test_lowest_declared_versions(wheel_venv, cluster, tmp_path):
    """pyproject's lower bounds are versions that work: a fresh venv with exactly them (from PyPI),
    the wheel beside them, every command's --help, a usage error, and a model's whole round of
    init, tokenizer, dataset, train (progress notices), eval, generate and models rm."""
    pins = lowest_declared(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    assert "typer==0.16" in pins and "psycopg[binary]==3.1.4" in pins
    venv = tmp_path / "venv"
    base = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys._base_executable
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = [str(Path(sys.executable).parent / "pip"), "--disable-pip-version-check", "-q",
           "--python", str(venv / "bin" / "python"), "install"]
    proc = subprocess.run(pip + pins, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    wheel = next(wheel_venv.parent.glob("dist/pgllm_gpt2-*.whl"))
    proc = subprocess.run(pip + ["--no-deps", str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    freeze = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True, text=True)
    installed = dict(line.split("==") for line in freeze.stdout.split() if "==" in line) if freeze.returncode == 0 \
        else {}
    for pin in pins:
        name, _, version = pin.partition("==")
        name = name.split("[")[0]
        if installed:
            assert installed.get(name) == version, (name, installed.get(name))

    def pgllm(*args):
        return subprocess.run([str(venv / "bin" / "pgllm"), *args], capture_output=True, text=True, timeout=600,
                              cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path)})

    for command in ([], ["install"], ["server", "start"], ["convert"], ["init"], ["import"], ["export"],
                    ["checkpoint", "load"], ["tokenizer"], ["dataset"], ["train"], ["log"], ["eval"], ["models"],
                    ["models", "rm"], ["generate"], ["grant"], ["quantize"]):
        proc = pgllm(*command, "--help")
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (command, proc.stderr)
    proc = pgllm("train", "--steps", "x")
    assert proc.returncode == 2 and proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1
    dsn = cluster.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT llm_model_drop(model) FROM llm_model_config WHERE model = 'low'")
    steps = [["init", "low", "--n-layer", "1", "--n-head", "2", "--d-model", "32", "--n-positions", "32",
              "--vocab", "50257"],
             ["tokenizer", "--model", "low"],
             ["dataset", "--model", "low", "--query", "SELECT repeat('Hello from Postgres. ', 40)", "--dataset", "low",
              "--truncate"],
             ["train", "--model", "low", "--steps", "2", "--batch-size", "1", "--dataset", "low"],
             ["eval", "low", "--dataset", "low"],
             ["generate", "Hello", "--model", "low", "-n", "4", "-t", "0"],
             ["dataset", "--drop", "low"],
             ["models", "rm", "low"]]
    for args in steps:
        proc = pgllm("--dsn", dsn, *args)
        assert proc.returncode == 0, (args, proc.stderr)
