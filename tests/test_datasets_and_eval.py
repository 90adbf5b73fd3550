"""Named datasets, datasets built in the server from a query (llm_dataset_build), evaluation
(llm_eval, llm_perplexity, llm_embed, val_loss), the llm_models view."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from pgllm.bundled import gpt2_hf_tokenizer

from .test_dataset_cli import dataset_rows, expected_rows
from .test_training import fill_dataset, make_hf_model
from .weights import store_hf_model, write_gpt2_tokenizer

DOCS = [
    "The quick brown fox jumps over the lazy dog.\nSecond line, with numbers 12345.\n",
    "Ünïcödé text: naïve café, 東京, emoji 🙂 and  double  spaces.\n" * 3,
    "",  # an empty document: skipped, as pgllm dataset skips an empty file
    "PostgreSQL stores the model; the database trains it. " * 7,
    None,  # a NULL row: no document
    "Short.",
    "A document with <|endoftext|> inside it, and more text after.",
]


@pytest.fixture(scope="module")
def reference():
    return gpt2_hf_tokenizer()


def register(conn, model="m", *, n_positions=64, vocab=50257) -> None:
    """A model's row (no weights needed to build datasets) and the GPT-2 tokenizer."""
    conn.execute("INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) "
                 "VALUES (%s, 1, 1, 8, %s, %s)", (model, n_positions, vocab))
    write_gpt2_tokenizer(conn, model)


def docs_table(conn, docs=DOCS) -> None:
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, n int)")
    for i, d in enumerate(docs):
        conn.execute("INSERT INTO docs VALUES (%s, %s, %s)", (i, d, i))


def rows_of(conn, dataset: str) -> np.ndarray:
    rows = conn.execute("SELECT tokens, target FROM llm_dataset WHERE dataset = %s ORDER BY id",
                        (dataset,)).fetchall()
    for tokens, target in rows:
        assert tokens[1:] == target[:-1]
    return np.array([tokens + [target[-1]] for tokens, target in rows])


# ---- named datasets ---------------------------------------------------------------------------

def test_seed_inserts_land_in_train_and_one_length_per_dataset(conn):
    conn.execute("INSERT INTO llm_dataset (tokens, target) VALUES ('{1,2,3}', '{2,3,4}')")
    assert conn.execute("SELECT dataset FROM llm_dataset").fetchone()[0] == "train"
    # another length in the same dataset: refused, by INSERT, by COPY and by UPDATE
    with pytest.raises(psycopg.errors.CheckViolation, match='every row of dataset "train" must have the same '
                       'length') as e:
        conn.execute("INSERT INTO llm_dataset (tokens, target) VALUES ('{1,2}', '{2,3}')")
    assert "has rows of 3 tokens; these rows have 2" in e.value.diag.message_detail
    with pytest.raises(psycopg.errors.CheckViolation):
        with conn.cursor() as cur, cur.copy("COPY llm_dataset (tokens, target) FROM STDIN") as copy:
            copy.write_row(([5, 6, 7], [6, 7, 8]))
            copy.write_row(([5, 6, 7, 8], [6, 7, 8, 9]))
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO llm_dataset (dataset, tokens, target) VALUES ('v', '{1,2}', '{2,3}'), "
                     "('v', '{1,2,3}', '{2,3,4}')")
    conn.execute("INSERT INTO llm_dataset (tokens, target) VALUES ('{4,5,6}', '{5,6,7}')")
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE llm_dataset SET tokens = '{1,2}', target = '{2,3}' WHERE tokens = '{4,5,6}'")
    # another dataset has its own length
    conn.execute("INSERT INTO llm_dataset (dataset, tokens, target) VALUES ('val', '{1,2}', '{2,3}')")
    assert conn.execute("SELECT dataset, count(*) FROM llm_dataset GROUP BY 1 ORDER BY 1").fetchall() == \
        [("train", 2), ("val", 1)]


