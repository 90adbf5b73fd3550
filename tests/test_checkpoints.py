"""Checkpoints: convert, import, export, init and in-database snapshots.

References are real transformers GPT2LMHeadModel objects built locally (no Hub). Round trips
must be bit-exact: tensors compared with array_equal, logits with torch.equal.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgllm import npz
from pgllm.cluster import is_root
from pgllm.commands.convert import default_output

from .conftest import run_pgllm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


# ---- helpers -----------------------------------------------------------------------------------

def hf_model(n_layer, n_head, d_model, n_positions, vocab, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=d_model, n_positions=n_positions,
                                  vocab_size=vocab, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    return transformers.GPT2LMHeadModel(cfg).eval()


def hf_state(model) -> dict[str, np.ndarray]:
    """The model's parameters under pg_llm's names (lm_head is tied to wte)."""
    out = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        name = key.removeprefix("transformer.")
        out[name.removesuffix(".weight") if name in ("wte.weight", "wpe.weight") else name] = value.numpy().copy()
    return out


def db_state(conn, model: str) -> dict[str, np.ndarray]:
    rows = conn.execute("SELECT name, shape, data FROM llm_param WHERE model = %s", (model,), binary=True).fetchall()
    return {name: np.frombuffer(data, "<f4").reshape(shape) for name, shape, data in rows}


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert np.array_equal(got[name], want[name]), name


def records_file(records, config=None, compress=False) -> bytes:
    """A checkpoint file from raw records [(name, descr, shape, data bytes)], to build bad files."""
    body = b""
    if config is not None:
        body += npz.record_header(npz.CONFIG_NAME, "<i8", (5,)) + np.array(config, "<i8").tobytes()
    for name, descr, shape, data in records:
        body += npz.record_header(name, descr, shape) + data
    return gzip.compress(body, compresslevel=6 if compress else 0, mtime=0)


def valid_records(cfg: npz.Config, seed=0):
    rng = np.random.default_rng(seed)
    return [(name, "<f4", shape, rng.standard_normal(shape).astype("<f4").tobytes()) for name, shape in cfg.tensors()]


TINY = npz.Config(2, 2, 8, 16, 10)


@pytest.fixture
def server_dir():
    """A directory the server's OS user can read and write (tmp_path is private when we are root)."""
    d = Path(tempfile.mkdtemp(prefix="pgllm-ckpt-", dir="/tmp"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def logits(model, vocab, n_positions, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, min(n_positions, 12)), generator=g)
    with torch.no_grad():
        return model(ids).logits


def round_trip(cli, conn, db, ref, cfg: npz.Config, source: Path, tmp_path: Path, server_dir: Path,
               convert_args=()) -> None:
    """convert -> import -> export (npz, safetensors, server-side npz) -> compare with the reference."""
    want = hf_state(ref)
    out = tmp_path / "model.npz"
    result = cli("convert", str(source), "--output", str(out), *convert_args)
    assert result.exit_code == 0, result.output
    file_cfg, file_tensors = npz.read_file(out)
    assert file_cfg == cfg
    assert_same_tensors(file_tensors, want)

    result = cli("--dsn", db, "import", str(out), "--model", "m")
    assert result.exit_code == 0, result.output
    assert "imported %d tensors into model 'm' (registered" % (4 + 12 * cfg.n_layer) in result.output
    assert_same_tensors(db_state(conn, "m"), want)

    result = cli("--dsn", db, "export", "m", "--output", str(tmp_path / "back.npz"))
    assert result.exit_code == 0, result.output
    back_cfg, back = npz.read_file(tmp_path / "back.npz")
    assert back_cfg == cfg
    assert_same_tensors(back, want)

    conn.execute("SELECT pg_llm_export_npz(%s, 'm')", (str(server_dir / "server.npz"),))
    server_cfg, server = npz.read_file(server_dir / "server.npz")
    assert server_cfg == cfg
    assert_same_tensors(server, want)

    hf_dir = tmp_path / "hf"
    result = cli("--dsn", db, "export", "m", "--output", str(hf_dir), "--format", "safetensors")
    assert result.exit_code == 0, result.output
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    loaded.eval()
    ref_sd, loaded_sd = ref.state_dict(), loaded.state_dict()
    assert sorted(ref_sd) == sorted(loaded_sd)
    for key in ref_sd:
        assert torch.equal(ref_sd[key], loaded_sd[key]), key
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied
    assert torch.equal(logits(ref, cfg.vocab, cfg.n_positions), logits(loaded, cfg.vocab, cfg.n_positions))


# ---- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,source", [
    ((1, 1, 8, 8, 11), "dir"),
    ((2, 4, 32, 64, 97), "safetensors"),
    ((3, 2, 24, 16, 301), "bin"),
])
def test_round_trip(cli, conn, db, tmp_path, server_dir, shape, source):
    """HF model -> convert -> import -> export (npz and safetensors) -> identical tensors and logits."""
    ref = hf_model(*shape, seed=sum(shape))
    cfg = npz.Config(*shape)
    hf_dir = tmp_path / "src"
    ref.save_pretrained(hf_dir)
    args = ()
    if source == "dir":
        path = hf_dir
    elif source == "safetensors":
        path = hf_dir / "model.safetensors"  # config.json beside it gives n_head
    else:
        path = tmp_path / "weights.bin"
        torch.save(ref.state_dict(), path)  # includes lm_head.weight, tied
        args = ("--n-head", str(cfg.n_head))  # a bare .bin does not say
    round_trip(cli, conn, db, ref, cfg, path, tmp_path, server_dir, args)


