"""The schema's upgrade path: a database made by pg_llm 0.1.0, updated in place, keeps every row
and behaves as before; an updated schema is a fresh one; pg_dump/pg_restore keeps what users made.

The 0.1.0 side is the real release: its sources come from git history (the commit below, where
0.1.0's install script was frozen), built and installed into a server of the test's own, so the
database is filled by 0.1.0's own library, as a user's was.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest

from pgllm.cluster import Cluster
from pgllm.installation import pg_config_values
from pgllm.extension import build_and_install, control_version, pg_config_version_num

from .conftest import EXT_VERSION, REPO, make_home, run_pgllm
from .test_security import check_privilege_table, check_search_paths

# The release 0.1.0: the last commit before 0.2.0 opened.
RELEASE_0_1_0 = "f58152086019e8d78b4bfa68f0a1d84a9f744380"
# pg_llm--0.1.0.sql as released: frozen, never edited (a fresh install runs it first).
FROZEN_0_1_0_SHA256 = "085db8fe8d820c845494e3c6c9030d22883e2199ab1587c3c816ba2618af016a"

TINY = dict(n_layer=2, n_head=2, d_model=32, n_positions=32)
PROMPT = [464, 2068, 7586, 21831, 18045, 625]
# 0.1.0's user tables, each with a key that orders its rows.
TABLES = {
    "llm_model_config": "model", "llm_param": "model, name", "llm_optim_state": "model, name",
    "llm_train_state": "model", "llm_bpe_vocab": "model, token_id", "llm_bpe_merges": "model, rank",
    "llm_dataset": "id", "llm_train_log": "model, step", "llm_checkpoint": "id",
    "llm_checkpoint_tensor": "checkpoint_id, name", "llm_tokenizer_version": "model",
}
TRAIN = "beta1 => 0.9, beta2 => 0.95, eps => 1e-8, wd => 0.0, lr_max => 1e-2, warmup => 0, batch_size => 2"


def test_frozen_script_is_unchanged():
    text = (REPO / "ext" / "sql" / "pg_llm--0.1.0.sql").read_bytes()
    assert hashlib.sha256(text).hexdigest() == FROZEN_0_1_0_SHA256, \
        "pg_llm--0.1.0.sql was released and is frozen: put schema changes into the upgrade script"


def test_upgrade_scripts_lead_to_the_control_version():
    """One install script (0.1.0), then a chain of upgrade scripts whose last target is the
    control file's default_version: PostgreSQL creates a fresh database along the same path."""
    sql = REPO / "ext" / "sql"
    installs = sorted(p.name for p in sql.glob("pg_llm--*.sql") if p.name.count("--") == 1)
    assert installs == ["pg_llm--0.1.0.sql"]
    steps = dict(re.fullmatch(r"pg_llm--(.+)--(.+)\.sql", p.name).groups() for p in sql.glob("pg_llm--*--*.sql"))
    version, path = "0.1.0", []
    while version in steps:
        version = steps[version]
        path.append(version)
    assert len(path) == len(steps), f"upgrade scripts off the path from 0.1.0: {steps}"
    assert version == control_version() == EXT_VERSION


def release_sources(commit: str) -> Path:
    """ext/ of a released commit, extracted once into the build cache (it never changes)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pgllm"
    target = cache / f"pg_llm-{commit[:12]}"
    if (target / "ext" / "Makefile").exists():
        return target / "ext"
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the 0.1.0 release comes from git history")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, "ext"], capture_output=True)
    assert archive.returncode == 0, (f"release 0.1.0 ({commit}) is not in this checkout's history "
                                     f"(a shallow clone? git fetch --unshallow): {archive.stderr.decode()}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache))
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
    try:
        tmp.rename(target)
    except OSError:  # another run got there first
        shutil.rmtree(tmp)
    return target / "ext"


@pytest.fixture(scope="module")
def old_server():
    """A server of our own with pg_llm 0.1.0's library and scripts installed."""
    old = release_sources(RELEASE_0_1_0)
    c = Cluster(make_home("pgllm-upgrade-"))
    c.start()
    try:
        if pg_config_version_num(pg_config_values(c.pg_config)) >= 160000:
            # 0.1.0 was built for 15 only (its C predates the API changes of 16-18); its scripts
            # updated by today's library are tested on every version in test_conventions.py
            pytest.skip("pg_llm 0.1.0's library does not build on PostgreSQL 16 and newer")
        # the release as it was built: make test's warnings-as-errors (COPT) are for today's code
        copt = os.environ.pop("COPT", None)
        try:
            build_and_install(c.pg_config, old)
        finally:
            if copt is not None:
                os.environ["COPT"] = copt
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.home, ignore_errors=True)


