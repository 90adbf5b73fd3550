"""One source for the limits: src/llm_limits.h, reported by pg_llm_limits().

The frozen 0.1.0 schema holds the same numbers in its CHECK constraints; these tests hold the two
together, and check that the engine refuses just past each limit it reports.
"""

from __future__ import annotations

import re

import psycopg
import pytest


def limits(conn) -> dict[str, int]:
    return dict(conn.execute("SELECT name, value FROM pg_llm_limits()").fetchall())


def check_maxima(conn, table: str) -> dict[str, int]:
    """column -> the upper bound its CHECK constraints give it (`col <= N`, `length(col) <= N`)."""
    out = {}
    for (definition,) in conn.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                                      "WHERE conrelid = %s::regclass AND contype = 'c'", (table,)):
        for column, value in re.findall(r"\((?:length\()?(\w+)\)? <= (\d+)\)", definition):
            out[column] = int(value)
    return out


def test_check_constraints_equal_the_reported_limits(conn):
    lim = limits(conn)
    config = check_maxima(conn, "llm_model_config")
    assert config == {"model": lim["model_name_bytes_max"], "n_layer": lim["n_layer_max"],
                      "n_head": lim["n_head_max"], "d_model": lim["d_model_max"],
                      "n_positions": lim["n_positions_max"], "vocab": lim["vocab_max"]}
    assert check_maxima(conn, "llm_bpe_vocab") == {"token_id": lim["token_id_max"]}
    assert lim["token_id_max"] == lim["vocab_max"] - 1


def test_the_engine_refuses_just_past_each_limit(conn):
    lim = limits(conn)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=f"1 to {lim['model_name_bytes_max']} bytes"):
        conn.execute("SELECT llm_init(%s, 1, 1, 8, 8, 8)", ("x" * (lim["model_name_bytes_max"] + 1),))
    conn.execute("SELECT llm_init('lim', 1, 1, 8, 8, 8)")
    conn.execute("INSERT INTO llm_dataset (tokens, target) VALUES ('{1,2}', '{2,3}')")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=f"between 1 and {lim['batch_size_max']}"):
        conn.execute("SELECT llm_train('lim', 1, batch_size => %s)", (lim["batch_size_max"] + 1,))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=f"between 1 and {lim['grad_accum_max']}"):
        conn.execute("SELECT llm_train('lim', 1, grad_accum => %s)", (lim["grad_accum_max"] + 1,))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=f"at most {lim['beam_width_max']}"):
        conn.execute("SELECT * FROM llm_beam_search_tokens('{1}', %s, 2, 'lim')", (lim["beam_width_max"] + 1,))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=rf"\(1 \.\. {lim['batch_rows_max']}\)"):
        conn.execute("SET pg_llm.batch_rows = %d" % (lim["batch_rows_max"] + 1))
    vocab = '{"a": 0, "b": %d}' % (lim["token_id_max"] + 1)
    with pytest.raises(psycopg.errors.InvalidTextRepresentation, match=f"past {lim['token_id_max']}"):
        conn.execute("SELECT pg_llm_load_bpe_vocab_bytes(%s, 'lim')", (vocab.encode(),))
    vocab = '{"a": 0, "b": %d}' % lim["token_id_max"]
    assert conn.execute("SELECT pg_llm_load_bpe_vocab_bytes(%s, 'lim')", (vocab.encode(),)).fetchone() == (2,)