def test_llm_train_reads_one_dataset(conn):
    hf = make_hf_model(1, 1, 2, 16, 16, 64)
    store_hf_model(conn, "t", hf)
    rng = np.random.default_rng(0)
    fill_dataset(conn, rng.integers(0, 64, size=(4, 9)))  # the seed's way: dataset 'train'
    conn.execute("INSERT INTO llm_dataset (dataset, tokens, target) VALUES ('other', '{1,2,3}', '{2,3,4}')")
    # the seed's call (no dataset) trains on 'train', whose rows (8 tokens) differ from 'other' (3)
    loss = conn.execute("SELECT llm_train('t', 1, 0.9, 0.999, 1e-8, 0.01, 1e-3, 1, batch_size => 4)").fetchone()[0]
    assert np.isfinite(loss)
    conn.execute("SELECT llm_train('t', 1, warmup => 1, batch_size => 1, dataset => 'other')")
    with pytest.raises(psycopg.errors.NoDataFound, match='dataset "nope" of llm_dataset is empty'):
        conn.execute("SELECT llm_train('t', 1, warmup => 1, dataset => 'nope')")
    with pytest.raises(psycopg.errors.NullValueNotAllowed, match="dataset must not be null"):
        conn.execute("SELECT llm_train('t', 1, warmup => 1, dataset => NULL)")


def test_truncate_clears_only_the_named_dataset(cli, conn, db, tmp_path):
    register(conn)
    (tmp_path / "a.txt").write_text("Some text to tokenize, long enough for a few rows of eight. " * 4)
    for name in ("train", "val"):
        r = cli("--dsn", db, "dataset", "--tokenizer", "db", "--model", "m", "--input", str(tmp_path / "a.txt"),
                "--block-size", "8", "--dataset", name)
        assert r.exit_code == 0, r.output
    n_val = conn.execute("SELECT count(*) FROM llm_dataset WHERE dataset = 'val'").fetchone()[0]
    r = cli("--dsn", db, "dataset", "--tokenizer", "db", "--model", "m", "--input", str(tmp_path / "a.txt"),
            "--block-size", "4", "--truncate")
    assert r.exit_code == 0, r.output
    assert conn.execute("SELECT dataset, min(cardinality(tokens)), count(*) FROM llm_dataset GROUP BY 1 "
                        "ORDER BY 1").fetchall() == [("train", 4, conn.execute(
                            "SELECT count(*) FROM llm_dataset WHERE dataset = 'train'").fetchone()[0]),
                            ("val", 8, n_val)]


# ---- llm_dataset_build ------------------------------------------------------------------------

def test_dataset_build_gives_the_rows_of_the_client_path(cli, conn, db, tmp_path, reference):
    register(conn)
    docs_table(conn)
    for i, d in enumerate(DOCS):  # the same documents as files, in the same order
        if d is not None:
            (tmp_path / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    r = cli("--dsn", db, "dataset", "--model", "m", "--input", str(tmp_path / "*.txt"), "--block-size", "8",
            "--dataset", "client")
    assert r.exit_code == 0, r.output
    n = conn.execute("SELECT llm_dataset_build('SELECT body FROM docs ORDER BY id', 'server', 'm', 8)").fetchone()[0]
    expected = expected_rows(reference, [d for d in DOCS if d], 8)
    assert n == len(expected) > 10
    assert np.array_equal(rows_of(conn, "server"), expected)
    assert np.array_equal(rows_of(conn, "client"), expected)

    # replace empties the dataset first; without it the rows are appended
    conn.execute("SELECT llm_dataset_build('SELECT body FROM docs ORDER BY id', 'server', 'm', 8)")
    assert len(rows_of(conn, "server")) == 2 * n
    conn.execute("SELECT llm_dataset_build('SELECT body FROM docs ORDER BY id', 'server', 'm', 8, true)")
    assert np.array_equal(rows_of(conn, "server"), expected)
    # varchar works; too few tokens writes nothing and says 0
    assert conn.execute("SELECT llm_dataset_build($$SELECT 'Hi'::varchar$$, 'tiny', 'm', 8)").fetchone()[0] == 0


def test_dataset_build_refuses_bad_input_and_writes_nothing(conn, db):
    register(conn)
    docs_table(conn)
    build = "SELECT llm_dataset_build(%s, 'x', 'm', 8)"
    with pytest.raises(psycopg.errors.DatatypeMismatch, match="first column .* is of type integer, not text"):
        conn.execute(build, ("SELECT n, body FROM docs",))
    with pytest.raises(psycopg.errors.DatatypeMismatch, match="returns no columns"):
        conn.execute(build, ("SELECT FROM docs",))
    with pytest.raises(psycopg.errors.WrongObjectType, match="must be one SELECT"):
        conn.execute(build, ("INSERT INTO docs VALUES (100, 'x', 0) RETURNING body",))
    with pytest.raises(psycopg.errors.WrongObjectType, match="must be one SELECT"):
        conn.execute(build, ("WITH d AS (DELETE FROM docs RETURNING body) SELECT body FROM d",))
    assert conn.execute("SELECT count(*) FROM docs").fetchone()[0] == len(DOCS)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="block_size must be between 1 and"):
        conn.execute("SELECT llm_dataset_build('SELECT body FROM docs', 'x', 'm', 65)")
    with pytest.raises(psycopg.errors.UndefinedObject):
        conn.execute("SELECT llm_dataset_build('SELECT body FROM docs', 'x', 'nope', 8)")
    # a tokenizer larger than the model's vocabulary
    register(conn, "small", vocab=300)
    with pytest.raises(psycopg.errors.DataException, match="outside model \"small\"'s vocabulary"):
        conn.execute("SELECT llm_dataset_build('SELECT body FROM docs', 'x', 'small', 8)")

    # the query runs with the caller's rights: a table the caller may not read is refused
    conn.execute("CREATE ROLE data_reader_test")
    try:
        conn.execute("GRANT SELECT, INSERT, DELETE ON llm_dataset TO data_reader_test")
        conn.execute("GRANT USAGE ON SEQUENCE llm_dataset_id_seq TO data_reader_test")
        conn.execute("GRANT SELECT ON llm_model_config, llm_bpe_vocab, llm_bpe_merges, llm_tokenizer_version "
                     "TO data_reader_test")
        conn.execute("CREATE TABLE public_docs AS SELECT body FROM docs")
        conn.execute("GRANT SELECT ON public_docs TO data_reader_test")
        conn.execute("SET ROLE data_reader_test")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for table docs"):
            conn.execute("SELECT llm_dataset_build('SELECT body FROM docs', 'x', 'm', 8)")
        assert conn.execute("SELECT llm_dataset_build('SELECT body FROM public_docs', 'x', 'm', 8)").fetchone()[0] > 0
        conn.execute("RESET ROLE")
    finally:
        conn.execute("RESET ROLE")
        conn.execute("DROP OWNED BY data_reader_test")
        conn.execute("DROP ROLE data_reader_test")
    assert conn.execute("SELECT count(*) FROM llm_dataset WHERE dataset <> 'x'").fetchone()[0] == 0