@pytest.mark.slow
def test_round_trip_gpt2_small(cli, conn, db, tmp_path, server_dir):
    """The same on a GPT-2-small-shaped model: 124M parameters."""
    ref = hf_model(12, 12, 768, 1024, 50257, seed=3)
    ref.save_pretrained(tmp_path / "src")
    round_trip(cli, conn, db, ref, npz.Config(12, 12, 768, 1024, 50257), tmp_path / "src", tmp_path, server_dir)


def test_float16_source_is_converted_to_float32(cli, tmp_path):
    ref = hf_model(1, 2, 16, 8, 13, seed=5).half()
    ref.save_pretrained(tmp_path / "src")
    result = cli("convert", str(tmp_path / "src"), "-o", str(tmp_path / "f.npz"))
    assert result.exit_code == 0, result.output
    _, tensors = npz.read_file(tmp_path / "f.npz")
    want = {k: v.astype(np.float32) for k, v in hf_state(ref).items()}
    assert all(t.dtype == np.float32 for t in tensors.values())
    assert_same_tensors(tensors, want)


def test_default_output_names(cli, tmp_path, monkeypatch):
    assert default_output("gpt2").name == "gpt2-small.npz"
    assert default_output("openai-community/gpt2-medium").name == "gpt2-medium.npz"
    hf_model(1, 1, 8, 8, 11).save_pretrained(tmp_path / "my-model")
    monkeypatch.chdir(tmp_path)
    result = cli("convert", "my-model")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "my-model.npz").exists()
    assert default_output(str(tmp_path / "my-model" / "model.safetensors")).name == "my-model.npz"


# ---- import routes and the seed's flow --------------------------------------------------------

def test_import_routes(cli, conn, db, tmp_path, server_dir):
    """The server reads files it can see; otherwise the bytes go over the connection. Same result."""
    (server_dir / "t.npz").write_bytes(records_file(valid_records(TINY), config=list(TINY.as_array())))
    (server_dir / "t.npz").chmod(0o644)
    result = cli("--dsn", db, "import", str(server_dir / "t.npz"), "--model", "a", "--via", "server")
    assert result.exit_code == 0 and "the server read the file" in result.output, result.output
    result = cli("--dsn", db, "import", str(server_dir / "t.npz"), "--model", "b", "--via", "client")
    assert result.exit_code == 0 and "sent 0.0 MB" in result.output, result.output
    private = tmp_path / "t.npz"
    shutil.copy(server_dir / "t.npz", private)
    result = cli("--dsn", db, "import", str(private), "--model", "c")
    assert result.exit_code == 0, result.output
    # as root the server runs as postgres and cannot enter pytest's private tmp_path
    assert ("sent" if is_root() else "the server read the file") in result.output
    a, b, c = (db_state(conn, m) for m in "abc")
    assert_same_tensors(b, a)
    assert_same_tensors(c, a)
    assert len(a) == 28


