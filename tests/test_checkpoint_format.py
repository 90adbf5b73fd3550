"""The checkpoint file's format marker and version, files of every earlier format, NumPy's own
.npz archives, and the one table of tensors that the server and pgllm both read."""

from __future__ import annotations

import gzip
import io

import numpy as np
import psycopg
import pytest

from pgllm import npz

from .conftest import run_pgllm
from .test_checkpoints import TINY, assert_same_tensors, db_state, records_file, server_dir, valid_records  # noqa: F401

RECORDS = valid_records(TINY, seed=4)
WANT = {name: np.frombuffer(data, "<f4").reshape(shape) for name, _, shape, data in RECORDS}


def format_record(version: int, descr: str = "<i8") -> bytes:
    return npz.record_header(npz.FORMAT_NAME, descr, (1,)) + np.array([version], descr).tobytes()


def current_file(cfg: npz.Config = TINY, records=RECORDS) -> bytes:
    """What pgllm writes today (npz.Writer)."""
    out = io.BytesIO()
    w = npz.Writer(out, cfg)
    for name, _, shape, data in records:
        w.write_raw(name, shape, data)
    w.close()
    return out.getvalue()


def test_files_of_every_format_import(conn):
    """Format 2 (with the marker), format 1 (pg_llm 0.1.0: configuration first) and the seed's
    (tensors only, into a registered model) give the same weights."""
    body = gzip.decompress(current_file())
    assert body.startswith(npz.record_header(npz.FORMAT_NAME, "<i8", (1,)))
    assert conn.execute("SELECT pg_llm_import_npz_bytes(%s, 'v2')", (current_file(),)).fetchone() == (28,)
    assert conn.execute("SELECT pg_llm_import_npz_bytes(%s, 'v1')",
                        (records_file(RECORDS, list(TINY.as_array())),)).fetchone() == (28,)
    conn.execute("INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) "
                 "VALUES ('seed', 2, 2, 8, 16, 10)")
    assert conn.execute("SELECT pg_llm_import_npz_bytes(%s, 'seed')", (records_file(RECORDS),)).fetchone() == (28,)
    for model in ("v2", "v1", "seed"):
        assert_same_tensors(db_state(conn, model), WANT)


def test_server_export_writes_the_marker_and_the_same_table_of_tensors(conn, server_dir):
    """The server's writer and pgllm's Config agree on every name, shape and their order:
    both come from ext/src/tensors.def."""
    cfg = npz.Config(3, 2, 16, 24, 40)
    conn.execute("SELECT llm_init('t', 3, 2, 16, 24, 40)")
    out = server_dir / "t.npz"
    conn.execute("SELECT pg_llm_export_npz(%s, 't')", (str(out),))
    with open(out, "rb") as f:
        server = [(name, a.shape) for name, a in npz.iter_records(f)]
    assert server[:2] == [(npz.FORMAT_NAME, (1,)), (npz.CONFIG_NAME, (5,))]
    assert server[2:] == cfg.tensors()
    shapes = dict(conn.execute("SELECT name, shape FROM llm_param WHERE model = 't'").fetchall())
    assert {name: tuple(shape) for name, shape in shapes.items()} == dict(cfg.tensors())


BAD = {
    "newer format": (gzip.compress(format_record(npz.FORMAT_VERSION + 1) + gzip.decompress(records_file(RECORDS, list(TINY.as_array())))),
                     psycopg.errors.FeatureNotSupported, f"checkpoint file of format {npz.FORMAT_VERSION + 1}, newer than this pg_llm reads"),
    "format 1 marker": (gzip.compress(format_record(1) + gzip.decompress(records_file(RECORDS, list(TINY.as_array())))),
                        psycopg.errors.DataCorrupted, "invalid format version 1"),
    "marker of floats": (gzip.compress(format_record(2, "<f8") + gzip.decompress(records_file(RECORDS, list(TINY.as_array())))),
                         psycopg.errors.DataCorrupted, "must be one integer"),
    "marker after the configuration": (gzip.compress(gzip.decompress(records_file([], list(TINY.as_array()))) + format_record(2)
                                                     + gzip.decompress(records_file(RECORDS))),
                                       psycopg.errors.DataCorrupted, "must be the first record"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_markers_are_refused(conn, case):
    data, error, message = BAD[case]
    with pytest.raises(error, match=message):
        conn.execute("SELECT pg_llm_import_npz_bytes(%s, 'm')", (data,))
    assert conn.execute("SELECT count(*) FROM llm_model_config WHERE model = 'm'").fetchone() == (0,)


def test_pgllm_reads_what_the_server_reads(tmp_path):
    """pgllm's reader takes every format the server takes and refuses what it refuses."""
    for name, data in (("v2", current_file()), ("v1", records_file(RECORDS, list(TINY.as_array())))):
        (tmp_path / name).write_bytes(data)
        cfg, tensors = npz.read_file(tmp_path / name)
        assert cfg == TINY
        assert_same_tensors(tensors, WANT)
    (tmp_path / "newer").write_bytes(BAD["newer format"][0])
    with pytest.raises(npz.FormatError, match="newer than this pgllm reads"):
        npz.read_file(tmp_path / "newer")


def test_numpy_archives_are_refused_and_converted(cli, conn, db, tmp_path, monkeypatch):
    """np.savez writes zip archives: the server says what the file is and how to convert it;
    pgllm convert reads them (a state dict of arrays, no torch needed) and the result imports."""
    path = tmp_path / "weights.npz"
    np.savez(path, **{f"transformer.{name}" + (".weight" if name in ("wte", "wpe") else ""): a for name, a in WANT.items()})
    with pytest.raises(psycopg.errors.DataException) as e:
        conn.execute("SELECT pg_llm_import_npz_bytes(%s, 'm')", (path.read_bytes(),))
    assert e.value.diag.message_primary == \
        "the checkpoint data is a NumPy .npz archive (a zip file), not a pg_llm checkpoint file"
    assert "pgllm convert" in e.value.diag.message_hint
    proc = run_pgllm("--dsn", db, "import", str(path), "--model", "m")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"Error: {path} is a NumPy .npz archive") and "pgllm convert" in lines[0]

    monkeypatch.chdir(tmp_path)  # the default output beside the source must not overwrite it
    result = cli("convert", "weights.npz", "--n-head", "2")
    assert result.exit_code == 0, result.output
    assert cli("--dsn", db, "import", "weights.pgllm.npz", "--model", "m").exit_code == 0
    assert_same_tensors(db_state(conn, "m"), WANT)
