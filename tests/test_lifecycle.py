"""Models, datasets and tokenizers a user can manage (issue 25), and the Hugging Face round trip.

- models: drop, copy, rename (SQL and `pgllm models rm|cp|mv`), with their shared copies, runners,
  snapshots, training logs and tokenizer following; `init --replace` that changes the shape;
- datasets: listed and dropped with their counts, block size and tokenizer; a model with another
  tokenizer is refused for training and evaluation (issue 22), unless overridden;
- tokenizers: refused for an unknown model, copied between models, written out as files;
- export to a Hugging Face directory, loaded by transformers with the same ids and greedy text as
  the server, and back with `pgllm convert DIR` + `pgllm import`, tokenizer included.
"""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
import torch

from pgllm import tokenizer_files

from .conftest import run_pgllm
from .weights import load_params, write_gpt2_tokenizer

SHAPE = ["--n-layer", "2", "--n-head", "2", "--d-model", "32", "--n-positions", "32"]
TEXT = ["The quick brown fox jumps over the lazy dog. " * 3, "Pack my box with five dozen liquor jugs.\n" * 4,
        "How vexingly quick daft zebras jump! " * 3, "Sphinx of black quartz, judge my vow. " * 3] * 6


def ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


def one_error(proc, code: int = 1) -> str:
    lines = proc.stderr.splitlines()
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


@pytest.fixture
def notes(conn):
    conn.execute("CREATE TABLE notes (id int GENERATED ALWAYS AS IDENTITY, body text)")
    conn.execute("INSERT INTO notes (body) SELECT unnest(%s::text[])", (TEXT,))


def model_rows(conn, model: str) -> dict[str, int]:
    """How many rows of the model each table holds."""
    tables = ("llm_model_config", "llm_param", "llm_optim_state", "llm_train_state", "llm_train_log",
              "llm_checkpoint", "llm_bpe_vocab", "llm_bpe_merges")
    return {t: conn.execute(f"SELECT count(*) FROM {t} WHERE model = %s", (model,)).fetchone()[0] for t in tables}


def trained_model(conn, db, name="m", vocab=50257):
    ok(run_pgllm("--dsn", db, "init", name, *SHAPE, "--vocab", str(vocab)))
    write_gpt2_tokenizer(conn, name)
    ok(run_pgllm("--dsn", db, "dataset", "--query", "SELECT body FROM notes", "--model", name, "--truncate"))
    ok(run_pgllm("--dsn", db, "train", "--model", name, "--steps", "2", "--batch-size", "2", "--warmup", "1"))
    conn.execute("SELECT llm_checkpoint_save(%s, 'two steps')", (name,))


# ---- models -----------------------------------------------------------------------------------