def gpt2_tokenizer_entries() -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """The bundled GPT-2 files as rows: 0.1.0 has no loader for bytes sent by a client, so the
    rows go in with COPY, as 0.1.0's pgllm tokenizer wrote them (the files are well formed)."""
    from pgllm.bundled import gpt2_tokenizer_files

    vocab_file, merges_file = gpt2_tokenizer_files()
    vocab = sorted(json.loads(vocab_file.read_text(encoding="utf-8")).items(), key=lambda kv: kv[1])
    lines = merges_file.read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    return vocab, merges


def fill(conn: psycopg.Connection) -> None:
    """Everything a 0.1.0 user could have, written with 0.1.0's own functions and columns."""
    conn.execute("CREATE EXTENSION pg_llm VERSION '0.1.0'")
    conn.execute("SELECT llm_init('tiny', %(n_layer)s, %(n_head)s, %(d_model)s, %(n_positions)s, 50257, seed => 7)", TINY)
    vocab, merges = gpt2_tokenizer_entries()
    with conn.cursor() as cur:
        with cur.copy("COPY llm_bpe_vocab (model, token_id, token) FROM STDIN") as copy:
            for token, token_id in vocab:
                copy.write_row(("tiny", token_id, token))
        with cur.copy('COPY llm_bpe_merges (model, rank, "left", "right") FROM STDIN') as copy:
            for rank, (left, right) in enumerate(merges):
                copy.write_row(("tiny", rank, left, right))
    # a short repeating text: a few steps give peaked predictions (greedy is decided by wide margins)
    ids = conn.execute("SELECT llm_encode(repeat('The quick brown fox jumps over the lazy dog. ', 20), 'tiny')").fetchone()[0]
    for start in range(0, len(ids) - 17, 16):
        conn.execute("INSERT INTO llm_dataset (tokens, target) VALUES (%s, %s)",
                     (ids[start:start + 16], ids[start + 1:start + 17]))
    conn.execute(f"SELECT llm_train('tiny', 40, {TRAIN})")
    conn.execute("SELECT llm_checkpoint_save('tiny', 'before the update')")


def rows(conn: psycopg.Connection, columns: dict[str, list[str]]) -> dict[str, str]:
    """A digest of every row of each table, over the given (0.1.0) columns."""
    out = {}
    for table, order in TABLES.items():
        cols = ", ".join(f'"{c}"' for c in columns[table])
        out[table] = conn.execute(f"SELECT count(*) || ':' || coalesce(md5(string_agg(r::text, '|' ORDER BY {order})), '') "
                                  f"FROM (SELECT {order}, ROW({cols}) AS r FROM {table}) s").fetchone()[0]
    return out


def behaviour(conn: psycopg.Connection) -> dict:
    return {
        "greedy": conn.execute("SELECT llm_generate_tokens(%s, 12, temperature => 0, model => 'tiny')", (PROMPT,)).fetchone()[0],
        "text": conn.execute("SELECT llm_generate('The quick brown', 12, temperature => 0, model => 'tiny')").fetchone()[0],
        "logits": np.array(conn.execute("SELECT llm_logits(%s, 'tiny')", (PROMPT,)).fetchone()[0]),
    }


def train_more(conn: psycopg.Connection) -> tuple[float, int, dict[str, np.ndarray]]:
    loss = conn.execute(f"SELECT llm_train('tiny', 3, {TRAIN})").fetchone()[0]
    step = conn.execute("SELECT step FROM llm_train_state WHERE model = 'tiny'").fetchone()[0]
    params = {n: np.frombuffer(d, "<f4") for n, d in conn.execute("SELECT name, data FROM llm_param WHERE model = 'tiny'")}
    return loss, step, params


