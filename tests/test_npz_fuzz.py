"""Fuzzing the importer: hundreds of mutations of a valid checkpoint file.

Every mutated file is either refused with an error that names a cause (never an internal
error, never a lost connection) and leaves nothing behind, or, when the mutation happened to be
harmless, imports exactly the original tensors. The server and the backend survive it all.
"""

from __future__ import annotations

import gzip
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import psycopg
import pytest

from pgllm import npz

from .test_checkpoints import TINY, db_state, records_file, valid_records

SEED = 20261124
CONFIG = list(TINY.as_array())
RECORDS = valid_records(TINY, seed=1)
WANT = {name: np.frombuffer(data, "<f4").reshape(shape) for name, _, shape, data in RECORDS}
# Causes a refusal may report; anything else (XX000 internal error, a lost connection) is a bug.
EXPECTED_STATES = {"XX001", "22000", "22023", "42704", "P0002", "42710", "54000"}


def body_and_headers(records=RECORDS, config=CONFIG):
    """The decompressed file, and where each record's header (name length .. end of .npy header) lies."""
    body, spans = b"", []
    for name, descr, shape, data in [(npz.CONFIG_NAME, "<i8", (5,), np.array(config, "<i8").tobytes())] + records:
        header = npz.record_header(name, descr, shape)
        spans.append((name, len(body), len(body) + len(header)))
        body += header + data
    return body, spans


def with_header(records, index, descr=None, shape=None, fortran=False):
    """The records with record `index`'s .npy header rewritten (its data kept)."""
    out = list(records)
    name, d, s, data = out[index]
    out[index] = (name, descr or d, shape if shape is not None else s, data)
    body, spans = body_and_headers(out)
    if fortran:
        _, start, end = spans[index + 1]
        body = body[:start] + body[start:end].replace(b"False", b"True ", 1) + body[end:]
    return body