def test_models_rm_cp_mv_take_everything_along(conn, db, notes):
    trained_model(conn, db)
    before = model_rows(conn, "m")
    assert all(before.values()), before
    # the shared copy of the weights, used by a generation
    conn.execute("SELECT llm_generate('Hello', 4, temperature => 0, model => 'm')")
    assert conn.execute("SELECT count(*) FROM pg_llm_weight_cache() WHERE model = 'm'").fetchone()[0] == 1

    out = ok(run_pgllm("--dsn", db, "models", "cp", "m", "copy", "--checkpoints")).stdout
    assert out.strip() == "copied model 'm' to 'copy' with its checkpoints"
    assert model_rows(conn, "copy") == before
    assert load_params(conn, "copy").keys() == load_params(conn, "m").keys()
    same = conn.execute("SELECT llm_generate('Hello', 6, temperature => 0, model => 'm') = "
                        "llm_generate('Hello', 6, temperature => 0, model => 'copy')").fetchone()[0]
    assert same

    ok(run_pgllm("--dsn", db, "models", "mv", "m", "renamed"))
    assert model_rows(conn, "m") == dict.fromkeys(before, 0)
    assert model_rows(conn, "renamed") == before
    assert conn.execute("SELECT count(*) FROM pg_llm_weight_cache() WHERE model = 'm'").fetchone()[0] == 0
    assert conn.execute("SELECT llm_encode('Hello world', 'renamed')").fetchone()[0] == [15496, 995]

    out = ok(run_pgllm("--dsn", db, "models", "rm", "renamed")).stdout
    assert out.startswith("deleted model 'renamed':") and "1 checkpoint, its tokenizer" in out
    assert model_rows(conn, "renamed") == dict.fromkeys(before, 0)
    assert conn.execute("SELECT count(*) FROM llm_checkpoint_tensor t WHERE NOT EXISTS "
                        "(SELECT 1 FROM llm_checkpoint c WHERE c.id = t.checkpoint_id)").fetchone()[0] == 0
    assert model_rows(conn, "copy") == before  # the copy is its own

    assert "model \"renamed\" does not exist" in one_error(run_pgllm("--dsn", db, "models", "rm", "renamed"))
    assert 'model "copy" already exists' in one_error(run_pgllm("--dsn", db, "models", "cp", "copy", "copy"))
    # the built-in gpt2-small registration gives way, so that every default names the model
    ok(run_pgllm("--dsn", db, "models", "mv", "copy", "gpt2-small"))
    text = ok(run_pgllm("--dsn", db, "generate", "Hello", "-n", "3", "-t", "0", "--no-stream")).stdout
    assert text.strip() == conn.execute("SELECT llm_generate('Hello', 3, temperature => 0)").fetchone()[0].strip()
    assert 'model "gpt2-small" already exists' in one_error(
        run_pgllm("--dsn", db, "models", "cp", "gpt2-small", "gpt2-small"))


def test_a_model_in_training_is_neither_dropped_nor_renamed(conn, db, notes):
    """llm_model_drop/rename take the training lock that llm_train_lock holds (one rule in C and SQL)."""
    trained_model(conn, db)
    with psycopg.connect(db, autocommit=True) as trainer:
        trainer.execute("SELECT llm_train_lock('m')")
        for call in ("llm_model_drop('m')", "llm_model_rename('m', 'x')"):
            with pytest.raises(psycopg.errors.LockNotAvailable, match='model "m" is being trained'):
                conn.execute(f"SELECT {call}")
        # released now (a closed session's backend may still hold it for a moment)
        trainer.execute("SELECT pg_advisory_unlock_all()")
    conn.execute("SELECT llm_model_rename('m', 'x')")
    conn.execute("SELECT llm_model_drop('x')")


def test_init_replace_changes_the_shape(conn, db):
    ok(run_pgllm("--dsn", db, "init", "m", *SHAPE, "--vocab", "64"))
    refused = one_error(run_pgllm("--dsn", db, "init", "m", "--n-layer", "3", "--vocab", "64"))
    assert 'the weights do not fit model "m"' in refused and "--replace" in refused
    ok(run_pgllm("--dsn", db, "init", "m", "--n-layer", "3", "--d-model", "48", "--replace"))
    assert conn.execute("SELECT n_layer, n_head, d_model, n_positions, vocab FROM llm_model_config "
                        "WHERE model = 'm'").fetchone() == (3, 2, 48, 32, 64)
    assert load_params(conn, "m")["wte"].shape == (64, 48)
    # the built-in gpt2-small has no weights: a from-scratch gpt2-small needs no --replace
    ok(run_pgllm("--dsn", db, "init", "gpt2-small", *SHAPE, "--vocab", "64"))
    assert conn.execute("SELECT d_model FROM llm_model_config WHERE model = 'gpt2-small'").fetchone() == (32,)


# ---- datasets and their tokenizer -------------------------------------------------------------

