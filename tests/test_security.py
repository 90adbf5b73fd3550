"""Security (issue 22): no role escalates, crashes the server, reads what it may not, or loses
another's training, tested as an attacker with a login role would try it.

Each defect of the review has a test here that fails on the code before its fix: the privilege
table (docs/deployment.md) against what roles really have; trigger functions attached to other
tables; a queued llm_train; serving under privileges and row-level security; the training lock;
stale notes of a failed statement; what the batch runner reserves and who sizes it; the lists of
shared copies and runners; a temperature that rounds to 0; a cancel while a runner starts; and
training that diverges.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import uuid
from pathlib import Path

import psycopg
import pytest

from .conftest import REPO
from .test_batch import cancel_until_ended
from .test_harden import make_model, wait_for
from .weights import write_gpt2_tokenizer

PRECISIONS = ("float32", "bfloat16", "int8")


@pytest.fixture
def roles(conn):
    """Login roles made for one test, dropped after it: new_role(kind) with kind none, serve or train."""
    made = []

    def new_role(kind: str = "none") -> str:
        role = f"sec_{kind}_{uuid.uuid4().hex[:8]}"
        conn.execute(f"CREATE ROLE {role} LOGIN")
        if kind != "none":
            conn.execute("SELECT llm_grant(%s, train => %s)", (role, kind == "train"))
        made.append(role)
        return role

    yield new_role
    for role in made:
        conn.execute(f"DROP SCHEMA IF EXISTS {role} CASCADE")  # a cast there depends on its function
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


def as_role(db: str, role: str):
    return psycopg.connect(db, user=role, autocommit=True)


def error_of(c: psycopg.Connection, sql: str, params=()) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as e:
        c.execute(sql, params)
    return e.value


# ---- one table of privileges --------------------------------------------------------------------

DOC = REPO / "docs" / "deployment.md"
RELATION_PRIVILEGES = ("select", "insert", "update", "delete", "truncate")
SEQUENCE_PRIVILEGES = ("usage", "select", "update")


def documented_privileges() -> dict[str, tuple[frozenset, frozenset, frozenset]]:
    """docs/deployment.md's table "Every object's privileges": object -> (PUBLIC, serving, training)."""
    text = DOC.read_text()
    section = text[text.index("### Every object's privileges"):]
    table = {}
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue
        rights = tuple(frozenset() if c == "—" else frozenset(p.strip() for p in c.split(",")) for c in cells[1:4])
        for name in re.findall(r"`([a-z_0-9]+)`", cells[0]):
            assert name not in table, f"{name} has two rows in the table"
            table[name] = rights
    assert table, "the privilege table of docs/deployment.md was not found"
    return table


def actual_privileges(conn, public: str, serve: str, train: str) -> dict[str, tuple[frozenset, ...]]:
    """What each role really has on every object of the extension (public: a role without grants)."""
    out = {}
    for name, oid, kind in conn.execute(
            "SELECT p.proname, p.oid, 'f' FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass "
            "AND d.objid = p.oid AND d.deptype = 'e' JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm' "
            "UNION ALL "
            "SELECT c.relname, c.oid, c.relkind::text FROM pg_class c JOIN pg_depend d ON d.classid = 'pg_class'::regclass "
            "AND d.objid = c.oid AND d.deptype = 'e' JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm'"):
        assert name not in out, f"two objects named {name}: the table names functions without arguments"
        rights = []
        for role in (public, serve, train):
            if kind == "f":
                ok = conn.execute("SELECT has_function_privilege(%s, %s::oid, 'EXECUTE')", (role, oid)).fetchone()[0]
                rights.append(frozenset({"execute"} if ok else ()))
            else:
                check, privileges = (("has_sequence_privilege", SEQUENCE_PRIVILEGES) if kind == "S"
                                     else ("has_table_privilege", RELATION_PRIVILEGES))
                rights.append(frozenset(p for p in privileges if conn.execute(
                    f"SELECT {check}(%s, %s::oid, %s)", (role, oid, p)).fetchone()[0]))
        out[name] = tuple(rights)
    return out