def test_seed_flow_without_configuration_record(conn, server_dir):
    """A file with no configuration record imports into a model whose row the user inserted first."""
    path = server_dir / "seed.npz"
    path.write_bytes(records_file(valid_records(TINY)))
    path.chmod(0o644)
    with pytest.raises(psycopg.errors.UndefinedObject, match='model "custom" does not exist') as e:
        conn.execute("SELECT pg_llm_import_npz(%s, 'custom')", (str(path),))
    assert "llm_model_config" in e.value.diag.message_hint
    conn.execute("INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) "
                 "VALUES ('custom', 2, 2, 8, 16, 10)")
    assert conn.execute("SELECT pg_llm_import_npz(%s, 'custom')", (str(path),)).fetchone() == (28,)
    want = {name: np.frombuffer(data, "<f4").reshape(shape) for name, _, shape, data in valid_records(TINY)}
    assert_same_tensors(db_state(conn, "custom"), want)
    # a configuration record, when there is one, comes first
    late = records_file(valid_records(TINY)[:1]) + records_file([], config=list(TINY.as_array()))
    with pytest.raises(psycopg.errors.DataCorrupted, match="must come before the tensors"):
        conn.execute("SELECT pg_llm_import_npz_bytes(%s, 'custom', true)", (late,))
    assert_same_tensors(db_state(conn, "custom"), want)


def test_replace_is_explicit_and_starts_afresh(cli, conn, db, tmp_path):
    path = tmp_path / "t.npz"
    path.write_bytes(records_file(valid_records(TINY), config=list(TINY.as_array())))
    assert cli("--dsn", db, "import", str(path), "--model", "m").exit_code == 0
    conn.execute("INSERT INTO llm_optim_state SELECT model, name, data, data FROM llm_param WHERE model = 'm'")
    conn.execute("INSERT INTO llm_train_state (model, step, data_pos) VALUES ('m', 3, 99)")
    conn.execute("INSERT INTO llm_train_log (model, step, lr, loss) VALUES ('m', 1, 0.1, 2.0)")
    proc = run_pgllm("--dsn", db, "import", str(path), "--model", "m")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert 'model "m" already has weights' in proc.stderr and "--replace" in proc.stderr
    path.write_bytes(records_file(valid_records(TINY, seed=9), config=list(TINY.as_array())))
    result = cli("--dsn", db, "import", str(path), "--model", "m", "--replace")
    assert result.exit_code == 0, result.output
    want = {name: np.frombuffer(data, "<f4").reshape(shape) for name, _, shape, data in valid_records(TINY, seed=9)}
    assert_same_tensors(db_state(conn, "m"), want)
    for table in ("llm_optim_state", "llm_train_state", "llm_train_log"):
        assert conn.execute(f"SELECT count(*) FROM {table} WHERE model = 'm'").fetchone() == (0,), table
    # another architecture under the same name: refused without replace, the model replaced with it
    # (its snapshots of the old shape too, which could not be loaded any more)
    conn.execute("SELECT llm_checkpoint_save('m', 'old shape')")
    other = npz.Config(2, 2, 16, 16, 10)
    path.write_bytes(records_file(valid_records(other), config=list(other.as_array())))
    with pytest.raises(psycopg.errors.DataException, match='do not fit model "m"') as e:
        conn.execute("SELECT pg_llm_import_npz_bytes(%s, 'm', false)", (path.read_bytes(),))
    assert "d_model=8" in e.value.diag.message_detail and "d_model=16" in e.value.diag.message_detail
    assert "replace => true" in e.value.diag.message_hint
    assert_same_tensors(db_state(conn, "m"), want)
    conn.execute("SELECT pg_llm_import_npz_bytes(%s, 'm', true)", (path.read_bytes(),))
    assert conn.execute("SELECT n_layer, n_head, d_model, n_positions, vocab FROM llm_model_config "
                        "WHERE model = 'm'").fetchone() == (2, 2, 16, 16, 10)
    assert_same_tensors(db_state(conn, "m"), {name: np.frombuffer(data, "<f4").reshape(shape)
                                              for name, _, shape, data in valid_records(other)})
    assert conn.execute("SELECT count(*) FROM llm_checkpoint WHERE model = 'm'").fetchone() == (0,)


