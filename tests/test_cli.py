"""The command line as a whole: pg_llm's names whatever the search_path, one clear error when the
extension is missing, the shared --model option, and defaults shown in every --help."""

from __future__ import annotations

import re
import shutil
import uuid

import psycopg
import pytest
import typer
from typer.testing import CliRunner

from pgllm.cli import app
from pgllm.client import DEFAULT_MODEL, MODEL_ENV
from pgllm.options import MODEL_HELP

from .conftest import make_home, run_pgllm
from .test_tokenizer import HELLO_MERGES, one_error_line, write_tokenizer

# Each is an object of pg_llm's schema; the decoys raise this when they are used.
DECOY = "decoy object used"


def new_database(cluster) -> str:
    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(cluster, name: str) -> None:
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def decoyed(cluster):
    """A database with pg_llm in schema `llm`, and a search_path that leaves `llm` out and puts
    first a schema `decoy` holding an object of every name pg_llm has: a view for each table,
    view and sequence, a function of the same signature for each function; each raises when used."""
    name = new_database(cluster)
    url = cluster.dsn(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA llm")
        conn.execute("CREATE EXTENSION pg_llm SCHEMA llm")
        conn.execute("CREATE SCHEMA decoy")
        conn.execute("CREATE FUNCTION decoy.boom(what text) RETURNS int VOLATILE LANGUAGE plpgsql AS "
                     f"$$BEGIN RAISE EXCEPTION '{DECOY}: %', what; END$$")
        relations = conn.execute("SELECT relname FROM pg_class WHERE relnamespace = 'llm'::regnamespace "
                                 "AND relkind IN ('r', 'p', 'v', 'm', 'S', 'c')").fetchall()
        for (rel,) in relations:
            conn.execute(f'CREATE VIEW decoy."{rel}" AS SELECT decoy.boom(\'{rel}\') AS decoy')
        functions = conn.execute(
            "SELECT proname, pg_get_function_arguments(oid), pg_get_function_result(oid) FROM pg_proc "
            "WHERE pronamespace = 'llm'::regnamespace AND prokind = 'f'").fetchall()
        for fn, args, result in functions:
            conn.execute(f'CREATE FUNCTION decoy."{fn}"({args}) RETURNS {result} LANGUAGE plpgsql AS '
                         f"$$BEGIN PERFORM decoy.boom('{fn}'); END$$")
        conn.execute(f'ALTER DATABASE "{name}" SET search_path = decoy, public')
    assert {"llm_param", "llm_model_config", "llm_dataset", "llm_checkpoint"} <= {r for r, in relations}
    assert {"llm_train", "llm_init", "llm_generate", "pg_llm_import_npz"} <= {f for f, _, _ in functions}
    # the decoys work: a statement that names pg_llm's objects without their schema uses them
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in ("SELECT count(*) FROM llm_dataset", "SELECT llm_generate('Hi')",
                          "SELECT llm_init('m', 1, 1, 4, 4, 4)"):
            with pytest.raises(psycopg.errors.RaiseException, match=DECOY):
                conn.execute(statement)
    yield url
    drop_database(cluster, name)


def test_every_command_finds_pg_llm_whatever_the_search_path(decoyed, tmp_path):
    runner = CliRunner()

    def cli(*args: str, env: dict | None = None) -> str:
        result = runner.invoke(app, ["--dsn", decoyed, *args], env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert DECOY not in result.output
        return result.output

    vocab, merges = write_tokenizer(tmp_path / "tok", HELLO_MERGES)
    (tmp_path / "a.txt").write_text("hello world, hello world. " * 20)
    assert "initialised model 'm'" in cli("init", "m", "--n-layer", "1", "--n-head", "2", "--d-model", "8",
                                          "--n-positions", "16", "--vocab", "263", "--seed", "1")
    assert "263 tokens, 6 merges" in cli("tokenizer", "--model", "m", "--vocab", str(vocab), "--merges", str(merges))
    assert "rows of 8 tokens" in cli("dataset", "--model", "m", "--tokenizer", "db", "--input", str(tmp_path / "a.txt"),
                                     "--block-size", "8", "--batch-size", "4", "--truncate")
    # the model from PGLLM_MODEL, the shared --model's default
    env = {MODEL_ENV: "m"}
    assert 'trained model "m": steps 1..2' in cli("train", "--steps", "2", "--batch-size", "2", "--warmup", "1",
                                                  "--commit-every", "1", env=env)
    assert "m: 2 steps" in cli("log", env=env)
    assert cli("generate", "hello", "-n", "3", "--seed", "1", env=env).strip()
    assert cli("generate", "hello", "-n", "3", "--seed", "1", "--no-stream", env=env).strip()
    assert cli("generate", "hello", "-n", "3", "--beam-width", "2", env=env).startswith("1\t")
    assert "saved checkpoint 1 of model 'm' at step 2" in cli("checkpoint", "save", "--note", "n", env=env)
    assert "n" in cli("checkpoint", "list", "--model", "m").splitlines()[-1]
    assert "loaded checkpoint 1 into model 'm': step 2" in cli("checkpoint", "load", "1")
    assert "deleted checkpoint 1 of model 'm'" in cli("checkpoint", "delete", "1")
    npz = make_home("pgllm-cli-") / "m.npz"  # a file the server's OS user can read
    assert "exported model 'm'" in cli("export", "--output", str(npz), env=env)
    npz.chmod(0o644)
    assert "the server read the file" in cli("import", str(npz), "--model", "m2", "--via", "server")
    assert "sent " in cli("import", str(npz), "--model", "m3", "--via", "client")
    shutil.rmtree(npz.parent)

    with psycopg.connect(decoyed) as conn:
        q = "SELECT {} FROM llm.{} WHERE model = %s"
        assert conn.execute(q.format("step", "llm_train_state"), ("m",)).fetchone() == (2,)
        assert conn.execute("SELECT count(*) FROM llm.llm_dataset").fetchone()[0] > 0
        n = conn.execute(q.format("count(*)", "llm_param"), ("m",)).fetchone()[0]
        assert n == 16 and [conn.execute(q.format("count(*)", "llm_param"), (m,)).fetchone()[0]
                            for m in ("m2", "m3")] == [n, n]


def test_a_missing_extension_is_one_error_line_everywhere(cluster, tmp_path):
    name = new_database(cluster)
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "m.npz").write_bytes(b"")
    try:
        for args in (["init", "m", "--n-layer", "1"], ["tokenizer"], ["dataset", "--input", str(tmp_path / "a.txt")],
                     ["train", "--steps", "1"], ["log"], ["generate", "Hi"], ["generate", "Hi", "--no-stream"],
                     ["generate", "Hi", "--beam-width", "2"], ["checkpoint", "save"], ["checkpoint", "list"],
                     ["checkpoint", "load", "1"], ["checkpoint", "delete", "1"], ["export", "-o", str(tmp_path / "x")],
                     ["import", str(tmp_path / "m.npz")]):
            result = CliRunner().invoke(app, ["--dsn", cluster.dsn(name), *args], catch_exceptions=False)
            line = one_error_line(result)
            assert line == f'Error: the pg_llm extension is not installed in database "{name}" (run pgllm install)', args
    finally:
        drop_database(cluster, name)


def commands(command, path: tuple[str, ...] = ()):
    """(path, command) of the command and of every command under it (typer's own click objects)."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from commands(sub, path + (name,))


def shown_default(param) -> str | None:
    """What --help must show as the parameter's default; None where it shows none."""
    if param.required or getattr(param, "hidden", False) or param.nargs == -1 or param.name == "help":
        return None
    if isinstance(param.show_default, str):
        return f"[default: ({param.show_default})]"
    flag = getattr(param, "is_flag", False)
    if flag and not param.secondary_opts:
        return None  # a flag is off unless given
    assert param.default is not None, f"{param.name}: a default of None needs a show_default text"
    if flag:
        return f"[default: {(param.opts if param.default else param.secondary_opts)[0].lstrip('-')}]"
    return f"[default: {param.default}]"


# --model options with a meaning of their own (every model's, the checkpoint's own)
OWN_MODEL = {("checkpoint", "list"), ("checkpoint", "load")}


def test_every_help_shows_its_defaults():
    root = typer.main.get_command(app)
    checked = set()
    for path, command in commands(root):
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "2000"})
        assert result.exit_code == 0, result.output
        text = re.sub(r"\s+", " ", result.output)
        for param in command.params:
            # defaults are said one way: typer's [default: ...], not in the help's words
            assert not re.search(r"[\[(]default", param.help or ""), (path, param.name)
            if (param.help or "") and param.help not in text:
                assert False, f"{path} {param.name}: help text lost in rendering: {param.help!r} not in {text!r}"
            expected = shown_default(param)
            if expected is not None:
                assert expected in text, (path, param.name, expected, text)
                checked.add((path, param.name))
            if "--model" in getattr(param, "opts", ()) and path not in OWN_MODEL:
                # the shared option: one help text, PGLLM_MODEL, then gpt2-small
                assert (param.help, param.envvar, param.default) == (MODEL_HELP, MODEL_ENV, DEFAULT_MODEL), path
                assert f"[env var: {MODEL_ENV}] [default: {DEFAULT_MODEL}]" in text, path
    assert {(("train",), "beta1"), (("train",), "warmup"), (("generate",), "model"), ((), "dsn"),
            (("checkpoint", "load"), "model"), (("server", "start"), "port")} <= checked