def check_privilege_table(conn) -> None:
    """The documented table equals what a role without grants, a serving role and a training role
    have, object by object, with no object missing on either side."""
    suffix = uuid.uuid4().hex[:8]
    public, serve, train = (f"priv_{k}_{suffix}" for k in ("public", "serve", "train"))
    for role in (public, serve, train):
        conn.execute(f"CREATE ROLE {role}")
    try:
        conn.execute("SELECT llm_grant(%s)", (serve,))
        conn.execute("SELECT llm_grant(%s, train => true)", (train,))
        documented = documented_privileges()
        actual = actual_privileges(conn, public, serve, train)
        assert sorted(set(actual) - set(documented)) == [], "objects without a row in docs/deployment.md's table"
        assert sorted(set(documented) - set(actual)) == [], "rows of docs/deployment.md's table for no object"
        wrong = {name: (actual[name], documented[name]) for name in actual if actual[name] != documented[name]}
        assert wrong == {}, "privileges (PUBLIC, serving, training) that differ from the table: actual, documented"
    finally:
        for role in (public, serve, train):
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def check_search_paths(conn) -> None:
    """No function is SECURITY DEFINER, and every search_path a function sets has pg_catalog first
    and pg_temp last (so that a role's own objects never replace the catalog's)."""
    rows = conn.execute(
        "SELECT p.proname, p.prosecdef, p.proconfig FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass "
        "AND d.objid = p.oid AND d.deptype = 'e' JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm'").fetchall()
    assert [name for name, secdef, _ in rows if secdef] == []
    for name, _, config in rows:
        for setting in config or []:
            if setting.startswith("search_path="):
                schemas = [s.strip() for s in setting.split("=", 1)[1].split(",")]
                assert schemas[0] == "pg_catalog" and schemas[-1] == "pg_temp", (name, setting)


def test_privileges_are_those_of_the_documented_table(conn):
    check_privilege_table(conn)
    check_search_paths(conn)