def _normalise(line: str) -> str:
    if line.startswith("SELECT pg_catalog.setval("):  # a sequence's position is data
        return line.split(",")[0] + ", ...);"
    if re.search(r"binary_upgrade_|relfrozenxid|^WHERE oid = ", line):  # ids, xids, WAL positions
        return re.sub(r"\d+", "N", re.sub(r"[0-9A-F]+/[0-9A-F]+", "LSN", line))
    return re.sub(r"^\\(un)?restrict \S+$", r"\\\1restrict KEY", line)  # a random key per dump


def normalised_dump(cluster: Cluster, dbname: str, *options: str) -> list[str]:
    """pg_dump --schema-only, with only what must differ between two databases made alike
    normalised: the random \\restrict key, and (with --binary-upgrade, which dumps every object
    of the extension) object ids, transaction ids, WAL positions and sequence positions."""
    proc = subprocess.run([str(cluster.bindir / "pg_dump"), "--schema-only", *options, "-d", cluster.dsn(dbname)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [_normalise(line) for line in proc.stdout.splitlines()]


@pytest.mark.slow
def test_update_from_0_1_0(old_server):
    c = old_server
    with psycopg.connect(c.dsn("postgres"), autocommit=True) as admin:
        admin.execute("CREATE DATABASE updated")
        admin.execute("CREATE DATABASE fresh")
    with psycopg.connect(c.dsn("updated"), autocommit=True) as conn:
        fill(conn)
        assert conn.execute("SELECT pg_llm_version(), extversion FROM pg_extension WHERE extname = 'pg_llm'").fetchone() \
            == ("0.1.0", "0.1.0")
        # what training does next under 0.1.0, then back to where it was
        trained_before = train_more(conn)
        checkpoint = conn.execute("SELECT max(id) FROM llm_checkpoint").fetchone()[0]
        conn.execute("SELECT llm_checkpoint_load('tiny', %s)", (checkpoint,))
        columns = {t: [r[0] for r in conn.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass "
                                                   "AND attnum > 0 AND NOT attisdropped ORDER BY attnum", (t,))]
                   for t in TABLES}
        before, did = rows(conn, columns), behaviour(conn)

    # the new pg_llm, as a user installs it: build, install, ALTER EXTENSION pg_llm UPDATE
    proc = run_pgllm("--dsn", c.dsn("updated"), "install", "--pg-config", str(c.pg_config))
    assert proc.returncode == 0, proc.stderr
    assert f"updated extension pg_llm from 0.1.0 to {EXT_VERSION}" in proc.stdout

    with psycopg.connect(c.dsn("updated"), autocommit=True) as conn:
        assert conn.execute("SELECT pg_llm_version(), extversion FROM pg_extension WHERE extname = 'pg_llm'").fetchone() \
            == (EXT_VERSION, EXT_VERSION)
        assert rows(conn, columns) == before
        does = behaviour(conn)
        assert does["greedy"] == did["greedy"] and does["text"] == did["text"]
        # the two libraries may round differently (kernels change between versions), not more
        np.testing.assert_allclose(does["logits"], did["logits"], rtol=1e-4, atol=1e-4)
        # training continues from the same step with the same optimizer state: the same result.
        # A step moves a parameter by about lr (1e-2): lost or misread AdamW moments show at once.
        loss, step, params = train_more(conn)
        assert step == trained_before[1] == 43
        assert loss == pytest.approx(trained_before[0], rel=1e-4)
        for name, value in trained_before[2].items():
            np.testing.assert_allclose(params[name], value, rtol=1e-3, atol=1e-4, err_msg=name)
        logged = conn.execute("SELECT count(*), max(step) FROM llm_train_log WHERE model = 'tiny'").fetchone()
        assert logged == (43, 43)

    with psycopg.connect(c.dsn("fresh"), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION pg_llm")
    for options in ((), ("--binary-upgrade",)):
        updated, fresh = (normalised_dump(c, name, *options) for name in ("updated", "fresh"))
        assert updated == fresh, "\n".join(difflib.unified_diff(fresh, updated, "fresh", "updated", lineterm=""))
    # exactly as safe: every object's privileges as documented, in both
    for name in ("updated", "fresh"):
        with psycopg.connect(c.dsn(name), autocommit=True) as conn:
            check_privilege_table(conn)
            check_search_paths(conn)


def test_library_refuses_an_older_schema(cluster):
    """The new library on a database not yet updated: a clear error that says what to do."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(cluster.dsn(name), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_llm VERSION '0.1.0'")
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as e:
                conn.execute("SELECT llm_init('m', 1, 1, 8, 8, 16)")
            assert e.value.diag.message_primary == \
                f"the pg_llm library is version {EXT_VERSION} but this database has pg_llm 0.1.0"
            assert "ALTER EXTENSION pg_llm UPDATE" in e.value.diag.message_hint
        proc = run_pgllm("--dsn", cluster.dsn(name), "install")
        assert proc.returncode == 0, proc.stderr
        assert f"updated extension pg_llm from 0.1.0 to {EXT_VERSION}" in proc.stdout
        with psycopg.connect(cluster.dsn(name), autocommit=True) as conn:
            assert conn.execute("SELECT llm_init('m', 1, 1, 8, 8, 16)").fetchone()[0] > 0
    finally:
        with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("own_gpt2_small", [False, True])
def test_dump_and_restore_keep_every_model(cluster, db, conn, tmp_path, own_gpt2_small):
    """pg_dump/pg_restore into a new database: the built-in gpt2-small, or the user's own one of
    another shape, comes back with its weights, and generates the same tokens."""
    conn.execute("SELECT llm_init('tiny', 1, 2, 16, 32, 64, seed => 3)")
    if own_gpt2_small:
        conn.execute("DELETE FROM llm_model_config WHERE model = 'gpt2-small'")
        conn.execute("SELECT llm_init('gpt2-small', 2, 2, 16, 32, 64, seed => 5)")
    # an adapter trained a step: its rows reference the model's, and its log and tensors its own
    conn.execute("INSERT INTO llm_dataset (tokens, target) VALUES ('{1,2,3,4}', '{2,3,4,5}')")
    conn.execute("SELECT llm_adapter_create('tenant', 'tiny', rank => 2, targets => ARRAY['attn.c_attn', 'mlp.c_fc'])")
    conn.execute("SELECT llm_train('tiny', 1, lr_max => 1e-2, warmup => 1, batch_size => 1, adapter => 'tenant')")
    query = ("SELECT model, llm_generate_tokens('{1,2,3}', 6, temperature => 0, model => model), "
             "llm_logits('{1,2,3}', model, adapter => (SELECT a.adapter FROM llm_adapter a WHERE a.model = m.model)) "
             "FROM llm_model_config m WHERE EXISTS (SELECT 1 FROM llm_param p WHERE p.model = m.model) ORDER BY model")
    configs = "SELECT model, n_layer, n_head, d_model, n_positions, vocab, created_at FROM llm_model_config ORDER BY model"
    params = ("SELECT model, name, shape, md5(data) FROM llm_param UNION ALL SELECT adapter, name, shape, "
              "md5(data || m || v) FROM llm_adapter_param UNION ALL SELECT adapter, step::text, NULL, loss::text "
              "FROM llm_adapter_train_log ORDER BY 1, 2")
    before = [conn.execute(q).fetchall() for q in (query, configs, params)]

    dump, restored = tmp_path / "dump", f"r_{uuid.uuid4().hex[:10]}"
    proc = subprocess.run([str(cluster.bindir / "pg_dump"), "-Fc", "-f", str(dump), "-d", db], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{restored}"')
    try:
        proc = subprocess.run([str(cluster.bindir / "pg_restore"), "--exit-on-error", "-d", cluster.dsn(restored), str(dump)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        with psycopg.connect(cluster.dsn(restored), autocommit=True) as new:
            assert [new.execute(q).fetchall() for q in (query, configs, params)] == before
    finally:
        with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{restored}" WITH (FORCE)')


def test_builtin_gpt2_small_gives_way_only_while_unused(conn):
    """Inserting gpt2-small replaces the built-in registration while nothing uses it; once it has
    weights, the primary key refuses a second one as before."""
    conn.execute("INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) "
                 "VALUES ('gpt2-small', 1, 1, 8, 8, 16)")
    assert conn.execute("SELECT n_layer, d_model FROM llm_model_config WHERE model = 'gpt2-small'").fetchone() == (1, 8)
    conn.execute("DELETE FROM llm_model_config WHERE model = 'gpt2-small'")
    conn.execute("INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) "
                 "VALUES ('gpt2-small', 12, 12, 768, 1024, 50257)")
    conn.execute("INSERT INTO llm_train_state (model) VALUES ('gpt2-small')")
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) "
                     "VALUES ('gpt2-small', 1, 1, 8, 8, 16)")
