"""Several PostgreSQL servers on this machine, and the proxies in front of them, for the scale-out
tests (tests/test_scaleout.py) and benchmark (bench/scaleout.py).

One temporary directory holds them all. The primary is pgllm's own embedded cluster (its private
installation tree, with pg_llm built and installed into it); every other server runs from the same
tree: hot standbys made by pg_basebackup -R, and independent servers made by initdb (a serving
server with data of its own, for logical replication). Each server has its own data directory and
socket directory and listens on the socket only, so they may all use one port number. pgpool-II and
PgBouncer listen on 127.0.0.1, on free ports. When we are root, servers and proxies run as the
server's OS user (PostgreSQL, pgpool and PgBouncer refuse root), which can reach every socket.

Everything waits for states (a server accepting connections, a standby streaming, a proxy
answering), never for a fixed time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from pgllm.cluster import Cluster, is_root
from pgllm.extension import build_and_install, create_or_update

PGPOOL = shutil.which("pgpool") or "/usr/sbin/pgpool"
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
STATE_TIMEOUT = 300  # seconds: a guard against a hang, never a speed requirement

# The primary's settings: logical decoding (for logical replication) implies replica, so hot
# standbys stream from it too; function statistics count where calls ran.
PRIMARY_SETTINGS = {
    "wal_level": "logical",
    "max_wal_senders": "16",
    "max_replication_slots": "16",
    "hot_standby": "on",
    "track_functions": "'all'",
    "max_connections": "100",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float = STATE_TIMEOUT):
    """check() until it returns something true; its value. AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@dataclass
class Node:
    """One PostgreSQL server: its data directory, socket directory and name (cluster_name)."""
    name: str
    data: Path
    run: Path
    port: int
    role: str
    tcp_port: int | None = None

    def dsn(self, dbname: str = "pgllm", **params) -> str:
        extra = "".join(f"&{k}={v}" for k, v in params.items())
        return f"postgresql://{self.role}@/{dbname}?host={self.run}&port={self.port}{extra}"

    def libpq(self, dbname: str = "pgllm", options: str | None = None) -> str:
        """key=value form, for connection strings inside the server (PL/Proxy, subscriptions);
        options: server settings for the session ('-c name=value ...')."""
        extra = f" options='{options}'" if options else ""
        return f"host={self.run} port={self.port} dbname={dbname} user={self.role}{extra}"

    def connect(self, dbname: str = "pgllm", **kwargs) -> psycopg.Connection:
        return psycopg.connect(self.dsn(dbname), autocommit=kwargs.pop("autocommit", True), **kwargs)