def test_training_roles_of_0_2_0_keep_the_training_lock(cluster):
    """0.3.0 revokes llm_train_lock from PUBLIC: a role granted training rights under 0.2.0 gets
    it with the update (the update script grants it to every role that may update llm_param)."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    role = f"trainer_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        admin.execute(f"CREATE ROLE {role}")
    try:
        with psycopg.connect(cluster.dsn(name), autocommit=True) as c:
            c.execute("CREATE EXTENSION pg_llm VERSION '0.2.0'")
            c.execute("SELECT llm_grant(%s, train => true)", (role,))  # 0.2.0's plpgsql, no library call
            c.execute("ALTER EXTENSION pg_llm UPDATE")
            assert c.execute("SELECT has_function_privilege(%s, 'llm_train_lock(text)', 'EXECUTE'), "
                             "has_function_privilege('public', 'llm_train_lock(text)', 'EXECUTE')",
                             (role,)).fetchone() == (True, False)
    finally:
        with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.execute(f"DROP ROLE {role}")


# ---- trigger functions --------------------------------------------------------------------------

TRIGGER_FUNCTIONS = {
    # function: the trigger definitions its own table has (the ways an attacker would attach it)
    "llm_param_note_change": ["BEFORE INSERT OR UPDATE OR DELETE {on} FOR EACH ROW"],
    "llm_param_bump_version": ["AFTER INSERT OR UPDATE OR DELETE {on} FOR EACH STATEMENT",
                               "AFTER TRUNCATE {on} FOR EACH STATEMENT"],
    "llm_bpe_bump_version": ["AFTER INSERT {on} REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT",
                             "AFTER DELETE {on} REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT",
                             "AFTER TRUNCATE {on} FOR EACH STATEMENT"],
    "llm_model_config_replace_builtin": ["BEFORE INSERT {on} FOR EACH ROW", "AFTER INSERT {on} FOR EACH STATEMENT"],
    "llm_dataset_check_length": ["AFTER INSERT {on} REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT"],
}

# Column layouts of the attacker's tables, each with a row: the first column as the C trigger reads
# it (the review's crash), llm_param's own columns, and a model column of a type the attacker owns
# with its own cast to text (the review's escalation).
LAYOUTS = {
    "(a int8)": "(4096)",
    "(model text, name text, shape int[], data bytea)": "('m', 'wpe', '{1}', '\\x00')",
    "(model {evil})": "(ROW(1))",
    "(x int, model {evil})": "(1, ROW(1))",
}


def make_evil_type(c: psycopg.Connection, schema: str) -> str:
    """A type whose implicit cast to text runs `ALTER ROLE ... SUPERUSER` when the caller may."""
    role = c.execute("SELECT current_user").fetchone()[0]
    c.execute(f"CREATE TYPE {schema}.evil AS (x int)")
    c.execute(f"""CREATE FUNCTION {schema}.evil_text({schema}.evil) RETURNS text LANGUAGE plpgsql AS $$
                  BEGIN
                      IF current_user <> '{role}' THEN EXECUTE 'ALTER ROLE {role} SUPERUSER'; END IF;
                      RETURN 'gpt2-small';
                  END $$""")
    c.execute(f"CREATE CAST ({schema}.evil AS text) WITH FUNCTION {schema}.evil_text({schema}.evil) AS IMPLICIT")
    return f"{schema}.evil"


@pytest.mark.parametrize("kind", ["none", "serve", "train"])
def test_no_role_can_attach_a_trigger_function(conn, db, roles, kind):
    """The review's escalation, by a role with no grants, a serving and a training role: each may
    create a schema of its own, a type with a cast and a table, but not attach pg_llm's trigger
    functions (EXECUTE is revoked from PUBLIC); it stays what it was, gpt2-small stays registered."""
    role = roles(kind)
    conn.execute(f"CREATE SCHEMA {role} AUTHORIZATION {role}")
    with as_role(db, role) as c:
        evil = make_evil_type(c, role)
        for i, layout in enumerate(LAYOUTS):
            c.execute(f"CREATE TABLE {role}.t{i} {layout.format(evil=evil)}")
            for function, definitions in TRIGGER_FUNCTIONS.items():
                for d in definitions:
                    e = error_of(c, f"CREATE TRIGGER x {d.format(on=f'ON {role}.t{i}')} EXECUTE FUNCTION {function}()")
                    assert isinstance(e, psycopg.errors.InsufficientPrivilege), (function, d, e)
                    assert f"permission denied for function {function}" in str(e)
    assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0] is False
    assert conn.execute("SELECT count(*) FROM llm_model_config WHERE model = 'gpt2-small'").fetchone()[0] == 1


def test_trigger_functions_run_on_their_own_tables_only(conn, db):
    """Attached by a superuser to tables of other layouts, every trigger function of pg_llm fails
    with an error before reading a column, on every event it was attached for (the review crashed
    the server with llm_param_note_change on a table whose first column is int8): nothing runs,
    the server keeps every session."""
    with psycopg.connect(db, autocommit=True) as bystander:
        evil = make_evil_type(conn, "public")
        for i, (layout, row) in enumerate(LAYOUTS.items()):
            table = f"public.victim{i}"
            first = re.match(r"\((\w+)", layout).group(1)
            conn.execute(f"CREATE TABLE {table} {layout.format(evil=evil)}")
            for function, definitions in TRIGGER_FUNCTIONS.items():
                conn.execute(f"INSERT INTO {table} VALUES {row}")
                for j, d in enumerate(definitions):
                    conn.execute(f"CREATE TRIGGER x{j} {d.format(on=f'ON {table}')} EXECUTE FUNCTION {function}()")
                refused = 0
                for sql in (f"INSERT INTO {table} VALUES {row}", f"UPDATE {table} SET {first} = {first}",
                            f"DELETE FROM {table}", f"TRUNCATE {table}"):
                    try:
                        conn.execute(sql)
                    except psycopg.Error as e:
                        assert isinstance(e, psycopg.errors.TriggeredActionException), (function, sql, e)
                        assert f"{function}() is a trigger of pg_llm's table" in e.diag.message_primary, (function, sql)
                        refused += 1
                assert refused >= 1, function
                for j in range(len(definitions)):
                    conn.execute(f"DROP TRIGGER x{j} ON {table}")
                conn.execute(f"TRUNCATE {table}")
        assert bystander.execute("SELECT 1").fetchone() == (1,)
    assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]


def test_trigger_functions_still_work_where_they_belong(conn, roles, db):
    """A training role (no EXECUTE on the trigger functions) writes the tables: the triggers fire."""
    role = roles("train")
    make_model(conn, "m")
    with as_role(db, role) as c:
        before = c.execute("SELECT weights_version FROM llm_model_config WHERE model = 'm'").fetchone()[0]
        c.execute("UPDATE llm_param SET data = data WHERE model = 'm' AND name = 'wpe'")
        assert c.execute("SELECT weights_version FROM llm_model_config WHERE model = 'm'").fetchone()[0] > before
        write_gpt2_tokenizer(c, "m")
        assert c.execute("SELECT version FROM llm_tokenizer_version WHERE model = 'm'").fetchone()[0] > 0
        e = error_of(c, "INSERT INTO llm_dataset (tokens, target) VALUES ('{1,2,3}', '{2,3,4}')")
        assert isinstance(e, psycopg.errors.CheckViolation) and "must have the same length" in str(e)


# ---- a queued llm_train -------------------------------------------------------------------------

def test_a_queued_llm_train_continues_the_run_it_waited_for(conn, db):
    """The review's data loss: session A trains in an open transaction while B's llm_train waits
    for the training lock; once A commits, B must train on A's weights and moments and continue
    its step counter, not on what its statement's snapshot saw before A committed."""
    make_model(conn, "m")
    train = "SELECT llm_train('m', %s, batch_size => 8, lr_max => 1e-2, warmup => 1, total_steps => 1000)"
    a = psycopg.connect(db)
    result: list = []
    try:
        a.execute(train, (60,))

        def queued():
            with psycopg.connect(db, autocommit=True) as b:
                result.append(b.execute(train, (1,)).fetchone()[0])

        thread = threading.Thread(target=queued)
        thread.start()
        wait_for(conn, "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND database = "
                 "(SELECT oid FROM pg_database WHERE datname = current_database())", what="B to wait for the lock")
        a.commit()
        thread.join(timeout=300)
    finally:
        a.close()
    losses = dict(conn.execute("SELECT step, loss FROM llm_train_log WHERE model = 'm'").fetchall())
    assert conn.execute("SELECT step FROM llm_train_state WHERE model = 'm'").fetchone()[0] == 61
    assert sorted(losses) == list(range(1, 62))
    assert losses[60] < 0.5 * losses[1], "A did not learn: the test cannot tell the two snapshots apart"
    # B's step starts where A ended, not where A began
    assert result and abs(losses[61] - losses[60]) < 0.25 * (losses[1] - losses[60]), losses