# ---- bad input ---------------------------------------------------------------------------------

def _mutate(records, name, **change):
    return [(n, change.get("descr", d), change.get("shape", s), change.get("data", b)) if n == name else (n, d, s, b)
            for n, d, s, b in records]


def wte_at_start(body: bytes) -> bytes:
    """The records of a decompressed file from the first tensor on (without the configuration)."""
    return body[body.index(b"\x03\x00wte"):]


def in_wte(body: bytes, old: bytes, new: bytes) -> bytes:
    """The decompressed file with `old` replaced by `new` once, in wte's record."""
    at = body.index(b"\x03\x00wte")
    return body[:at] + body[at:].replace(old, new, 1)


def _bad_files():
    cfg = list(TINY.as_array())
    good = valid_records(TINY)
    ok = records_file(good, cfg)
    wte = dict((n, b) for n, _, _, b in good)["wte"]
    nan = np.frombuffer(wte, "<f4").copy()
    nan[3] = np.nan
    inf = nan.copy()
    inf[3] = -np.inf
    stored = bytearray(ok)
    stored[len(ok) // 2] ^= 0x40  # inside a stored block: only the CRC can tell
    npy_v2_huge = (3).to_bytes(2, "little") + b"wte" + b"\x93NUMPY\x02\x00" + (1 << 31).to_bytes(4, "little")
    body = gzip.decompress(ok)
    return {
        "truncated gzip": (ok[: len(ok) - 100], "is truncated"),
        "corrupt gzip": (bytes(stored), "not valid gzip data: incorrect data check"),
        "not gzip": (b"\x00\x01" + ok, "is not a pg_llm checkpoint file"),
        "a zip file": (b"PK\x03\x04" + ok, "is a NumPy .npz archive (a zip file), not a pg_llm checkpoint file"),
        "trailing garbage": (ok + b"\x00\x01garbage", "not valid gzip data"),
        "empty": (b"", "is empty"),
        "huge name": (gzip.compress(b"\xff\xff" + body), "record name of 65535 bytes"),
        "huge header": (gzip.compress(npy_v2_huge + body), "has a .npy header of 2147483648 bytes"),
        "lying header": (gzip.compress(body[: body.index(b"wpe") - 2 - 40]), 'in record "wte"'),
        "bad npy magic": (gzip.compress(in_wte(body, b"\x93NUMPY", b"\x93NUMPX")), 'record "wte" is not a .npy array'),
        "float64": (records_file(_mutate(good, "wte", descr="<f8", data=wte * 2), cfg), """tensor "wte" has dtype '<f8'"""),
        "int16": (records_file(_mutate(good, "h.1.ln_2.bias", descr="<i2", data=b"\0" * 16), cfg),
                  """tensor "h.1.ln_2.bias" has dtype '<i2'"""),
        "float16": (records_file(_mutate(good, "wpe", descr="<f2", data=b"\0" * 256), cfg), """tensor "wpe" has dtype '<f2'"""),
        "big-endian": (records_file(_mutate(good, "wpe", descr=">f4"), cfg), """tensor "wpe" has dtype '>f4'"""),
        "fortran order": (gzip.compress(in_wte(body, b"'fortran_order': False", b"'fortran_order': True ")),
                          'tensor "wte" is in Fortran order'),
        "wrong shape": (records_file(_mutate(good, "h.0.attn.c_attn.weight", shape=(24, 8)), cfg),
                        'tensor "h.0.attn.c_attn.weight" has shape (24, 8), expected (8, 24)'),
        "missing tensor": (records_file(good[:-1], cfg), 'tensor "ln_f.bias" is missing'),
        "unknown tensor": (records_file(good + [("h.2.ln_1.weight", "<f4", (8,), b"\0" * 32)], cfg),
                           'unknown tensor "h.2.ln_1.weight"'),
        "duplicate tensor": (records_file(good + good[-1:], cfg), 'tensor "ln_f.bias" appears twice'),
        "nan": (records_file(_mutate(good, "wte", data=nan.tobytes()), cfg), 'tensor "wte" contains NaN at index 3'),
        "inf": (records_file(_mutate(good, "wte", data=inf.tobytes()), cfg), 'tensor "wte" contains an infinite value at index 3'),
        "config of floats": (gzip.compress(npz.record_header(npz.CONFIG_NAME, "<f4", (5,)) + bytes(20) + wte_at_start(body)),
                             "must be 5 integers"),
        "bad config": (records_file(good, [2, 3, 8, 16, 10]), "n_head must divide d_model"),
        "absurd config": (records_file(good, [2, 2, 8, 16, 1 << 40]), "invalid value 1099511627776"),
        "unknown model": (records_file(good), 'model "m" does not exist'),
        "no tensors": (records_file([], cfg), 'tensor "wte" is missing'),
    }


BAD = _bad_files()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_are_refused(conn, case):
    data, message = BAD[case]
    start = conn.execute("SELECT pg_postmaster_start_time(), pg_backend_pid()").fetchone()
    with pytest.raises(psycopg.errors.DatabaseError) as e:
        conn.execute("SELECT pg_llm_import_npz_bytes(%s, 'm')", (data,))
    assert message in str(e.value), str(e.value)
    assert not isinstance(e.value, psycopg.OperationalError)
    # nothing half-imported, nothing registered, the same server and backend
    assert conn.execute("SELECT count(*) FROM llm_param WHERE model = 'm'").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM llm_model_config WHERE model = 'm'").fetchone() == (0,)
    assert conn.execute("SELECT pg_postmaster_start_time(), pg_backend_pid()").fetchone() == start


def test_bad_file_through_the_command_is_one_line(db, tmp_path):
    path = tmp_path / "nan.npz"
    path.write_bytes(BAD["nan"][0])
    proc = run_pgllm("--dsn", db, "import", str(path), "--model", "m", "--via", "client")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ['Error: tensor "wte" contains NaN at index 3'], proc.stderr
    proc = run_pgllm("--dsn", db, "import", str(tmp_path / "absent.npz"))
    assert proc.returncode == 1 and "absent.npz: no such file" in proc.stderr


@pytest.mark.parametrize("model", ["x'); DROP TABLE llm_param; --", 'we"ird \\ name', "ünï 模型"])
def test_model_names_are_data(cli, conn, db, tmp_path, model):
    path = tmp_path / "t.npz"
    path.write_bytes(records_file(valid_records(TINY), config=list(TINY.as_array())))
    assert cli("--dsn", db, "import", str(path), "--model", model).exit_code == 0
    assert len(db_state(conn, model)) == 28
    result = cli("--dsn", db, "export", model, "--output", str(tmp_path / "e.npz"))
    assert result.exit_code == 0, result.output
    assert_same_tensors(npz.read_file(tmp_path / "e.npz")[1], db_state(conn, model))
    assert cli("--dsn", db, "checkpoint", "save", "--model", model).exit_code == 0
    assert cli("--dsn", db, "checkpoint", "load", "1").exit_code == 0
    assert conn.execute("SELECT to_regclass('llm_param') IS NOT NULL").fetchone() == (True,)


@pytest.mark.parametrize("model,message", [("bad\nname", "control characters"), ("x" * 201, "1 to 200 bytes"),
                                           ("", "1 to 200 bytes")])
def test_invalid_model_names(conn, model, message):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
        conn.execute("SELECT pg_llm_import_npz_bytes(%s, %s)", (BAD["nan"][0], model))


# ---- privileges --------------------------------------------------------------------------------

@pytest.fixture
def plain_role(conn, db):
    """A login role that may use pg_llm's tables but is no superuser; its DSN."""
    role = f"pgllm_user_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN")
    conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
    conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    yield role, make_conninfo(db, user=role)
    conn.execute(f"DROP OWNED BY {role}")
    conn.execute(f"DROP ROLE {role}")