def test_datasets_are_listed_dropped_and_keep_their_tokenizer(conn, db, notes, tmp_path):
    trained_model(conn, db, "gpt")
    ok(run_pgllm("--dsn", db, "init", "own", *SHAPE, "--vocab", "300"))
    ok(run_pgllm("--dsn", db, "tokenizer", "--model", "own", "--train", "SELECT body FROM notes",
                 "--vocab-size", "300"))
    (tmp_path / "a.txt").write_text("".join(TEXT))
    # defaults from the model: its n_positions and its own tokenizer (db)
    out = ok(run_pgllm("--dsn", db, "dataset", "--input", str(tmp_path / "a.txt"), "--model", "own",
                       "--dataset", "own")).stdout
    assert 'llm_encode (model "own")' in out and "rows of 32 tokens" in out
    # gpt2 (transformers) and the server's GPT-2 tokenizer have one fingerprint: the same tokenizer
    ok(run_pgllm("--dsn", db, "dataset", "--input", str(tmp_path / "a.txt"), "--model", "gpt", "--tokenizer",
                 "gpt2", "--dataset", "hf", "--block-size", "16"))
    listed = ok(run_pgllm("--dsn", db, "dataset", "--list")).stdout.splitlines()
    rows = {line.split()[0]: line.split(None, 4)[1:] for line in listed[1:]}
    n_own = conn.execute("SELECT count(*) FROM llm_dataset WHERE dataset = 'own'").fetchone()[0]
    assert rows["own"] == [str(n_own), "32", str(32 * n_own), "model own"]
    assert rows["hf"][1:] == ["16", str(16 * int(rows["hf"][0])), "gpt2 (transformers)"]
    assert rows["train"][3] == "model gpt"
    fps = dict(conn.execute("SELECT dataset, tokenizer_fingerprint FROM llm_datasets"))
    assert fps["hf"] == fps["train"] == conn.execute("SELECT llm_tokenizer_fingerprint('gpt')").fetchone()[0]

    # a model with another tokenizer: refused for training and evaluation, in SQL and the CLI
    with pytest.raises(psycopg.errors.DataException, match='dataset "own" was tokenized with another tokenizer '
                                                           'than model "gpt" has'):
        conn.execute("SELECT llm_train('gpt', 1, dataset => 'own', batch_size => 2)")
    with pytest.raises(psycopg.errors.DataException, match="another tokenizer"):
        conn.execute("SELECT * FROM llm_eval('gpt', 'own')")
    line = one_error(run_pgllm("--dsn", db, "eval", "gpt", "--dataset", "own"))
    assert "another tokenizer" in line and "pg_llm.check_dataset_tokenizer = off" in line
    # the explicit override
    ok(run_pgllm("--dsn", db, "eval", "gpt", "--dataset", "own", "--any-tokenizer"))
    conn.execute("SET pg_llm.check_dataset_tokenizer = off")
    conn.execute("SELECT * FROM llm_eval('gpt', 'own')")
    conn.execute("RESET pg_llm.check_dataset_tokenizer")
    # rows of another tokenizer are not added to a dataset
    with pytest.raises(psycopg.errors.DataException, match='dataset "own" holds rows made with another tokenizer'):
        conn.execute("SELECT llm_dataset_build('SELECT body FROM notes', 'own', 'gpt', 16)")
    line = one_error(run_pgllm("--dsn", db, "dataset", "--query", "SELECT body FROM notes", "--model", "gpt",
                               "--dataset", "own"))
    assert "holds rows made with another tokenizer" in line
    # the seed's rows, written by hand, have no tokenizer: nothing to check
    conn.execute("INSERT INTO llm_dataset (dataset, tokens, target) VALUES ('hand', '{1,2}', '{2,3}')")
    conn.execute("SELECT * FROM llm_eval('gpt', 'hand')")

    out = ok(run_pgllm("--dsn", db, "dataset", "--drop", "own")).stdout
    assert out.strip() == f'dropped dataset "own": {n_own} rows'
    assert 'dataset "own" does not exist' in one_error(run_pgllm("--dsn", db, "dataset", "--drop", "own"))
    assert conn.execute("SELECT llm_dataset_drop('hf')").fetchone()[0] > 0