def test_a_queued_llm_train_under_repeatable_read_fails_to_serialize(conn, db):
    """Under REPEATABLE READ the transaction keeps its snapshot: the queued call fails with a
    serialization error instead of training on weights it cannot see."""
    make_model(conn, "m")
    conn.execute("SELECT llm_train('m', 1, batch_size => 2, warmup => 1)")
    a = psycopg.connect(db)
    b = psycopg.connect(db)
    errors: list = []
    try:
        b.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        b.execute("SELECT count(*) FROM llm_param")  # takes the transaction's snapshot
        a.execute("SELECT llm_train('m', 2, batch_size => 2, warmup => 1)")

        def queued():
            try:
                b.execute("SELECT llm_train('m', 1, batch_size => 2, warmup => 1)")
            except psycopg.Error as e:
                errors.append(e)

        thread = threading.Thread(target=queued)
        thread.start()
        wait_for(conn, "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND pid = %s",
                 (b.info.backend_pid,), what="B to wait for the lock")
        a.commit()
        thread.join(timeout=300)
        b.rollback()
    finally:
        a.close()
        b.close()
    assert len(errors) == 1 and isinstance(errors[0], psycopg.errors.SerializationFailure), errors
    assert conn.execute("SELECT step FROM llm_train_state WHERE model = 'm'").fetchone()[0] == 3


# ---- serving honours privileges and row-level security ------------------------------------------

def serving_calls(model: str) -> list[str]:
    return [
        f"SELECT llm_logits(ARRAY[1, 2, 3], '{model}')",
        f"SELECT llm_generate_tokens(ARRAY[1, 2], 4, 0, model => '{model}')",
        f"SELECT llm_generate('Hello', 4, 0, model => '{model}')",
        f"SELECT count(*) FROM llm_generate_stream('Hello', 4, 0, model => '{model}')",
        f"SELECT count(*) FROM llm_generate_batch(ARRAY['Hello', 'World'], 4, 0, model => '{model}')",
        f"SELECT count(*) FROM llm_beam_search('Hello', 2, 3, '{model}')",
        f"SELECT llm_embed('Hello there', '{model}')",
        f"SELECT count(*) FROM llm_embed_batch(ARRAY['Hello there', 'Hi'], '{model}')",
        f"SELECT llm_perplexity('Hello there friend', '{model}')",
        f"SELECT loss FROM llm_eval('{model}', 'val')",
        f"SELECT format FROM pg_llm_weight_cache_build('{model}')",
    ]