def test_server_files_need_the_roles(cli, conn, plain_role, server_dir, tmp_path):
    role, dsn = plain_role
    path = server_dir / "t.npz"
    path.write_bytes(records_file(valid_records(TINY), config=list(TINY.as_array())))
    path.chmod(0o644)
    with psycopg.connect(dsn, autocommit=True) as user:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for function pg_llm_import_npz"):
            user.execute("SELECT pg_llm_import_npz(%s, 'm')", (str(path),))
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for function pg_llm_export_npz"):
            user.execute("SELECT pg_llm_export_npz(%s, 'm')", (str(server_dir / "out.npz"),))
        # granted the function but not the role: the function itself refuses
        conn.execute(f"GRANT EXECUTE ON FUNCTION pg_llm_import_npz(text, text, boolean) TO {role}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied to read files on the server") as e:
            user.execute("SELECT pg_llm_import_npz(%s, 'm')", (str(path),))
        assert "pgllm import" in e.value.diag.message_hint
        conn.execute(f"REVOKE EXECUTE ON FUNCTION pg_llm_import_npz(text, text, boolean) FROM {role}")
    # pgllm import sends the bytes instead; pgllm export writes on the client
    result = cli("--dsn", dsn, "import", str(path), "--model", "m")
    assert result.exit_code == 0 and "sent" in result.output, result.output
    result = cli("--dsn", dsn, "export", "m", "--output", str(tmp_path / "e.npz"))
    assert result.exit_code == 0, result.output
    assert_same_tensors(npz.read_file(tmp_path / "e.npz")[1], db_state(conn, "m"))
    # a member of pg_read_server_files may read what the server's OS user can read, and no more
    conn.execute(f"GRANT pg_read_server_files TO {role}")
    result = cli("--dsn", dsn, "import", str(path), "--model", "m2", "--via", "server")
    assert result.exit_code == 0 and "the server read the file" in result.output, result.output
    path.chmod(0o000)
    with psycopg.connect(dsn, autocommit=True) as user:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="could not open file .*Permission denied"):
            user.execute("SELECT pg_llm_import_npz(%s, 'm3')", (str(path),))
        assert user.execute("SELECT count(*) FROM llm_model_config WHERE model = 'm3'").fetchone() == (0,)


