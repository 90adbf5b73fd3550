"""`pgllm dataset`: rows identical to the transformers GPT-2 tokenizer's stream, checks, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pgllm.bundled import gpt2_hf_tokenizer, gpt2_tokenizer_files

FORTUNES = Path("/usr/share/games/fortunes")

DOCS = {
    "a.txt": "The quick brown fox jumps over the lazy dog.\nSecond line, with numbers 12345.\n",
    "b.txt": "Ünïcödé text: naïve café, 東京, emoji 🙂 and  double  spaces.\n" * 3,
    "c1.txt": "PostgreSQL stores the model; the database trains it. " * 7,
    "c2.txt": "Short.",
}


@pytest.fixture(scope="module")
def reference():
    """The Hugging Face GPT-2 tokenizer, built from the same OpenAI files."""
    return gpt2_hf_tokenizer()


def write_docs(tmp_path: Path) -> Path:
    for name, text in DOCS.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def expected_rows(tok, docs: list[str], T: int) -> np.ndarray:
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = (len(stream) - 1) // T
    return np.array([stream[i * T:(i + 1) * T + 1] for i in range(n)])


def dataset_rows(conn) -> np.ndarray:
    rows = conn.execute("SELECT tokens, target FROM llm_dataset ORDER BY id").fetchall()
    for tokens, target in rows:
        assert tokens[1:] == target[:-1]
    return np.array([tokens + [target[-1]] for tokens, target in rows])


def test_rows_are_the_gpt2_token_stream_cut_in_blocks(cli, conn, db, tmp_path, reference):
    d = write_docs(tmp_path)
    # the seed's form: several files after --input (a shell glob), plus a quoted glob
    result = cli("--dsn", db, "dataset", "--tokenizer", "gpt2", "--input", str(d / "a.txt"), str(d / "b.txt"),
                 "--input", str(d / "c*.txt"), "--block-size", "16", "--batch-size", "3", "--truncate")
    assert result.exit_code == 0, result.output
    expected = expected_rows(reference, [DOCS[n] for n in ("a.txt", "b.txt", "c1.txt", "c2.txt")], 16)
    got = dataset_rows(conn)
    assert got.shape == expected.shape and len(got) > 6
    assert np.array_equal(got, expected)
    assert "4 files" in result.output and f"-> {len(expected)} rows of 16 tokens" in result.output

    # without --truncate the rows are appended (of the dataset's one length); with it they replace
    result = cli("--dsn", db, "dataset", "--input", str(d / "a.txt"), "--block-size", "8")
    assert result.exit_code == 1 and 'every row of dataset "train" must have the same length' in result.output
    cli("--dsn", db, "dataset", "--input", str(d / "a.txt"), "--block-size", "16")
    assert conn.execute("SELECT count(*) FROM llm_dataset").fetchone()[0] > len(expected)
    cli("--dsn", db, "dataset", "--input", str(d / "a.txt"), "--block-size", "8", "--truncate")
    assert np.array_equal(dataset_rows(conn), expected_rows(reference, [DOCS["a.txt"]], 8))
    assert conn.execute("SELECT min(id) FROM llm_dataset").fetchone()[0] == 1


def test_a_saved_tokenizer_directory_gives_the_same_rows(cli, conn, db, tmp_path, reference):
    (tmp_path / "docs").mkdir()
    d = write_docs(tmp_path / "docs")
    reference.save_pretrained(tmp_path / "tok")
    result = cli("--dsn", db, "dataset", "--tokenizer", str(tmp_path / "tok"), "--input", str(d / "*.txt"),
                 "--block-size", "32", "--truncate")
    assert result.exit_code == 0, result.output
    docs = [DOCS[n] for n in sorted(DOCS)]
    assert np.array_equal(dataset_rows(conn), expected_rows(reference, docs, 32))


@pytest.mark.skipif(not (FORTUNES / "fortunes").exists(), reason="Debian package fortunes is not installed")
def test_split_on_separates_fortunes_into_documents(cli, conn, db, reference):
    """A fortune file is many documents, one per entry between lines holding only %."""
    path = FORTUNES / "fortunes"
    docs, current = [], []
    for line in path.read_text().splitlines(keepends=True):
        if line.rstrip("\n") == "%":
            docs.append("".join(current))
            current = []
        else:
            current.append(line)
    docs = [d for d in docs + ["".join(current)] if d.strip()]
    assert len(docs) > 400
    result = cli("--dsn", db, "dataset", "--input", str(path), "--split-on", "%", "--block-size", "64", "--truncate")
    assert result.exit_code == 0, result.output
    assert f"{len(docs)} documents" in result.output
    assert np.array_equal(dataset_rows(conn), expected_rows(reference, docs, 64))


def test_ids_beyond_the_model_vocabulary_write_nothing(cli, conn, db, tmp_path):
    d = write_docs(tmp_path)
    conn.execute("INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) "
                 "VALUES ('small', 1, 1, 8, 64, 1000)")
    cli("--dsn", db, "dataset", "--input", str(d / "a.txt"), "--block-size", "4")
    before = conn.execute("SELECT count(*) FROM llm_dataset").fetchone()[0]
    result = cli("--dsn", db, "dataset", "--model", "small", "--input", str(d / "b.txt"), "--block-size", "4",
                 "--truncate")
    assert result.exit_code == 1
    assert "token id" in result.output and "outside model \"small\"'s vocabulary (0 .. 999)" in result.output
    assert conn.execute("SELECT count(*) FROM llm_dataset").fetchone()[0] == before  # truncate rolled back too


@pytest.mark.parametrize("args,message", [
    (["--block-size", "2048"], "--block-size 2048 is larger than model \"gpt2-small\"'s n_positions 1024"),
    (["--model", "nope"], 'model "nope" does not exist'),
    (["--block-size", "1000"], "too few for one row of 1000"),
    (["--tokenizer", "/no/such/dir"], "is neither gpt2, db nor a directory"),
])
def test_bad_input_is_refused(cli, conn, db, tmp_path, args, message):
    d = write_docs(tmp_path)
    result = cli("--dsn", db, "dataset", "--input", str(d / "a.txt"), *args)
    assert result.exit_code == 1
    assert message in result.output
    assert conn.execute("SELECT count(*) FROM llm_dataset").fetchone()[0] == 0


def test_missing_and_binary_inputs_are_refused(cli, conn, db, tmp_path):
    result = cli("--dsn", db, "dataset", "--input", str(tmp_path / "none*.txt"))
    assert result.exit_code == 1 and "no file matches" in result.output
    (tmp_path / "bin.dat").write_bytes(b"\x00\xff\xfe binary")
    result = cli("--dsn", db, "dataset", "--input", str(tmp_path / "bin.dat"))
    assert result.exit_code == 1 and "line 1: not valid UTF-8 text" in result.output


def test_db_tokenizer_matches_gpt2(cli, conn, db, tmp_path, reference):
    if conn.execute("SELECT NOT EXISTS (SELECT FROM pg_proc WHERE proname = 'llm_encode')").fetchone()[0]:
        pytest.skip("llm_encode (the C tokenizer, ext/src/bpe.c) is not in this build of pg_llm yet")
    vocab, merges = gpt2_tokenizer_files()
    loaded = cli("--dsn", db, "tokenizer", "--model", "gpt2-small", "--vocab", str(vocab), "--merges", str(merges))
    assert loaded.exit_code == 0, loaded.output
    d = write_docs(tmp_path)
    result = cli("--dsn", db, "dataset", "--tokenizer", "db", "--input", str(d / "*.txt"), "--block-size", "16",
                 "--truncate")
    assert result.exit_code == 0, result.output
    assert np.array_equal(dataset_rows(conn), expected_rows(reference, [DOCS[n] for n in sorted(DOCS)], 16))