def test_serving_needs_the_right_to_read_the_weights(conn, db, roles):
    """The review: a role with SELECT on llm_model_config alone was refused until the owner had
    generated once; then the shared copy served it (llm_logits: enough to extract the model). Now
    every call, at every precision, is refused as a read of llm_param would be."""
    make_model(conn, "m", vocab=50257)
    write_gpt2_tokenizer(conn, "m")
    conn.execute("INSERT INTO llm_dataset (dataset, tokens, target) VALUES ('val', '{1,2,3}', '{2,3,4}')")
    role = roles()
    for table in ("llm_model_config", "llm_bpe_vocab", "llm_bpe_merges", "llm_tokenizer_version", "llm_dataset"):
        conn.execute(f"GRANT SELECT ON {table} TO {role}")
    for precision in PRECISIONS:
        conn.execute(f"SET pg_llm.inference_precision = {precision}")
        for sql in serving_calls("m"):
            conn.execute(sql)  # the owner first: the shared copy and the runner exist
        with as_role(db, role) as c:
            c.execute(f"SET pg_llm.inference_precision = {precision}")
            for sql in serving_calls("m"):
                e = error_of(c, sql)
                assert isinstance(e, psycopg.errors.InsufficientPrivilege), (precision, sql, e)
                assert "permission denied for table llm_param" in str(e), (precision, sql, e)
            assert c.execute("SELECT count(*) FROM pg_llm_weight_cache()").fetchone()[0] == 0
            assert c.execute("SELECT count(*) FROM pg_llm_batch_runners()").fetchone()[0] == 0
    conn.execute("RESET pg_llm.inference_precision")


def test_row_level_security_on_llm_param_holds_for_serving(conn, db, roles):
    """Row-level security restricting a serving role to one model: the other model's shared copy
    (made by the owner) does not serve it, at any precision, on any path; its own model serves it
    with exactly the owner's results; the lists show it its own model's copies and runner only."""
    for model in ("mine", "theirs"):
        make_model(conn, model, vocab=50257)
        write_gpt2_tokenizer(conn, model)
    conn.execute("INSERT INTO llm_dataset (dataset, tokens, target) VALUES ('val', '{1,2,3}', '{2,3,4}')")
    role = roles("serve")
    conn.execute(f"GRANT SELECT ON llm_dataset TO {role}")
    conn.execute("ALTER TABLE llm_param ENABLE ROW LEVEL SECURITY")
    conn.execute(f"CREATE POLICY tenant ON llm_param FOR SELECT TO {role} USING (model = 'mine')")
    try:
        for precision in PRECISIONS:
            conn.execute(f"SET pg_llm.inference_precision = {precision}")
            owner = {}
            for sql in serving_calls("mine") + serving_calls("theirs"):
                owner[sql] = conn.execute(sql).fetchall()
            with as_role(db, role) as c:
                c.execute(f"SET pg_llm.inference_precision = {precision}")
                for sql in serving_calls("mine"):
                    assert c.execute(sql).fetchall() == owner[sql], (precision, sql)
                for sql in serving_calls("theirs"):
                    e = error_of(c, sql)
                    assert isinstance(e, psycopg.errors.InsufficientPrivilege), (precision, sql, e)
                    assert 'permission denied for the weights of model "theirs"' in str(e), (precision, sql, e)
                    assert "shows role" in e.diag.message_detail and "0 of the model's" in e.diag.message_detail
                assert {r[0] for r in c.execute("SELECT model FROM pg_llm_weight_cache()")} == {"mine"}
                assert {r[0] for r in c.execute("SELECT model FROM pg_llm_batch_runners()")} <= {"mine"}
                # the owner sees both
                assert {r[0] for r in conn.execute("SELECT model FROM pg_llm_weight_cache()")} >= {"mine", "theirs"}
        # a policy that hides one tensor of a model hides the model
        conn.execute(f"ALTER POLICY tenant ON llm_param USING (model = 'mine' AND name <> 'ln_f.bias')")
        with as_role(db, role) as c:
            e = error_of(c, "SELECT llm_logits(ARRAY[1], 'mine')")
            assert "permission denied for the weights of model \"mine\"" in str(e)
    finally:
        conn.execute("RESET pg_llm.inference_precision")
        conn.execute("DROP POLICY tenant ON llm_param")
        conn.execute("ALTER TABLE llm_param DISABLE ROW LEVEL SECURITY")