# ---- init --------------------------------------------------------------------------------------

def test_init_follows_gpt2(cli, conn, db, tmp_path):
    """Weights as GPT2LMHeadModel initialises them, reproducible from the seed, loadable by HF."""
    result = cli("--dsn", db, "init", "fresh", "--n-layer", "2", "--n-head", "4", "--d-model", "128",
                 "--n-positions", "64", "--vocab", "1000", "--seed", "11")
    assert result.exit_code == 0, result.output
    assert f"initialised model 'fresh': {npz.Config(2, 4, 128, 64, 1000).num_params():,} parameters" in result.output
    ours = db_state(conn, "fresh")
    ref = hf_state(hf_model(2, 4, 128, 64, 1000, seed=0))
    assert sorted(ours) == sorted(ref)
    for name, want in ref.items():
        got = ours[name]
        assert got.shape == want.shape, name
        if want.std() == 0:  # biases 0, LayerNorm weights 1
            assert np.array_equal(got, want), name
        else:  # same distribution: std within 3% on >= 16k values, mean near 0
            assert abs(got.std() / want.std() - 1) < 0.03, (name, got.std(), want.std())
            assert abs(got.mean()) < 4 * want.std() / np.sqrt(got.size), name
    assert abs(ours["h.0.attn.c_proj.weight"].std() - 0.02 / np.sqrt(4)) < 0.0005
    assert abs(ours["h.1.mlp.c_fc.weight"].std() - 0.02) < 0.0005

    # the same seed gives the same bytes; another seed others
    assert cli("--dsn", db, "init", "again", "--n-layer", "2", "--n-head", "4", "--d-model", "128",
               "--n-positions", "64", "--vocab", "1000", "--seed", "11").exit_code == 0
    assert_same_tensors(db_state(conn, "again"), ours)
    assert cli("--dsn", db, "init", "again", "--seed", "12", "--replace").exit_code == 0
    assert not np.array_equal(db_state(conn, "again")["wte"], ours["wte"])

    # trainable by Hugging Face too: the exported directory loads
    result = cli("--dsn", db, "export", "fresh", "-o", str(tmp_path / "hf"), "--format", "safetensors")
    assert result.exit_code == 0, result.output
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert np.array_equal(loaded.transformer.wte.weight.detach().numpy(), ours["wte"])


