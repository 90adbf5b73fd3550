"""Serving from a hot standby: a model imported on the primary generates the same text on a
streaming-replication standby, since nothing the inference functions do writes.

The test starts both servers itself: a primary (pgllm's embedded cluster in a temporary
PGLLM_HOME, with pg_llm installed into its tree) and a standby made by pg_basebackup -R, with its
own data directory and socket directory, run from the same binaries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

import psycopg
import pytest

from pgllm.cluster import Cluster, is_root
from pgllm.extension import build_and_install, create_or_update

from .conftest import make_home
from .weights import random_gpt2, store_hf_model, write_gpt2_tokenizer

TEXT = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257, initializer_range=0.1)


def own_dir(cluster: Cluster, path) -> None:
    """A directory the server's OS user owns (it is not us when we are root)."""
    path.mkdir(mode=0o700, exist_ok=True)
    if is_root():
        user = cluster.server_user
        os.chown(path, user.pw_uid, user.pw_gid)


def run_as_server(cluster: Cluster, argv: list[str]) -> None:
    proc = subprocess.run(cluster._as_server_user(argv), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def primary_and_standby():
    home = make_home("pgllm-primary-")
    primary = Cluster(home)
    standby_data, standby_run = home / "standby", home / "standby-run"
    pg_ctl = None
    try:
        primary.start()
        build_and_install(primary.pg_config)
        with psycopg.connect(primary.dsn(), autocommit=True) as conn:
            create_or_update(conn)
        pg_ctl = str(primary.bindir / "pg_ctl")

        own_dir(primary, standby_data)
        own_dir(primary, standby_run)
        run_as_server(primary, [str(primary.bindir / "pg_basebackup"), "-D", str(standby_data), "-R",
                                "-X", "stream", "-c", "fast", "-h", str(primary.run_dir), "-p", str(primary.port),
                                "-U", primary.role])
        # The base backup copied the primary's settings: the standby gets its own socket directory.
        conf = standby_data / "pgllm.conf"
        conf.write_text(conf.read_text().replace(str(primary.run_dir), str(standby_run)) + "hot_standby = on\n")
        run_as_server(primary, [pg_ctl, "-D", str(standby_data), "-l", str(standby_run / "postgresql.log"), "-w", "-t", "120",
                                "start"])
        standby_dsn = f"postgresql://{primary.role}@/pgllm?host={standby_run}&port={primary.port}"
        yield primary.dsn(), standby_dsn
    finally:
        if pg_ctl and (standby_data / "postmaster.pid").exists():
            subprocess.run(primary._as_server_user([pg_ctl, "-D", str(standby_data), "-m", "fast", "-w", "stop"]),
                           capture_output=True)
        primary.stop()
        shutil.rmtree(home, ignore_errors=True)


def wait_for_replay(primary: psycopg.Connection, standby: psycopg.Connection, timeout: float = 120) -> None:
    lsn = primary.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    deadline = time.monotonic() + timeout
    while standby.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0] is not True:
        assert time.monotonic() < deadline, "the standby did not replay the import"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_model_imported_on_the_primary_generates_the_same_text_on_the_standby(primary_and_standby):
    primary_dsn, standby_dsn = primary_and_standby
    name = f"replicated-{uuid.uuid4().hex[:6]}"
    with psycopg.connect(primary_dsn, autocommit=True) as p, psycopg.connect(standby_dsn, autocommit=True) as s:
        assert s.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
        store_hf_model(p, name, random_gpt2(7, **TEXT))
        write_gpt2_tokenizer(p, name)
        p.execute("INSERT INTO llm_dataset (dataset, tokens, target) VALUES (%s, '{1,2,3,4}', '{2,3,4,5}')", (name,))
        wait_for_replay(p, s)

        queries = [
            ("SELECT llm_generate('Hello from the primary', 24, 0, model => %s)", (name,)),
            ("SELECT llm_generate('Seeded', 24, 0.9, 40, 0.9, %s, 7)", (name,)),
            ("SELECT llm_logits(llm_encode('Some logits', %s), %s)", (name, name)),
            ("SELECT array_agg(token_ids::text ORDER BY rank) FROM llm_beam_search('Beam me', 3, 8, %s)", (name,)),
            ("SELECT string_agg((e).token, '') FROM (SELECT llm_generate_stream('Stream', 16, 0, model => %s) e) x",
             (name,)),
            ("SELECT array_agg(text ORDER BY ord) FROM llm_generate_batch('{Hello,Batch,a}', 12, 0.9, 40, 0.9, %s, 7)",
             (name,)),
            # measuring writes nothing either
            ("SELECT loss FROM llm_eval(%s, %s)", (name, name)),
            ("SELECT llm_perplexity('Perplexity on a standby', %s)", (name,)),
            ("SELECT llm_embed('Embeddings on a standby', %s)", (name,)),
        ]
        on_primary = [p.execute(q, a).fetchone()[0] for q, a in queries]
        on_standby = [s.execute(q, a).fetchone()[0] for q, a in queries]
        assert on_standby == on_primary
        assert on_primary[0] and len(on_primary[2]) == 50257
        assert s.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
        # the standby's generations go through a batch runner of its own (continuous batching);
        # a stream left open in a cursor keeps each runner from exiting while it is looked at
        runners = "SELECT pid FROM pg_llm_batch_runners() WHERE model = %s"
        held = "DECLARE held CURSOR FOR SELECT (llm_generate_stream('Held', 8, 0, model => %s)).token"
        with psycopg.connect(primary_dsn) as ph, psycopg.connect(standby_dsn) as sh:
            for c in (ph, sh):
                c.execute(held, (name,))
                c.execute("FETCH 1 FROM held")
            [(standby_runner,)] = s.execute(runners, (name,)).fetchall()
            [(primary_runner,)] = p.execute(runners, (name,)).fetchall()
            assert standby_runner != primary_runner