def test_dataset_build_can_be_cancelled(conn):
    register(conn)
    conn.execute("SET statement_timeout = '300ms'")
    # an endless stream of documents: only the cancel can end it
    with pytest.raises(psycopg.errors.QueryCanceled):
        conn.execute("SELECT llm_dataset_build('SELECT md5(pg_catalog.generate_series(1, 2000000000)::text)', "
                     "'x', 'm', 8)")
    conn.execute("RESET statement_timeout")
    assert conn.execute("SELECT count(*) FROM llm_dataset").fetchone()[0] == 0


def test_pgllm_dataset_validation_split_of_a_query_and_of_files(cli, conn, db, reference, tmp_path):
    register(conn)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    docs = [" ".join(words[(i * 7 + k) % 10] for k in range(5 + i % 4)) + f" number {i}." for i in range(60)]
    docs_table(conn, docs)
    args = ("--dsn", db, "dataset", "--model", "m", "--query", "SELECT body FROM docs ORDER BY id",
            "--block-size", "4", "--val-fraction", "0.25", "--truncate")
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert 'rows into dataset "train"' in r.output and 'rows into dataset "val"' in r.output
    train, val = rows_of(conn, "train"), rows_of(conn, "val")
    # a split by document: each side is the stream of its own documents, in the query's order
    share = {d: v for d, v in conn.execute(
        "SELECT body, (hashtextextended(body, 0) & 2147483647) / 2147483648.0 FROM docs")}
    val_docs = [d for d in docs if share[d] < 0.25]
    assert 5 < len(val_docs) < 25
    assert np.array_equal(val, expected_rows(reference, val_docs, 4))
    assert np.array_equal(train, expected_rows(reference, [d for d in docs if share[d] >= 0.25], 4))
    # the same split again (deterministic), replacing both datasets
    assert cli(*args).exit_code == 0
    assert np.array_equal(rows_of(conn, "val"), val) and np.array_equal(rows_of(conn, "train"), train)

    # the same documents as files (one each, in the same order): the same split, the same rows
    for i, d in enumerate(docs):
        (tmp_path / f"doc{i:03}.txt").write_text(d, encoding="utf-8")
    r = cli("--dsn", db, "dataset", "--model", "m", "--tokenizer", "db", "--input", str(tmp_path / "doc*.txt"),
            "--block-size", "4", "--val-fraction", "0.25", "--truncate")
    assert r.exit_code == 0, r.output
    assert 'into dataset "train"' in r.output and 'into dataset "val"' in r.output
    assert np.array_equal(rows_of(conn, "val"), val) and np.array_equal(rows_of(conn, "train"), train)

    r = cli("--dsn", db, "dataset", "--model", "m", "--query", "SELECT n FROM docs", "--block-size", "4")
    assert r.exit_code == 1 and "Error: " in r.output and "not text" in r.output
    r = cli("--dsn", db, "dataset", "--model", "m", "--input", "x.txt", "--query", "SELECT 1")
    assert r.exit_code == 1 and "either --input files or --query" in r.output