def mutations(rng: random.Random):
    """(kind, file bytes) — 250 of them."""
    stored = records_file(RECORDS, CONFIG)
    deflated = records_file(RECORDS, CONFIG, compress=True)
    body, spans = body_and_headers()
    for _ in range(50):  # truncation at a random offset
        base = rng.choice((stored, deflated))
        yield "truncate", base[:rng.randrange(len(base))]
    for _ in range(50):  # a flipped bit anywhere in the compressed file
        base = bytearray(rng.choice((stored, deflated)))
        base[rng.randrange(len(base))] ^= 1 << rng.randrange(8)
        yield "flip compressed", bytes(base)
    for _ in range(60):  # a flipped bit in a record's name or .npy header
        name, start, end = rng.choice(spans)
        mutated = bytearray(body)
        mutated[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
        yield "flip header", gzip.compress(bytes(mutated), compresslevel=rng.choice((0, 6)), mtime=0)
    shapes = [(), (0,), (1,), (8, 8), (10, 8, 1), (2**31 - 1,), (2**31 - 1, 2**31 - 1), (65536, 65536), (3, 0)]
    for _ in range(40):  # edited shapes
        i = rng.randrange(len(RECORDS))
        shape = rng.choice(shapes + [tuple(reversed(RECORDS[i][2])), tuple(d + 1 for d in RECORDS[i][2])])
        if shape == RECORDS[i][2]:
            shape = (1, 2, 3)
        yield "edit shape", gzip.compress(with_header(RECORDS, i, shape=shape), mtime=0)
    for _ in range(30):  # edited dtypes and order
        i = rng.randrange(len(RECORDS))
        descr = rng.choice(["<f8", "<f2", "<i2", "<i4", ">f4", "|u1", "<c8", "<U3", "|O", "<f4"])
        yield "edit dtype", gzip.compress(with_header(RECORDS, i, descr=descr, fortran=descr == "<f4"), mtime=0)
    for _ in range(20):  # records dropped, repeated or renamed
        records = list(RECORDS)
        i = rng.randrange(len(records))
        action = rng.choice(("drop", "repeat", "rename"))
        if action == "drop":
            del records[i]
        elif action == "repeat":
            records.insert(rng.randrange(len(records)), records[i])
        else:
            name, d, s, data = records[i]
            records[i] = (rng.choice(["h.9.ln_1.weight", "h.01.ln_1.weight", "lm_head.weight", "wte ", "h.-1.ln_1.bias"]),
                          d, s, data)
        yield action, records_file(records, CONFIG)


def check_refused_or_exact(conn, error: psycopg.Error | None, kind: str) -> bool:
    """True when refused. A refusal names its cause and leaves nothing; a success is exact."""
    if error is None:
        assert_same = db_state(conn, "fz")
        assert sorted(assert_same) == sorted(WANT), kind
        assert all(np.array_equal(assert_same[n], WANT[n]) for n in WANT), kind
        conn.execute("DELETE FROM llm_model_config WHERE model = 'fz'")
        return False
    assert not isinstance(error, psycopg.OperationalError), (kind, error)
    assert error.sqlstate in EXPECTED_STATES, (kind, error.sqlstate, str(error))
    assert len(error.diag.message_primary) > 15, (kind, str(error))
    assert conn.execute("SELECT count(*) FROM llm_param WHERE model = 'fz'").fetchone() == (0,), kind
    assert conn.execute("SELECT count(*) FROM llm_model_config WHERE model = 'fz'").fetchone() == (0,), kind
    return True


def test_mutated_files_never_crash_or_half_import(conn):
    rng = random.Random(SEED)
    before = conn.execute("SELECT pg_postmaster_start_time(), pg_backend_pid()").fetchone()
    cases = list(mutations(rng))
    assert len(cases) >= 100
    refused = 0
    for kind, data in cases:
        try:
            conn.execute("SELECT pg_llm_import_npz_bytes(%s, 'fz')", (data,))
            error = None
        except psycopg.Error as e:
            error = e
        refused += check_refused_or_exact(conn, error, kind)
    # nearly every mutation is caught (the rest touched bytes that carry no meaning, e.g. gzip's mtime)
    assert refused >= 0.95 * len(cases), refused
    assert conn.execute("SELECT pg_postmaster_start_time(), pg_backend_pid()").fetchone() == before


def test_mutated_files_through_the_path_and_staging(conn):
    """The same guarantees through the other two inputs: a server file, and staged pieces."""
    rng = random.Random(SEED + 1)
    cases = list(mutations(rng))
    rng.shuffle(cases)
    before = conn.execute("SELECT pg_postmaster_start_time(), pg_backend_pid()").fetchone()
    folder = Path(tempfile.mkdtemp(prefix="pgllm-fuzz-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        for i, (kind, data) in enumerate(cases[:40]):
            path = folder / f"{i}.npz"
            path.write_bytes(data)
            path.chmod(0o644)
            try:
                conn.execute("SELECT pg_llm_import_npz(%s, 'fz')", (str(path),))
                error = None
            except psycopg.Error as e:
                error = e
            check_refused_or_exact(conn, error, kind)
        for kind, data in cases[40:80]:
            cuts = sorted(rng.sample(range(1, max(2, len(data))), k=min(3, max(0, len(data) - 1))))
            pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
            try:
                with conn.transaction():
                    for piece in pieces:
                        conn.execute("SELECT pg_llm_import_npz_stage(%s)", (piece,))
                    conn.execute("SELECT pg_llm_import_npz_staged('fz')")
                error = None
            except psycopg.Error as e:
                error = e
            check_refused_or_exact(conn, error, kind)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert conn.execute("SELECT pg_postmaster_start_time(), pg_backend_pid()").fetchone() == before


@pytest.mark.parametrize("size", [0, 1, 2, 17, 1 << 20])
def test_random_bytes(conn, size):
    """Not a checkpoint at all, gzip-wrapped or not."""
    noise = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    for data in (noise, gzip.compress(noise)):
        with pytest.raises(psycopg.Error) as e:
            conn.execute("SELECT pg_llm_import_npz_bytes(%s, 'fz')", (data,))
        check_refused_or_exact(conn, e.value, f"noise {size}")