@pytest.mark.slow
def test_the_standby_serves_from_its_own_shared_copy(primary_and_standby):
    """A standby builds its copy from its replicated tables, in its own data directory, shares it
    between its backends, and replaces it when a new version is replayed."""
    primary_dsn, standby_dsn = primary_and_standby
    name = f"standby-cache-{uuid.uuid4().hex[:6]}"
    copies = "SELECT weights_version, path, backends FROM pg_llm_weight_cache() WHERE model = %s"
    logits = "SELECT llm_logits('{1,2,3}', %s)"
    with psycopg.connect(primary_dsn, autocommit=True) as p, psycopg.connect(standby_dsn, autocommit=True) as s1, \
            psycopg.connect(standby_dsn, autocommit=True) as s2:
        store_hf_model(p, name, random_gpt2(8, **TEXT))
        wait_for_replay(p, s1)
        on_primary = p.execute(logits, (name,)).fetchone()[0]
        assert s1.execute(logits, (name,)).fetchone()[0] == s2.execute(logits, (name,)).fetchone()[0] == on_primary
        [(version, path, backends)] = s1.execute(copies, (name,)).fetchall()
        assert backends == 2
        standby_data = s1.execute("SHOW data_directory").fetchone()[0]
        primary_data = p.execute("SHOW data_directory").fetchone()[0]
        assert os.stat(os.path.join(standby_data, path)).st_ino != os.stat(os.path.join(primary_data, path)).st_ino

        p.execute("UPDATE llm_param SET data = decode(repeat('0000003f', 64), 'hex') "
                  "WHERE model = %s AND name = 'ln_f.bias'", (name,))
        wait_for_replay(p, s1)
        changed = p.execute(logits, (name,)).fetchone()[0]
        assert changed != on_primary and s1.execute(logits, (name,)).fetchone()[0] == changed
        [(new_version, new_path, _)] = s1.execute(copies, (name,)).fetchall()
        assert new_version > version and not os.path.exists(os.path.join(standby_data, path))