def test_init_takes_the_architecture_from_the_config_row(cli, conn, db):
    conn.execute("INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) "
                 "VALUES ('row', 1, 2, 16, 8, 50)")
    result = cli("--dsn", db, "init", "row")
    assert result.exit_code == 0, result.output
    assert len(db_state(conn, "row")) == 16
    proc = run_pgllm("--dsn", db, "init", "nothing", "--n-layer", "2")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ['Error: model "nothing" does not exist, so n_head is needed '
                                                "(Give the whole architecture: n_layer, n_head, d_model, n_positions and vocab.)"]


# ---- snapshots ---------------------------------------------------------------------------------

def test_checkpoint_commands_restore_exactly(cli, conn, db):
    assert cli("--dsn", db, "init", "m", "--n-layer", "1", "--n-head", "2", "--d-model", "16",
               "--n-positions", "8", "--vocab", "50").exit_code == 0
    conn.execute("INSERT INTO llm_optim_state SELECT model, name, data, data FROM llm_param WHERE model = 'm'")
    conn.execute("INSERT INTO llm_train_state (model, step, data_pos) VALUES ('m', 4, 4096)")
    saved = conn.execute("SELECT name, data, m, v FROM llm_param JOIN llm_optim_state USING (model, name) "
                         "WHERE model = 'm' ORDER BY name").fetchall()
    result = cli("--dsn", db, "checkpoint", "save", "--model", "m", "--note", "before 'the' change")
    assert result.exit_code == 0 and "saved checkpoint 1 of model 'm' at step 4" in result.output, result.output

    conn.execute("UPDATE llm_param SET data = data || '\\x00'::bytea WHERE model = 'm'")
    conn.execute("UPDATE llm_optim_state SET m = v || '\\x01'::bytea WHERE model = 'm'")
    conn.execute("UPDATE llm_train_state SET step = 9 WHERE model = 'm'")
    result = cli("--dsn", db, "checkpoint", "list")
    assert result.exit_code == 0
    assert result.output.splitlines()[1].split()[:3] == ["1", "m", "4"]
    assert "before 'the' change" in result.output
    result = cli("--dsn", db, "checkpoint", "load", "1")
    assert result.exit_code == 0 and "loaded checkpoint 1 into model 'm': step 4" in result.output, result.output
    assert conn.execute("SELECT name, data, m, v FROM llm_param JOIN llm_optim_state USING (model, name) "
                        "WHERE model = 'm' ORDER BY name").fetchall() == saved
    assert conn.execute("SELECT step, data_pos FROM llm_train_state WHERE model = 'm'").fetchone() == (4, 4096)

    result = cli("--dsn", db, "checkpoint", "delete", "1")
    assert result.exit_code == 0 and "deleted checkpoint 1" in result.output
    assert cli("--dsn", db, "checkpoint", "list").output.strip() == "no checkpoints"
    proc = run_pgllm("--dsn", db, "checkpoint", "load", "1")
    assert proc.returncode == 1 and proc.stderr.startswith("Error: checkpoint 1 does not exist")


# ---- convert and export refusals ---------------------------------------------------------------

def _state_file(tmp_path, change):
    from safetensors.torch import save_file
    state = {k: v.clone() for k, v in hf_model(1, 2, 16, 8, 13).state_dict().items() if k != "lm_head.weight"}
    change(state)
    save_file(state, tmp_path / "w.safetensors")
    return tmp_path / "w.safetensors"