# ---- evaluation against transformers (float32) --------------------------------------------------

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from .test_training import train_sql  # noqa: E402

# (n_layer, n_head, n_embd, n_positions, vocab), block size T, rows N, batch_size
EVAL_SHAPES = [((1, 2, 16, 16, 64), 8, 5, 2), ((2, 4, 32, 32, 97), 32, 3, 8), ((3, 3, 48, 24, 300), 17, 4, 3)]


def hf_loss(hf, rows: np.ndarray) -> float:
    """GPT2LMHeadModel's mean cross-entropy over every target token of rows (N, T+1)."""
    with torch.no_grad():
        x = torch.tensor(rows[:, :-1], dtype=torch.long)
        y = torch.tensor(rows[:, 1:], dtype=torch.long)
        logits = hf(x).logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()


@pytest.mark.parametrize("shape,T,N,batch", EVAL_SHAPES)
def test_llm_eval_equals_the_transformers_loss(conn, shape, T, N, batch):
    hf = make_hf_model(3, *shape)
    store_hf_model(conn, "e", hf)
    rows = np.random.default_rng(5).integers(0, shape[4], size=(N, T + 1))
    with conn.cursor() as cur, cur.copy("COPY llm_dataset (dataset, tokens, target) FROM STDIN") as copy:
        for r in rows:
            copy.write_row(("val", [int(x) for x in r[:-1]], [int(x) for x in r[1:]]))
    loss, ppl, n, tokens = conn.execute("SELECT * FROM llm_eval('e', batch_size => %s)", (batch,)).fetchone()
    ref = hf_loss(hf, rows)
    assert (n, tokens) == (N, N * T)
    assert abs(loss - ref) <= 1e-5 * ref  # tolerance: 1e-5 relative
    assert abs(ppl - np.exp(ref)) <= 1e-4 * np.exp(ref)
    loss2, _, n2, _ = conn.execute("SELECT * FROM llm_eval('e', 'val', 2, 1)").fetchone()
    assert n2 == 2 and abs(loss2 - hf_loss(hf, rows[:2])) <= 1e-5 * loss2


def test_llm_eval_refuses_bad_input(conn):
    store_hf_model(conn, "e", make_hf_model(3, 1, 2, 16, 16, 64))
    with pytest.raises(psycopg.errors.NoDataFound, match='dataset "val" of llm_dataset is empty'):
        conn.execute("SELECT * FROM llm_eval('e')")
    conn.execute("INSERT INTO llm_dataset (dataset, tokens, target) VALUES ('val', '{1,2}', '{2,99}')")
    with pytest.raises(psycopg.errors.DataException, match="outside the model's vocabulary"):
        conn.execute("SELECT * FROM llm_eval('e')")
    for args, message, error in [("max_rows => 0", "max_rows must be positive", psycopg.errors.InvalidParameterValue),
                                 ("batch_size => 0", "batch_size must be", psycopg.errors.InvalidParameterValue),
                                 ("dataset => NULL", "dataset must not be null", psycopg.errors.NullValueNotAllowed)]:
        with pytest.raises(error, match=message):
            conn.execute(f"SELECT * FROM llm_eval('e', {args})")
    with pytest.raises(psycopg.errors.UndefinedObject):
        conn.execute("SELECT * FROM llm_eval('nope')")


