"""Serving through PgBouncer in transaction pooling mode (Debian's pgbouncer, started here).

One server connection serves every client (default_pool_size = 1), so consecutive transactions
of two clients interleave on it and no session state survives between them: what works here
needs none. PGLLMClient runs each call as one transaction (a stream too: it is one statement read
row by row, not a server-side cursor) and never prepares statements on the server, which
PgBouncer before 1.21 cannot follow across server connections. Leaving a stream early cancels
its query through PgBouncer.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid

import psycopg
import pytest

from pg_llm_client import PGLLMClient
from pgllm.cluster import is_root

from .conftest import make_home
from .weights import random_gpt2, store_hf_model, write_gpt2_tokenizer

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
EOT = 50256
TEXT = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257, initializer_range=0.1)

pytestmark = pytest.mark.skipif(not os.path.exists(PGBOUNCER), reason="pgbouncer is not installed "
                                "(apt-get install pgbouncer)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bouncer(cluster):
    """PgBouncer on 127.0.0.1, transaction pooling, one server connection; yields its DSN."""
    home = make_home("pgllm-pgbouncer-")
    port = free_port()
    ini = home / "pgbouncer.ini"
    ini.write_text(f"""[databases]
* = host={cluster.run_dir} port={cluster.port} user={cluster.role}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = 1
max_client_conn = 20
ignore_startup_parameters = extra_float_digits,options
server_reset_query =
""")
    argv = [PGBOUNCER, str(ini)]
    if is_root():  # PgBouncer refuses to run as root; the server's OS user reaches its socket
        argv = ["runuser", "-u", cluster.server_user.pw_name, "--"] + argv
    log = open(home / "pgbouncer.log", "w+")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    dsn = f"postgresql://{cluster.role}@127.0.0.1:{port}/pgllm"
    try:
        deadline = time.monotonic() + 120  # a guard against a hang, not a speed requirement
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"pgbouncer exited with {proc.returncode}: {log.read()}")
            try:
                psycopg.connect(dsn, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield dsn
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def model(dsn):
    name = f"bouncer-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as c:
        store_hf_model(c, name, random_gpt2(41, bos_token_id=EOT, eos_token_id=EOT, **TEXT))
        write_gpt2_tokenizer(c, name)
    yield name
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DELETE FROM llm_model_config WHERE model = %s", (name,))
        c.execute("DELETE FROM llm_bpe_merges WHERE model = %s", (name,))
        c.execute("DELETE FROM llm_bpe_vocab WHERE model = %s", (name,))


@pytest.mark.parametrize("autocommit", [False, True])
def test_client_through_transaction_pooling(dsn, bouncer, model, autocommit):
    prompts = ["Hello", "Pooled connections", "PostgreSQL é 漢字 🐘"]
    with psycopg.connect(dsn, autocommit=True) as direct:
        alone = PGLLMClient(direct, model=model)
        texts = [alone.generate(p, max_tokens=8, seed=3) for p in prompts]
        events = list(alone.stream("Hello", max_tokens=6, temperature=0))
        beams = alone.beam_search("Hello", beam_width=2, max_tokens=5)
        logits = direct.execute("SELECT llm_logits('{1,2,3}', %s)", (model,)).fetchone()[0]

    with psycopg.connect(bouncer, autocommit=autocommit) as a, psycopg.connect(bouncer, autocommit=autocommit) as b:
        clients = [PGLLMClient(a, model=model), PGLLMClient(b, model=model)]
        for i in range(12):  # each client past psycopg's prepare threshold (5), the two taking turns
            c = clients[i % 2]
            assert c.generate(prompts[i % 3], max_tokens=8, seed=3) == texts[i % 3]
            assert list(c.stream("Hello", max_tokens=6, temperature=0)) == events
            assert c.beam_search("Hello", beam_width=2, max_tokens=5) == beams
            assert c.generate_batch(prompts, max_tokens=8, seed=3) == texts
            conn = (a, b)[i % 2]
            assert conn.execute("SELECT llm_logits('{1,2,3}', %s)", (model,), prepare=False).fetchone()[0] == logits
            if not autocommit:
                conn.commit()  # your own statement's transaction: left open, it holds the one server connection
        for event in clients[0].stream("Hello", max_tokens=100, temperature=0):
            break  # left early: the query is cancelled through PgBouncer
        assert clients[0].generate("Hello", max_tokens=8, seed=3) == texts[0]
        assert clients[1].generate("Hello", max_tokens=8, seed=3) == texts[0]


def test_cli_through_pgbouncer(cli, dsn, bouncer, model, tmp_path):
    with psycopg.connect(dsn, autocommit=True) as direct:
        expected = PGLLMClient(direct, model=model).generate("Hello", max_tokens=8, seed=5)
    for mode in ("--stream", "--no-stream"):
        out = cli("--dsn", bouncer, "generate", "Hello", "-m", model, "-n", "8", "--seed", "5", mode)
        assert out.exit_code == 0, out.output
        assert out.stdout == expected + "\n"
    f = tmp_path / "prompts.txt"
    f.write_text("Hello\nHello\n")
    out = cli("--dsn", bouncer, "generate", "--input", str(f), "-m", model, "-n", "8", "--seed", "5")
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines() == [expected.replace("\n", "\\n")] * 2