@pytest.mark.parametrize("change,message", [
    (lambda s: s.update({"transformer.h.0.extra": torch.zeros(3)}), "a tensor pg_llm does not know: 'h.0.extra'"),
    (lambda s: s.pop("transformer.ln_f.bias"), "lacks tensor 'ln_f.bias'"),
    (lambda s: s.update({"lm_head.weight": torch.ones(13, 16)}), "lm_head.weight that differs from wte"),
    (lambda s: s["transformer.h.0.mlp.c_fc.bias"].__setitem__(2, float("nan")), "tensor 'h.0.mlp.c_fc.bias' contains NaN"),
    (lambda s: s.update({"transformer.wpe.weight": torch.zeros(9, 16)}), "tensor 'wpe' has shape (9, 16), expected (8, 16)"),
])
def test_convert_refuses(db, tmp_path, change, message):
    path = _state_file(tmp_path, change)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16,
                                                      "n_positions": 8, "vocab_size": 13}))
    proc = run_pgllm("convert", str(path), "-o", str(tmp_path / "out.npz"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not (tmp_path / "out.npz").exists() and not (tmp_path / "out.npz.part").exists()


def test_convert_refuses_other_models_and_sources(tmp_path):
    hf_model(1, 2, 16, 8, 13).save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    proc = run_pgllm("convert", str(tmp_path / "m"))
    assert proc.returncode == 1 and "activation_function='relu'" in proc.stderr
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    assert "is a 'llama' model, not GPT-2" in run_pgllm("convert", str(tmp_path / "m")).stderr
    (tmp_path / "w.txt").write_text("x")
    assert "unknown kind of file" in run_pgllm("convert", str(tmp_path / "w.txt")).stderr


def test_convert_model_ids_from_the_cache(cli, tmp_path):
    """A model id loads through transformers, offline, from the Hugging Face cache."""
    ref = hf_model(1, 2, 16, 8, 13, seed=4)
    repo = tmp_path / "hf-home" / "hub" / "models--pgllm-test--tiny-gpt2"
    ref.save_pretrained(repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    out = tmp_path / "cached.npz"
    proc = run_pgllm("convert", "pgllm-test/tiny-gpt2", "-o", str(out), env={"HF_HOME": str(tmp_path / "hf-home")})
    assert proc.returncode == 0 and not proc.stderr, proc.stderr  # the Hub was not asked
    cfg, tensors = npz.read_file(out)
    assert cfg == npz.Config(1, 2, 16, 8, 13)
    assert_same_tensors(tensors, hf_state(ref))
    result = cli("convert", "pgllm-test/no such model", "-o", str(tmp_path / "none.npz"))
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: cannot load 'pgllm-test/no such model'"), result.stderr


def test_export_refuses_incomplete_models(cli, conn, db, tmp_path):
    assert cli("--dsn", db, "init", "m", "--n-layer", "1", "--n-head", "1", "--d-model", "8",
               "--n-positions", "8", "--vocab", "11").exit_code == 0
    conn.execute("DELETE FROM llm_param WHERE model = 'm' AND name = 'h.0.mlp.c_fc.bias'")
    for fmt in ("npz", "safetensors"):
        proc = run_pgllm("--dsn", db, "export", "m", "-o", str(tmp_path / f"out-{fmt}"), "--format", fmt)
        assert proc.returncode == 1 and "no weights for tensor 'h.0.mlp.c_fc.bias'" in proc.stderr, proc.stderr
    assert not (tmp_path / "out-npz").exists()
    assert not (tmp_path / "out-safetensors" / "model.safetensors").exists()
    with pytest.raises(psycopg.errors.NoDataFound, match='no weights for tensor "h.0.mlp.c_fc.bias"'):
        conn.execute("SELECT pg_llm_export_npz('/tmp/pgllm-never-written.npz', 'm')")
    assert not Path("/tmp/pgllm-never-written.npz").exists()
    proc = run_pgllm("--dsn", db, "export", "nobody", "-o", str(tmp_path / "x.npz"))
    assert proc.returncode == 1 and 'model "nobody" does not exist' in proc.stderr


def test_compressed_files_import_too(conn):
    """Files from other gzip writers import the same: real deflate, and many small members."""
    data = records_file(valid_records(TINY), list(TINY.as_array()), compress=True)
    assert conn.execute("SELECT pg_llm_import_npz_bytes(%s, 'z')", (data,)).fetchone() == (28,)
    body = gzip.decompress(data)
    members = b"".join(gzip.compress(body[i:i + 100], mtime=0) for i in range(0, len(body), 100))
    assert conn.execute("SELECT pg_llm_import_npz_bytes(%s, 'z2')", (members,)).fetchone() == (28,)
    assert_same_tensors(db_state(conn, "z2"), db_state(conn, "z"))