def hf_perplexity(hf, ids: list[int], stride: int) -> float:
    """The sliding-window recipe of Hugging Face's perplexity guide, as written there."""
    encodings = torch.tensor([ids])
    max_length = hf.config.n_positions
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = hf(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss
        num_valid_tokens = (target_ids != -100).sum().item()
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return torch.exp(nll_sum / n_tokens).item()


TEXT = ("PostgreSQL is a powerful, open source object-relational database system with over 35 years of "
        "active development that has earned it a strong reputation for reliability, feature robustness, "
        "and performance.")


@pytest.mark.parametrize("shape", [(1, 2, 16, 16, 50257), (2, 4, 32, 14, 50257)])
def test_llm_perplexity_equals_the_sliding_window_recipe(conn, shape):
    hf = make_hf_model(4, *shape)
    store_hf_model(conn, "p", hf)
    write_gpt2_tokenizer(conn, "p")
    ids = conn.execute("SELECT llm_encode(%s, 'p')", (TEXT,)).fetchone()[0]
    P = shape[3]
    assert 2 * P <= len(ids) <= 3 * P  # two to three windows long
    for stride in (None, 1, 5, P // 2 + 1, P):
        got = conn.execute("SELECT llm_perplexity(%s, 'p', %s)", (TEXT, stride)).fetchone()[0]
        ref = hf_perplexity(hf, ids, stride or P // 2)
        assert abs(got - ref) <= 1e-4 * ref, (stride, got, ref)  # tolerance: 1e-4 relative
    # a short text is one window; one token has no perplexity; bad strides are refused
    short = conn.execute("SELECT llm_perplexity('Hello there, world', 'p')").fetchone()[0]
    assert abs(short - hf_perplexity(hf, conn.execute("SELECT llm_encode('Hello there, world', 'p')").fetchone()[0],
                                     P // 2)) <= 1e-4 * short
    assert conn.execute("SELECT llm_perplexity('Hello', 'p')").fetchone()[0] is None
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="stride must be between 1 and"):
        conn.execute("SELECT llm_perplexity('Hello there', 'p', %s)", (P + 1,))
    # usable per row, e.g. to find odd rows
    odd = conn.execute("SELECT t FROM (VALUES ('the the the the the the'), (%s)) v(t) "
                       "ORDER BY llm_perplexity(t, 'p') DESC LIMIT 1", (TEXT,)).fetchone()
    assert odd is not None


@pytest.mark.parametrize("shape", [(1, 2, 16, 16, 50257), (3, 3, 48, 32, 50257)])
def test_llm_embed_equals_the_mean_hidden_state(conn, shape):
    hf = make_hf_model(6, *shape)
    store_hf_model(conn, "b", hf)
    write_gpt2_tokenizer(conn, "b")
    for text in ("Hello", "PostgreSQL stores the model; the database trains it."):
        ids = conn.execute("SELECT llm_encode(%s, 'b')", (text,)).fetchone()[0]
        got = np.array(conn.execute("SELECT llm_embed(%s, 'b')", (text,)).fetchone()[0], dtype=np.float32)
        with torch.no_grad():
            ref = hf.transformer(torch.tensor([ids])).last_hidden_state.mean(1)[0].numpy()
        assert got.shape == (shape[2],)
        assert np.max(np.abs(got - ref)) <= 1e-5 * max(1.0, np.max(np.abs(ref)))  # tolerance: 1e-5
    assert conn.execute("SELECT llm_embed('', 'b')").fetchone()[0] is None
    with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="more than model \"b\"'s n_positions"):
        conn.execute("SELECT llm_embed(%s, 'b')", ("word " * 40,))


def test_validation_loss_is_logged_where_asked(conn):
    hf = make_hf_model(2, 2, 2, 16, 16, 64)
    store_hf_model(conn, "v", hf)
    rng = np.random.default_rng(1)
    fill_dataset(conn, rng.integers(0, 64, size=(6, 9)))
    val = rng.integers(0, 64, size=(3, 13))
    with conn.cursor() as cur, cur.copy("COPY llm_dataset (dataset, tokens, target) FROM STDIN") as copy:
        for r in val:
            copy.write_row(("val", [int(x) for x in r[:-1]], [int(x) for x in r[1:]]))
    before = conn.execute("SELECT loss FROM llm_eval('v')").fetchone()[0]
    assert abs(before - hf_loss(hf, val)) <= 1e-5 * before
    train_sql(conn, "v", 5, lr_max=1e-2, warmup=1, batch_size=2, eval_dataset="val", eval_every=2)
    logged = conn.execute("SELECT step, val_loss FROM llm_train_log WHERE model = 'v' ORDER BY step").fetchall()
    assert [s for s, v in logged if v is not None] == [2, 4, 5]
    after = conn.execute("SELECT loss FROM llm_eval('v')").fetchone()[0]
    assert abs(logged[-1][1] - after) <= 1e-5 * after and after != before
    # eval_rows: the first rows only
    train_sql(conn, "v", 1, lr_max=1e-2, warmup=1, batch_size=2, eval_dataset="val", eval_rows=1)
    v6 = conn.execute("SELECT val_loss FROM llm_train_log WHERE model = 'v' AND step = 6").fetchone()[0]
    assert abs(v6 - conn.execute("SELECT loss FROM llm_eval('v', max_rows => 1)").fetchone()[0]) <= 1e-5 * v6
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="need eval_dataset"):
        conn.execute("SELECT llm_train('v', 1, warmup => 1, eval_every => 2)")


# ---- the CLI and the llm_models view ------------------------------------------------------------

def test_pgllm_train_eval_log_and_models(cli, conn, db, tmp_path):
    hf = make_hf_model(2, 2, 2, 16, 16, 50257)
    store_hf_model(conn, "c", hf)
    write_gpt2_tokenizer(conn, "c")
    conn.execute("CREATE TABLE docs (body text)")
    conn.execute("INSERT INTO docs SELECT 'Document ' || i || ' says: ' || repeat('postgres trains models. ', i % 5 + 1) "
                 "FROM generate_series(1, 40) i")
    r = cli("--dsn", db, "dataset", "--model", "c", "--query", "SELECT body FROM docs", "--block-size", "16",
            "--val-fraction", "0.2")
    assert r.exit_code == 0, r.output
    r = cli("--dsn", db, "train", "--model", "c", "--steps", "6", "--batch-size", "2", "--lr-max", "3e-3",
            "--eval-dataset", "val", "--eval-every", "2", "--commit-every", "3")
    assert r.exit_code == 0, r.output
    assert "val loss " in r.output
    logged = conn.execute("SELECT step FROM llm_train_log WHERE model = 'c' AND val_loss IS NOT NULL "
                          "ORDER BY step").fetchall()
    assert [s for (s,) in logged] == [2, 3, 4, 6]  # every 2 steps and at each commit
    r = cli("--dsn", db, "train", "--model", "c", "--steps", "1", "--eval-every", "2")
    assert r.exit_code == 1 and "need --eval-dataset" in r.output

    png = tmp_path / "curves.png"
    r = cli("--dsn", db, "log", "--model", "c", "--png", str(png), "--width", "20", "--height", "4")
    assert r.exit_code == 0, r.output
    assert "validation loss: 4 points (2..6)" in r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    loss = conn.execute("SELECT loss FROM llm_eval('c')").fetchone()[0]
    r = cli("--dsn", db, "eval", "c")
    assert r.exit_code == 0, r.output
    assert f'model "c" on dataset "val": loss {loss:.4f}' in r.output
    r = cli("--dsn", db, "eval", "--model", "c", "--dataset", "nope")
    assert r.exit_code == 1 and 'dataset "nope" of llm_dataset is empty' in r.output

    row = conn.execute("SELECT parameters, stored_bytes, step, train_loss, val_loss, tokenizer, checkpoints "
                       "FROM llm_models WHERE model = 'c'").fetchone()
    last = conn.execute("SELECT loss, val_loss FROM llm_train_log WHERE model = 'c' AND step = 6").fetchone()
    assert row[0] == sum(p.numel() for p in hf.transformer.parameters())
    assert row[1] >= 4 * row[0] * 0.99 and row[2:] == (6, last[0], last[1], True, 0)
    conn.execute("SELECT llm_generate('Hi', max_tokens => 1, model => 'c')")  # serving maps a shared copy
    cached = conn.execute("SELECT cached FROM llm_models WHERE model = 'c'").fetchone()[0]
    # llm_eval's float32 block is a shared copy too
    assert cached == conn.execute("SELECT string_agg(format, ', ' ORDER BY format) FROM pg_llm_weight_cache() "
                                  "WHERE model = 'c' AND database = current_database()").fetchone()[0] == "block, float32"
    r = cli("--dsn", db, "models")
    assert r.exit_code == 0, r.output
    assert "c" in r.output and "2 x 2 x 16" in r.output and f"{last[1]:.4f}" in r.output