def test_the_tokenizer_is_read_again_for_another_role(conn, db, roles):
    """A session that switches role (SET ROLE) does not keep serving the tokenizer the first role
    read: the second role's own rights on the tokenizer tables apply."""
    make_model(conn, "m", vocab=50257)
    write_gpt2_tokenizer(conn, "m")
    role = roles()
    conn.execute(f"GRANT SELECT ON llm_tokenizer_version TO {role}")
    with psycopg.connect(db, autocommit=True) as c:
        assert c.execute("SELECT llm_encode('Hello', 'm')").fetchone()[0] == [15496]
        c.execute(f"SET ROLE {role}")
        e = error_of(c, "SELECT llm_encode('Hello', 'm')")
        assert "permission denied for table llm_bpe_" in str(e)


# ---- the training lock --------------------------------------------------------------------------

def test_the_training_lock_is_for_roles_that_may_train(conn, db, roles):
    """Any role could hold any model's training lock for its session's life; now only training
    roles may take it, and only for a model whose weights they may write."""
    make_model(conn, "m")
    for kind in ("none", "serve"):
        with as_role(db, roles(kind)) as c:
            e = error_of(c, "SELECT llm_train_lock('m')")
            assert "permission denied for function llm_train_lock" in str(e)
    # EXECUTE granted by hand is not enough without the right to write the weights
    role = roles("serve")
    conn.execute(f"GRANT EXECUTE ON FUNCTION llm_train_lock(text) TO {role}")
    with as_role(db, role) as c:
        e = error_of(c, "SELECT llm_train_lock('m')")
        assert "permission denied for table llm_param" in str(e)
    with as_role(db, roles("train")) as c:
        c.execute("SELECT llm_train_lock('m')")
        assert c.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
                         "AND granted").fetchone()[0] == 1


# ---- a failed statement leaves nothing to bump --------------------------------------------------

def test_a_failed_write_does_not_bump_another_model_later(conn):
    """The models a statement noted as changed are forgotten when it fails (here after the row
    trigger ran, on a duplicate key), in a transaction or a subtransaction: the next write to
    llm_param bumps only the model it writes, so other models keep their shared copies."""
    make_model(conn, "a")
    make_model(conn, "b")
    version = "SELECT weights_version FROM llm_model_config WHERE model = %s"
    a0 = conn.execute(version, ("a",)).fetchone()[0]
    duplicate = "INSERT INTO llm_param SELECT model, name, shape, data FROM llm_param WHERE model = 'a' AND name = 'wpe'"
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(duplicate)
    b0 = conn.execute(version, ("b",)).fetchone()[0]
    conn.execute("UPDATE llm_param SET data = data WHERE model = 'b' AND name = 'wpe'")
    assert conn.execute(version, ("a",)).fetchone()[0] == a0
    assert conn.execute(version, ("b",)).fetchone()[0] > b0
    # a subtransaction that fails inside a transaction that goes on
    conn.execute(f"""DO $$ BEGIN
                        BEGIN {duplicate}; EXCEPTION WHEN unique_violation THEN NULL; END;
                        UPDATE llm_param SET data = data WHERE model = 'b' AND name = 'wpe';
                     END $$""")
    assert conn.execute(version, ("a",)).fetchone()[0] == a0


# ---- the batch runner: what it reserves, who sizes it -------------------------------------------

def vm_size_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def test_the_batch_runner_reserves_what_its_sequences_can_use(conn, db, roles):
    """A runner's key/value cache holds n_positions positions per slot (a prompt and what follows
    it fit the context): it reserved twice that. Only a superuser sizes a server-wide runner."""
    P, L, C, slots = 4096, 4, 256, 64
    conn.execute("SELECT llm_init('long', %s, 4, %s, %s, 64, seed => 1)", (L, C, P))
    conn.execute(f"SET pg_llm.batch_sessions = {slots}")
    try:
        conn.execute("SELECT llm_generate_tokens(ARRAY[1, 2], 3, 0, model => 'long')")
        pid, got_slots, cache = conn.execute("SELECT pid, slots, cache_bytes FROM pg_llm_batch_runners() "
                                             "WHERE model = 'long'").fetchone()
    finally:
        conn.execute("RESET pg_llm.batch_sessions")
    assert got_slots == slots
    assert cache == 2 * 4 * L * slots * P * C  # keys and values, float32
    # the process reserved no second cache of that size (it reserved 2 x 2.1 GB before)
    assert vm_size_bytes(pid) < cache + (1 << 30)
    with as_role(db, roles("serve")) as c:
        c.execute("SELECT pg_llm_version()")  # the library defines the setting (before, SET makes a placeholder)
        e = error_of(c, "SET pg_llm.batch_sessions = 64")
        assert isinstance(e, psycopg.errors.InsufficientPrivilege)