def test_dataset_hint_names_the_models_tokenizer(conn, db, notes, tmp_path):
    ok(run_pgllm("--dsn", db, "init", "own", *SHAPE, "--vocab", "300"))
    ok(run_pgllm("--dsn", db, "tokenizer", "--model", "own", "--train", "SELECT body FROM notes",
                 "--vocab-size", "300"))
    (tmp_path / "a.txt").write_text("".join(TEXT))
    line = one_error(run_pgllm("--dsn", db, "dataset", "--input", str(tmp_path / "a.txt"), "--model", "own",
                               "--tokenizer", "gpt2"))
    assert "outside model \"own\"'s vocabulary" in line and "--tokenizer db" in line
    line = one_error(run_pgllm("--dsn", db, "dataset", "--query", "SELECT body FROM notes", "--model", "own",
                               "--block-size", "64"), 1)
    assert "--block-size 64 is larger than model \"own\"'s n_positions 32" in line


# ---- tokenizers -------------------------------------------------------------------------------

def test_tokenizers_refuse_unknown_models_copy_and_write_out(conn, db, notes, tmp_path):
    line = one_error(run_pgllm("--dsn", db, "tokenizer", "--model", "nosuch"))
    assert 'model "nosuch" does not exist' in line
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("INSERT INTO llm_bpe_vocab (model, token_id, token) VALUES ('nosuch', 0, 'a')")
    assert conn.execute("SELECT count(*) FROM llm_bpe_vocab WHERE model = 'nosuch'").fetchone() == (0,)

    ok(run_pgllm("--dsn", db, "init", "a", *SHAPE, "--vocab", "300"))
    ok(run_pgllm("--dsn", db, "init", "b", *SHAPE, "--vocab", "300"))
    ok(run_pgllm("--dsn", db, "tokenizer", "--model", "a", "--train", "SELECT body FROM notes", "--vocab-size", "300"))
    out = ok(run_pgllm("--dsn", db, "tokenizer", "--model", "b", "--copy-from", "a")).stdout
    assert out.strip() == "copied the tokenizer of a to b: 300 tokens"
    fp = conn.execute("SELECT llm_tokenizer_fingerprint('a'), llm_tokenizer_fingerprint('b')").fetchone()
    assert fp[0] == fp[1] is not None
    assert "already has a tokenizer" in one_error(run_pgllm("--dsn", db, "tokenizer", "--model", "b",
                                                            "--copy-from", "a"))

    out = ok(run_pgllm("--dsn", db, "tokenizer", "--model", "a", "--output", str(tmp_path / "tok"))).stdout
    assert "vocab.json, merges.txt, tokenizer_config.json" in out
    vocab, merges = tokenizer_files.from_directory(tmp_path / "tok")
    assert tokenizer_files.fingerprint(vocab, merges) == fp[0]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    for text in TEXT[:4] + ["naïve café <|endoftext|> x"]:
        assert tok.encode(text) == conn.execute("SELECT llm_encode(%s, 'a')", (text,)).fetchone()[0]
    # the loaded files give the same fingerprint in the server
    ok(run_pgllm("--dsn", db, "init", "c", *SHAPE, "--vocab", "300"))
    ok(run_pgllm("--dsn", db, "tokenizer", "--model", "c", "--vocab", str(tmp_path / "tok" / "vocab.json"),
                 "--merges", str(tmp_path / "tok" / "merges.txt")))
    assert conn.execute("SELECT llm_tokenizer_fingerprint('c')").fetchone()[0] == fp[0]


# ---- Hugging Face round trip ------------------------------------------------------------------