@dataclass
class Proxy:
    """A pgpool-II or PgBouncer process on 127.0.0.1:port."""
    process: subprocess.Popen
    port: int
    log: Path
    role: str
    stop_signal: int = signal.SIGTERM

    def dsn(self, dbname: str = "pgllm", **params) -> str:
        extra = "".join(f"&{k}={v}" for k, v in params.items())
        return f"postgresql://{self.role}@127.0.0.1:{self.port}/{dbname}?connect_timeout=10{extra}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Topology:
    home: Path = field(default_factory=lambda: _make_home())
    nodes: dict[str, Node] = field(default_factory=dict)
    proxies: list[Proxy] = field(default_factory=list)

    def __post_init__(self):
        self.cluster = Cluster(self.home)

    # ---- servers ------------------------------------------------------------------------------
    @property
    def primary(self) -> Node:
        return self.nodes["primary"]

    def start_primary(self, settings: dict[str, str] | None = None) -> Node:
        """pgllm's cluster in this home, pg_llm built and installed in its tree and created."""
        c = self.cluster
        c.init()
        self._settings(c.data, {**PRIMARY_SETTINGS, "cluster_name": "'primary'", **(settings or {})})
        c.start()
        build_and_install(c.pg_config)
        with psycopg.connect(c.dsn(), autocommit=True) as conn:
            create_or_update(conn)
        node = Node("primary", c.data, c.run_dir, c.port, c.role)
        self.nodes["primary"] = node
        return node

    def add_standby(self, name: str) -> Node:
        """A hot standby of the primary (pg_basebackup -R), streaming under application_name `name`
        from a replication slot of that name (so that the primary keeps the WAL it has not had)."""
        p = self.primary
        data, run = self._own_dir(name), self._own_dir(f"{name}-run")
        self._run([str(self.cluster.bindir / "pg_basebackup"), "-D", str(data), "-R", "-C", "-S", name,
                   "-X", "stream", "-c", "fast", "-h", str(p.run), "-p", str(p.port), "-U", p.role])
        self._settings(data, {"unix_socket_directories": f"'{run}'", "cluster_name": f"'{name}'", "hot_standby": "on",
                              "synchronous_standby_names": "''"})
        node = self._start(Node(name, data, run, p.port, p.role))
        with p.connect() as conn:
            wait_for(f"{name} streaming from the primary", lambda: conn.execute(
                "SELECT 1 FROM pg_stat_replication WHERE application_name = %s AND state = 'streaming'",
                (name,)).fetchone())
        return node

    def add_server(self, name: str, settings: dict[str, str] | None = None) -> Node:
        """An independent server (initdb) running pg_llm, with a database pgllm."""
        c = self.cluster
        data, run = self._own_dir(name), self._own_dir(f"{name}-run")
        self._run([str(c.bindir / "initdb"), "-D", str(data), "-U", c.role, "-E", "UTF8", "--locale=C.UTF-8",
                   "--auth-local=trust", "--auth-host=scram-sha-256"])
        with open(data / "postgresql.conf", "a") as f:
            f.write("\ninclude_if_exists = 'pgllm.conf'\n")
        base = dict(c.settings())
        base.update({"unix_socket_directories": f"'{run}'", "cluster_name": f"'{name}'", "track_functions": "'all'",
                     "listen_addresses": "''"})
        (data / "pgllm.conf").write_text("")
        self._settings(data, {**base, **(settings or {})})
        node = self._start(Node(name, data, run, self.primary.port, c.role))
        with node.connect("postgres") as conn:
            conn.execute("CREATE DATABASE pgllm")
        with node.connect() as conn:
            conn.execute("CREATE EXTENSION pg_llm")
        return node

    def wait_for_replay(self, *standbys: Node) -> None:
        """Until every standby has replayed what the primary has written so far."""
        with self.primary.connect() as p:
            lsn = p.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        for s in standbys:
            with s.connect() as conn:
                wait_for(f"{s.name} to replay {lsn}", lambda: conn.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0])

    # ---- proxies ------------------------------------------------------------------------------
    def start_pgpool(self, backends: list[Node], weights: list[float], extra: dict[str, str] | None = None) -> Proxy:
        """pgpool-II in streaming-replication mode with load balancing over `backends` (node 0 the
        primary), each SELECT balanced on its own (statement_level_load_balance)."""
        d = self._own_dir("pgpool")
        port, pcp_port = free_port(), free_port()
        settings = {
            "backend_clustering_mode": "'streaming_replication'",
            "listen_addresses": "'127.0.0.1'", "port": str(port), "socket_dir": f"'{d}'",
            "pcp_listen_addresses": "''", "pcp_port": str(pcp_port), "pcp_socket_dir": f"'{d}'",
            "pid_file_name": f"'{d}/pgpool.pid'", "logdir": f"'{d}'",
            "enable_pool_hba": "off", "pool_passwd": "''", "allow_clear_text_frontend_auth": "off",
            "num_init_children": "8", "max_pool": "2", "child_life_time": "0", "connection_life_time": "0",
            "load_balance_mode": "on", "statement_level_load_balance": "on",
            "sr_check_period": "0", "sr_check_user": f"'{self.primary.role}'", "sr_check_database": "'pgllm'",
            "health_check_period": "0", "failover_on_backend_error": "off", "use_watchdog": "off",
            "log_min_messages": "'warning'",
        }
        for i, (node, weight) in enumerate(zip(backends, weights)):
            settings.update({f"backend_hostname{i}": f"'{node.run}'", f"backend_port{i}": str(node.port),
                             f"backend_weight{i}": str(weight), f"backend_flag{i}": "'DISALLOW_TO_FAILOVER'",
                             f"backend_application_name{i}": f"'{node.name}'"})
        settings.update(extra or {})
        conf = d / "pgpool.conf"
        conf.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        (d / "pcp.conf").write_text("")
        (d / "pool_hba.conf").write_text("")
        self._chown(conf, d / "pcp.conf", d / "pool_hba.conf")
        proxy = self._spawn([PGPOOL, "-n", "-f", str(conf), "-F", str(d / "pcp.conf"), "-a", str(d / "pool_hba.conf")],
                            d / "pgpool.log", port)
        proxy.stop_signal = signal.SIGINT  # fast shutdown (SIGTERM waits for every client to leave)
        return proxy

    def start_pgbouncer(self, databases: dict[str, Node]) -> Proxy:
        """PgBouncer in transaction pooling mode, one server connection per database: each entry of
        `databases` a name clients connect to, for the database pgllm of that node."""
        d = self._own_dir("pgbouncer")
        port = free_port()
        entries = "".join(f"{name} = host={n.run} port={n.port} dbname=pgllm user={n.role}\n"
                          for name, n in databases.items())
        ini = d / "pgbouncer.ini"
        ini.write_text(f"""[databases]
{entries}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = 1
max_client_conn = 50
ignore_startup_parameters = extra_float_digits,options
server_reset_query =
""")
        self._chown(ini)
        return self._spawn([PGBOUNCER, str(ini)], d / "pgbouncer.log", port)  # SIGTERM: immediate shutdown

    # ---- the end ------------------------------------------------------------------------------
    def stop(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        # immediate: the data is thrown away, no shutdown checkpoint is worth waiting for
        pg_ctl = str(self.cluster.bindir / "pg_ctl")
        for node in reversed(list(self.nodes.values())):
            if (node.data / "postmaster.pid").exists():
                subprocess.run(self._as_server([pg_ctl, "-D", str(node.data), "-m", "immediate", "-w", "stop"]),
                               capture_output=True)
        if self.cluster.running():  # started, but failed before it was recorded as a node
            self.cluster.stop()
        # removed in the background: hundreds of megabytes of data directories take seconds
        subprocess.Popen(["rm", "-rf", str(self.home)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)

    # ---- helpers ------------------------------------------------------------------------------
    def _as_server(self, argv: list[str]) -> list[str]:
        return self.cluster._as_server_user(argv)

    def _run(self, argv: list[str]) -> None:
        proc = subprocess.run(self._as_server(argv), capture_output=True, text=True, timeout=STATE_TIMEOUT)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def _chown(self, *paths: Path) -> None:
        if is_root():
            user = self.cluster.server_user
            for path in paths:
                os.chown(path, user.pw_uid, user.pw_gid)

    def _own_dir(self, name: str) -> Path:
        path = self.home / name
        path.mkdir(mode=0o700, exist_ok=True)
        self._chown(path)
        return path

    def _settings(self, data: Path, settings: dict[str, str]) -> None:
        """Settings in the server's pgllm.conf (included by its postgresql.conf), replacing old values."""
        conf = data / "pgllm.conf"
        current = {}
        for line in conf.read_text().splitlines() if conf.exists() else []:
            if "=" in line:
                k, v = line.split("=", 1)
                current[k.strip()] = v.strip()
        current.update(settings)
        conf.write_text("".join(f"{k} = {v}\n" for k, v in current.items()))
        self._chown(conf)

    def _start(self, node: Node) -> Node:
        self._run([str(self.cluster.bindir / "pg_ctl"), "-D", str(node.data), "-l", str(node.run / "postgresql.log"),
                   "-w", "-t", str(STATE_TIMEOUT), "start"])
        self.nodes[node.name] = node
        return node

    def _spawn(self, argv: list[str], log_path: Path, port: int) -> Proxy:
        log = open(log_path, "w+")
        # as the server's OS user without runuser in between, so that a signal reaches the proxy itself
        user = self.cluster.server_user if is_root() else None
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                **({"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}))
        proxy = Proxy(proc, port, log_path, self.primary.role)
        self.proxies.append(proxy)

        def answers():
            assert proc.poll() is None, f"{argv[0]} exited with {proc.returncode}: {log_path.read_text()}"
            try:
                psycopg.connect(proxy.dsn(next(iter(_dbnames(argv)), "pgllm")), connect_timeout=5).close()
                return True
            except psycopg.OperationalError:
                return False
        wait_for(f"{argv[0]} to accept connections", answers)
        return proxy


def _dbnames(argv: list[str]) -> list[str]:
    """The databases a PgBouncer's ini names (pgpool: none, it serves pgllm)."""
    if not argv[-1].endswith(".ini"):
        return []
    text = Path(argv[-1]).read_text().split("[pgbouncer]")[0]
    return [line.split("=")[0].strip() for line in text.splitlines()[1:] if "=" in line]


def _make_home(prefix: str = "pgllm-scaleout-") -> Path:
    """A temporary directory that the postgres OS user can reach when we are root."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(home, 0o755)
    return home