# ---- sampling -----------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-40])
def test_a_temperature_too_small_for_float32_samples_greedily(conn, temperature):
    """1e-300 is 0 in float32, and 1e-40 makes logits / temperature overflow: the scaled logits
    were infinite and the review got the last vocabulary id 63 times. The limit of sampling as the
    temperature goes to 0 is greedy decoding, and that is what such a temperature now gives."""
    make_model(conn, "m")
    greedy = conn.execute("SELECT llm_generate_tokens(ARRAY[1], 20, 0, 0, 1, 'm')").fetchone()[0]
    tiny = conn.execute("SELECT llm_generate_tokens(ARRAY[1], 20, %s, 0, 1, 'm')", (temperature,)).fetchone()[0]
    assert tiny == greedy
    assert len(set(greedy)) > 1 or greedy[0] != 63


# ---- a cancel while a runner starts -------------------------------------------------------------

def runner_files_held(pid: int) -> list[str]:
    """The batch runner files that backend pid has mapped or open."""
    held = [line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if ".runner" in line]
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.endswith(".runner"):
            held.append(target)
    return held


def test_a_cancel_while_a_runner_starts_leaves_nothing_mapped(cluster, conn, db):
    """The postmaster is stopped, so the new runner cannot start and the session waits for it;
    cancelled there, the session must let go of the runner's file it had made and mapped (it kept
    the mapping and the descriptor for the rest of its life)."""
    make_model(conn, "m")
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    with psycopg.connect(db, autocommit=True) as c:
        pid = c.info.backend_pid
        c.execute("SELECT llm_logits(ARRAY[1], 'm')")  # the shared copy exists: only the runner is to start
        errors: list = []

        def generate():
            try:
                c.execute("SELECT llm_generate_tokens(ARRAY[1], 3, 0, model => 'm')")
            except psycopg.Error as e:
                errors.append(e)

        call = threading.Thread(target=generate)
        os.kill(postmaster, signal.SIGSTOP)
        try:
            call.start()
            # BgWorkerStartup until PostgreSQL 16, BgworkerStartup from 17
            wait_for(conn, "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND lower(wait_event) = 'bgworkerstartup'",
                     (pid,), what="the session to wait for its runner")
            cancel_until_ended(conn, pid, call)
            assert errors and isinstance(errors[0], psycopg.errors.QueryCanceled), errors
            assert runner_files_held(pid) == []
        finally:
            os.kill(postmaster, signal.SIGCONT)
        assert c.execute("SELECT llm_generate_tokens(ARRAY[1], 3, 0, model => 'm')").fetchone()[0]


# ---- training that diverges ---------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2])
def test_training_that_diverges_is_rolled_back(conn, cli, db, steps):
    """`pgllm train --steps 2 --lr-max 1e6` committed loss 4.81 -> 1516813 and a model that
    generated one token over and over. A loss above twice the call's first and above ln(vocab)
    stops training, nothing written; a single step is caught by its loss after the update."""
    make_model(conn, "m")
    conn.execute("SELECT llm_train('m', 1, batch_size => 8, warmup => 1)")
    before = conn.execute("SELECT weights_version, (SELECT step FROM llm_train_state WHERE model = 'm') "
                          "FROM llm_model_config WHERE model = 'm'").fetchone()
    e = error_of(conn, "SELECT llm_train('m', %s, batch_size => 8, lr_max => 1e6, warmup => 1)", (steps,))
    assert isinstance(e, psycopg.errors.NumericValueOutOfRange), e
    assert 'training of model "m" diverged at step' in str(e) and "Lower lr_max (it is 1e+06)" in e.diag.message_hint
    assert "nothing of this call was written" in e.diag.message_detail
    assert conn.execute("SELECT weights_version, (SELECT step FROM llm_train_state WHERE model = 'm') "
                        "FROM llm_model_config WHERE model = 'm'").fetchone() == before
    result = cli("--dsn", db, "train", "--model", "m", "--steps", "2", "--lr-max", "1e6", "--batch-size", "8")
    assert result.exit_code == 1 and "diverged" in result.output