@pytest.mark.parametrize("tokenizer", ["gpt2", "trained"])
def test_hugging_face_round_trip(conn, db, notes, tmp_path, tokenizer):
    """export --format safetensors -> AutoTokenizer + AutoModelForCausalLM agree with llm_encode and
    llm_generate; convert DIR + import bring the model back with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vocab = 50257 if tokenizer == "gpt2" else 300
    ok(run_pgllm("--dsn", db, "init", "m", *SHAPE, "--vocab", str(vocab), "--seed", "3"))
    if tokenizer == "gpt2":
        ok(run_pgllm("--dsn", db, "tokenizer", "--model", "m"))
    else:
        ok(run_pgllm("--dsn", db, "tokenizer", "--model", "m", "--train", "SELECT body FROM notes",
                     "--vocab-size", str(vocab)))
    # a little training, so that greedy decoding is not uniform noise
    ok(run_pgllm("--dsn", db, "dataset", "--query", "SELECT body FROM notes", "--model", "m", "--truncate"))
    ok(run_pgllm("--dsn", db, "train", "--model", "m", "--steps", "20", "--batch-size", "4", "--lr-max", "1e-2",
                 "--warmup", "2"))
    out = tmp_path / "hf"
    assert "with its tokenizer" in ok(run_pgllm("--dsn", db, "export", "--model", "m", "--format", "safetensors",
                                                "--output", str(out))).stdout
    eot = conn.execute("SELECT eot_id FROM llm_tokenizer_info('m')").fetchone()[0]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eot
    assert eot == (50256 if tokenizer == "gpt2" else 0)

    tok = AutoTokenizer.from_pretrained(str(out))
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert tok.eos_token_id == eot
    for prompt in ("The quick brown", "Pack my box", "Sphinx of"):
        ids = conn.execute("SELECT llm_encode(%s, 'm')", (prompt,)).fetchone()[0]
        assert tok.encode(prompt) == ids
        ours = conn.execute("SELECT llm_generate(%s, 8, temperature => 0, model => 'm')", (prompt,)).fetchone()[0]
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=eot,
                              pad_token_id=eot)[0, len(ids):].tolist()
        if eot in gen:
            gen = gen[:gen.index(eot)]
        assert tok.decode(gen) == ours

    # and back: convert the directory, import it as another model: same weights, same tokenizer
    ok(run_pgllm("convert", str(out), "--output", str(tmp_path / "back.npz")))
    ok(run_pgllm("--dsn", db, "import", str(tmp_path / "back.npz"), "--model", "back"))
    fps = conn.execute("SELECT llm_tokenizer_fingerprint('m'), llm_tokenizer_fingerprint('back')").fetchone()
    assert fps[0] == fps[1] is not None
    a, b = load_params(conn, "m"), load_params(conn, "back")
    assert all((a[k] == b[k]).all() for k in a)
    # pgllm's own checkpoint file carries the tokenizer too
    ok(run_pgllm("--dsn", db, "export", "m", "--output", str(tmp_path / "m.npz")))
    ok(run_pgllm("--dsn", db, "import", str(tmp_path / "m.npz"), "--model", "again", "--via", "client"))
    assert conn.execute("SELECT llm_tokenizer_fingerprint('again')").fetchone()[0] == fps[0]


def test_lifecycle_with_a_training_roles_rights_only(conn, db):
    """The functions run with the caller's rights: a role with `pgllm grant --train` may copy,
    rename and drop; a role without rights gets PostgreSQL's permission error and holds no lock."""
    ok(run_pgllm("--dsn", db, "init", "m", *SHAPE, "--vocab", "64"))
    write_gpt2_tokenizer(conn, "m")
    role = f"trainer_{uuid.uuid4().hex[:8]}"
    conn.execute(f'CREATE ROLE "{role}"')
    conn.execute(f'CREATE ROLE "{role}_none"')
    try:
        conn.execute(f"SELECT llm_grant('\"{role}\"', train => true)")
        conn.execute(f'SET ROLE "{role}_none"')
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT llm_model_drop('m')")
        conn.execute("RESET ROLE")
        conn.execute(f'SET ROLE "{role}"')
        conn.execute("SELECT llm_model_copy('m', 'c')")
        conn.execute("SELECT llm_model_rename('c', 'd')")
        conn.execute("SELECT llm_tokenizer_copy('m', 'd', replace => true)")
        conn.execute("SELECT llm_model_drop('d')")
        conn.execute("RESET ROLE")
        assert model_rows(conn, "d") == dict.fromkeys(model_rows(conn, "d"), 0)
        assert model_rows(conn, "m")["llm_param"] > 0
    finally:
        conn.execute("RESET ROLE")
        for r in (role, f"{role}_none"):
            conn.execute(f'DROP OWNED BY "{r}"')
            conn.execute(f'DROP ROLE "{r}"')