def test_usage_errors_are_one_line_and_nothing_wraps_at_80_columns(cluster, dsn):
    """Piped, at 80 columns: a usage error is one `Error:` line (exit 2), no usage panel; a long
    error is one line however long; progress is off the pipe."""
    env = {"COLUMNS": "80"}
    proc = run_pgllm("train", "--steps", "1", "--no-such-option", env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "Error: No such option: --no-such-option (see pgllm train --help)\n"
    proc = run_pgllm("models", "rm", env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Missing argument 'model'" in proc.stderr
    long = "m" * 150
    proc = run_pgllm("--dsn", dsn, "train", "--model", long, "--steps", "1", env=env)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f'Error: model "{long}" does not exist (pgllm import or pgllm init creates it)\n'
    proc = run_pgllm("--dsn", dsn, "dataset", "--list", env=env)
    assert proc.returncode == 0 and proc.stderr == ""


def test_training_bar_fits_80_columns():
    import io

    from rich.console import Console
    from rich.progress import Progress

    from pgllm.commands.train import bar_columns

    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system=None)
    with Progress(*bar_columns(123456), console=console, transient=False) as progress:
        progress.add_task("train", total=1000, step=123400, loss="10.123", val=" val 10.456", lr="2.5e-04",
                          tps="12345")
    line = [line for line in out.getvalue().splitlines() if "step" in line][-1]
    for field in ("step 123400/123456", "loss 10.123 val 10.456 lr 2.5e-04 12345 tok/s", "0:00:00"):
        assert field in line, line
