"""The inference engine against transformers.GPT2LMHeadModel (float32, eval mode).

Logits are compared with an absolute tolerance of 1e-5 plus a relative one of 1e-4; greedy and beam
search must give the very same tokens as `generate`, and the beam scores must agree to 1e-4.
The reference models have random weights (torch.manual_seed); `initializer_range` is raised on the
models used for generation so that their next-token distributions are peaked and argmax is never a
near-tie decided by rounding.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from contextlib import redirect_stdout

import numpy as np
import psycopg
import pytest
import torch

from pg_llm_client import PGLLMClient
from pgllm.bundled import gpt2_hf_tokenizer

from .weights import random_gpt2, store_hf_model, write_gpt2_tokenizer

LOGIT_RTOL, LOGIT_ATOL = 1e-4, 1e-5
SCORE_ATOL = 1e-4

# (name, GPT2Config keywords): odd head counts, d_model not a multiple of 8, few positions.
SHAPES = {
    "odd": dict(n_layer=2, n_head=3, n_embd=36, n_positions=16, vocab_size=101),
    "five": dict(n_layer=3, n_head=5, n_embd=45, n_positions=40, vocab_size=257),
    "one-head": dict(n_layer=1, n_head=1, n_embd=20, n_positions=8, vocab_size=50),
    "seven": dict(n_layer=2, n_head=7, n_embd=91, n_positions=24, vocab_size=311),
}
# Models for generation: peaked distributions, an end-of-text token that does get generated.
GEN = dict(n_layer=3, n_head=5, n_embd=45, n_positions=64, vocab_size=257, initializer_range=0.2)
GEN_EOS = 160


@pytest.fixture(scope="module")
def models(pg):
    """name -> (registered model name, reference model) for every shape, plus 'gen'."""
    out = {}
    tag = uuid.uuid4().hex[:8]
    for i, (key, cfg) in enumerate(SHAPES.items()):
        m = random_gpt2(i, **cfg)
        name = f"inf-{key}-{tag}"
        store_hf_model(pg, name, m)
        out[key] = (name, m)
    m = random_gpt2(11, bos_token_id=GEN_EOS, eos_token_id=GEN_EOS, **GEN)
    store_hf_model(pg, f"inf-gen-{tag}", m)
    out["gen"] = (f"inf-gen-{tag}", m)
    yield out
    pg.execute("DELETE FROM llm_model_config WHERE model LIKE %s", (f"inf-%-{tag}",))


def hf_last_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


def hf_greedy(model, ids: list[int], max_new: int, eos: int | None) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
                             eos_token_id=eos, pad_token_id=eos if eos is not None else 0)
    return out[0, len(ids):].tolist()


def hf_beams(model, ids: list[int], k: int, max_new: int, eos: int | None) -> list[tuple[float, list[int]]]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=k,
                             num_return_sequences=k, max_new_tokens=max_new, eos_token_id=eos,
                             pad_token_id=eos if eos is not None else 0, early_stopping=False, length_penalty=1.0,
                             return_dict_in_generate=True, output_scores=True)
    lengths = (out.beam_indices >= 0).sum(dim=1).tolist()
    return [(float(out.sequences_scores[i]), out.sequences[i, len(ids):len(ids) + lengths[i]].tolist())
            for i in range(k)]


# ---- logits -------------------------------------------------------------------------------------

@pytest.mark.parametrize("simd", ["auto", "portable"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_match_transformers_for_every_prompt_length(pg, models, shape, simd):
    """At every prompt length (so both the decode kernels' rows and the prompt pass run), at the
    best level of this CPU and on the plain-C kernels (pg_llm.simd caps every kernel)."""
    pg.execute(f"SET pg_llm.simd = {simd}")
    try:
        check_logits(pg, models, shape)
    finally:
        pg.execute("RESET pg_llm.simd")


def check_logits(pg, models, shape):
    name, m = models[shape]
    rng = np.random.default_rng(1)
    for T in range(1, m.config.n_positions + 1):
        ids = rng.integers(0, m.config.vocab_size, T).tolist()
        ours = np.array(pg.execute("SELECT llm_logits(%s, %s)", (ids, name)).fetchone()[0], dtype=np.float32)
        assert ours.shape == (m.config.vocab_size,)
        np.testing.assert_allclose(ours, hf_last_logits(m, ids), rtol=LOGIT_RTOL, atol=LOGIT_ATOL,
                                   err_msg=f"{shape}, prompt of {T} tokens")


@pytest.mark.slow
def test_logits_match_transformers_gpt2_small_shape(pg, gpt2_small):
    name, m = gpt2_small
    rng = np.random.default_rng(2)
    for T in (1, 2, 17, 200, 1024):
        ids = rng.integers(0, 50257, T).tolist()
        ours = np.array(pg.execute("SELECT llm_logits(%s, %s)", (ids, name)).fetchone()[0], dtype=np.float32)
        np.testing.assert_allclose(ours, hf_last_logits(m, ids), rtol=LOGIT_RTOL, atol=LOGIT_ATOL,
                                   err_msg=f"prompt of {T} tokens")


@pytest.fixture(scope="module")
def gpt2_small(pg):
    """A GPT-2-small-shaped model (12 layers, 12 heads, 768, 1024 positions, 50257 tokens), random weights."""
    m = random_gpt2(3)
    name = f"inf-small-{uuid.uuid4().hex[:8]}"
    store_hf_model(pg, name, m)
    yield name, m
    pg.execute("DELETE FROM llm_model_config WHERE model = %s", (name,))


# ---- greedy and beam search ---------------------------------------------------------------------

def test_greedy_generation_matches_generate(pg, models):
    name, m = models["gen"]
    rng = np.random.default_rng(3)
    stopped_at_eos = 0
    for T in (1, 2, 5, 13, 30):
        ids = rng.integers(0, 257, T).tolist()
        for eos in (None, GEN_EOS):
            ref = hf_greedy(m, ids, 24, eos)
            ours = pg.execute("SELECT llm_generate_tokens(%s, 24, temperature => 0, model => %s, eos_token => %s)",
                              (ids, name, eos)).fetchone()[0]
            assert ours == ref, f"prompt {ids}, eos {eos}"
            stopped_at_eos += eos is not None and len(ours) < 24
    assert stopped_at_eos > 0, "no prompt exercised stopping at the end-of-text token"


def test_greedy_to_the_last_position(pg, models):
    name, m = models["gen"]
    ids = [5, 6, 7]
    ref = hf_greedy(m, ids, 61, None)
    assert pg.execute("SELECT llm_generate_tokens(%s, 61, 0, model => %s)", (ids, name)).fetchone()[0] == ref


def eos_first_prompts(model, n: int = 2) -> list[list[int]]:
    """One-token prompts after which the end-of-text token is the likeliest: beams end there."""
    with torch.no_grad():
        logits = model(torch.arange(model.config.vocab_size)[:, None]).logits[:, -1]
    return [[t] for t in torch.nonzero(logits.argmax(-1) == GEN_EOS).flatten().tolist()[:n]]


def test_beam_search_matches_generate(pg, models):
    name, m = models["gen"]
    rng = np.random.default_rng(4)
    ended_at_eos = 0
    prompts = [rng.integers(0, 257, 9).tolist()] + eos_first_prompts(m)
    for k in (2, 3, 6):
        for ids in prompts:
            for eos in (None, GEN_EOS):
                ref = hf_beams(m, ids, k, 12, eos)
                rows = pg.execute("SELECT rank, score, token_ids FROM llm_beam_search_tokens(%s, %s, 12, %s, %s) "
                                  "ORDER BY rank", (ids, k, name, eos)).fetchall()
                assert [r[0] for r in rows] == list(range(1, k + 1))
                assert [r[2] for r in rows] == [seq for _, seq in ref], f"beams {k}, prompt {ids}, eos {eos}"
                np.testing.assert_allclose([r[1] for r in rows], [s for s, _ in ref], atol=SCORE_ATOL)
                ended_at_eos += any(r[2][-1] == GEN_EOS for r in rows if eos is not None)
    assert ended_at_eos > 0, "no hypothesis ended at the end-of-text token"


def test_beam_width_one_is_greedy(pg, models):
    name, m = models["gen"]
    ids = [3, 1, 4, 1, 5]
    greedy = hf_greedy(m, ids, 16, GEN_EOS)
    rows = pg.execute("SELECT token_ids FROM llm_beam_search_tokens(%s, 1, 16, %s, %s)", (ids, name, GEN_EOS)).fetchall()
    assert [r[0] for r in rows] == [greedy]


# ---- sampling -----------------------------------------------------------------------------------

def sample_first(pg, name, ids, seeds, **settings):
    sql = ("SELECT llm_generate_tokens(%(ids)s, 1, %(temperature)s, %(topk)s, %(topp)s, %(model)s, %(seed)s)")
    args = dict(ids=ids, model=name, temperature=1.0, topk=0, topp=1.0) | settings
    return [pg.execute(sql, args | {"seed": s}).fetchone()[0][0] for s in seeds]


def test_seeded_sampling_is_reproducible_across_calls_and_sessions(pg, dsn, models):
    name, _ = models["gen"]
    ids = [10, 20, 30]
    sql = "SELECT llm_generate_tokens(%s, 40, 1.5, 0, 1.0, %s, %s)"
    first = pg.execute(sql, (ids, name, 42)).fetchone()[0]
    assert pg.execute(sql, (ids, name, 42)).fetchone()[0] == first
    with psycopg.connect(dsn, autocommit=True) as other:
        assert other.execute(sql, (ids, name, 42)).fetchone()[0] == first
    assert pg.execute(sql, (ids, name, 43)).fetchone()[0] != first
    # unseeded calls draw from the backend's random state: different tokens
    unseeded = {tuple(pg.execute(sql, (ids, name, None)).fetchone()[0]) for _ in range(3)}
    assert len(unseeded) > 1


def test_sampling_follows_the_distribution_and_its_filters(pg, models):
    name, m = models["odd"]  # a flat distribution: every filter matters
    ids = [1, 2, 3]
    logits = np.array(pg.execute("SELECT llm_logits(%s, %s)", (ids, name)).fetchone()[0], dtype=np.float64)
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()

    # temperature 0 and top-k 1 are greedy whatever the seed
    assert set(sample_first(pg, name, ids, range(5), temperature=0.0)) == {int(order[0])}
    assert set(sample_first(pg, name, ids, range(5), topk=1)) == {int(order[0])}

    # top-k: only the k best tokens, and (with 200 draws) more than one of them
    drawn = sample_first(pg, name, ids, range(200), topk=3)
    assert set(drawn) <= set(order[:3].tolist()) and len(set(drawn)) > 1

    # top-p: only the nucleus (the smallest prefix reaching p), as transformers' TopPLogitsWarper
    cum_before = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
    nucleus = set(order[cum_before < 0.3].tolist())
    drawn = sample_first(pg, name, ids, range(200), topp=0.3)
    assert set(drawn) <= nucleus and len(set(drawn)) > 1

    # no filter: frequencies follow the softmax (chi-square-like check on the 5 likeliest tokens)
    drawn = np.array(sample_first(pg, name, ids, range(2000)))
    for t in order[:5]:
        expected = probs[t] * len(drawn)
        assert abs((drawn == t).sum() - expected) < 5 * np.sqrt(expected) + 1


# ---- concurrency, cancel ------------------------------------------------------------------------

def test_four_concurrent_sessions_get_the_results_of_one(dsn, models):
    name, _ = models["gen"]
    queries = [("SELECT llm_generate_tokens(%s, 50, 0, model => %s)", ([7, 8, 9], name)),
               ("SELECT llm_generate_tokens(%s, 50, 0.9, 40, 0.9, %s, 1234)", ([1, 2], name)),
               ("SELECT llm_logits(%s, %s)", ([4] * 60, name))]
    with psycopg.connect(dsn, autocommit=True) as alone:
        expected = [alone.execute(q, a).fetchone()[0] for q, a in queries]

    results, errors = [None] * 4, []

    def session(i):
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                results[i] = [[c.execute(q, a).fetchone()[0] for q, a in queries] for _ in range(3)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results:
        assert r == [expected] * 3


def test_statement_timeout_stops_generation_and_the_backend_stays_usable(dsn, gpt2_small):
    name, _ = gpt2_small
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT llm_logits('{1}', %s)", (name,))  # weights loaded: what is timed is generation
        c.execute("SET statement_timeout = '200ms'")
        start = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute("SELECT llm_generate_tokens('{1,2,3}', 1000, 0, model => %s)", (name,))
        assert time.monotonic() - start < 3.0
        c.execute("SET statement_timeout = 0")
        assert len(c.execute("SELECT llm_generate_tokens('{1,2,3}', 3, 0, model => %s)", (name,)).fetchone()[0]) == 3


def test_cancel_stops_beam_search(dsn, gpt2_small):
    name, _ = gpt2_small
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT llm_logits('{1}', %s)", (name,))
        timer = threading.Timer(0.3, c.cancel)
        timer.start()
        start = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute("SELECT * FROM llm_beam_search_tokens('{1,2,3}', 4, 1000, %s)", (name,))
        timer.join()
        assert time.monotonic() - start < 3.0
        assert c.execute("SELECT 1").fetchone()[0] == 1


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sql, args, message", [
    ("SELECT llm_logits('{1,2}', 'no-such-model')", (), 'model "no-such-model" does not exist'),
    ("SELECT llm_logits('{}', %(m)s)", (), "tokens must not be empty"),
    ("SELECT llm_logits('{1,NULL}', %(m)s)", (), "tokens must not contain nulls"),
    ("SELECT llm_logits('{{1,2},{3,4}}', %(m)s)", (), "one-dimensional"),
    ("SELECT llm_logits('{1,257}', %(m)s)", (), "token id 257 at position 2 is out of range"),
    ("SELECT llm_logits('{-1}', %(m)s)", (), "token id -1 at position 1 is out of range"),
    ("SELECT llm_logits(array_fill(1, ARRAY[65]), %(m)s)", (), "longer than the 64 positions"),
    ("SELECT llm_generate_tokens('{1}', 0, model => %(m)s)", (), "max_tokens must be at least 1"),
    ("SELECT llm_generate_tokens('{1}', -5, model => %(m)s)", (), "max_tokens must be at least 1"),
    ("SELECT llm_generate_tokens('{1}', 2000000000, model => %(m)s)", (), "exceeds the 64 positions"),
    ("SELECT llm_generate_tokens('{1,2,3,4}', 61, model => %(m)s)", (), "Lower max_tokens to at most 60"),
    ("SELECT llm_generate_tokens('{1}', 5, -0.5, model => %(m)s)", (), "temperature must be a finite number >= 0"),
    ("SELECT llm_generate_tokens('{1}', 5, 'NaN', model => %(m)s)", (), "temperature must be a finite number >= 0"),
    ("SELECT llm_generate_tokens('{1}', 5, topk => -1, model => %(m)s)", (), "topk must be >= 0"),
    ("SELECT llm_generate_tokens('{1}', 5, topp => 0, model => %(m)s)", (), "topp must be in (0, 1]"),
    ("SELECT llm_generate_tokens('{1}', 5, topp => 1.5, model => %(m)s)", (), "topp must be in (0, 1]"),
    ("SELECT llm_generate_tokens('{1}', 5, model => %(m)s, eos_token => 300)", (), "eos_token 300 is out of range"),
    ("SELECT llm_generate_tokens('{1}', NULL, model => %(m)s)", (), "max_tokens must not be null"),
    ("SELECT * FROM llm_beam_search_tokens('{1}', 0, 5, %(m)s)", (), "beam_width must be at least 1"),
    ("SELECT * FROM llm_beam_search_tokens('{1}', 65, 5, %(m)s)", (), "beam_width must be at most 64"),
    ("SELECT * FROM llm_beam_search_tokens('{1}', 2, 0, %(m)s)", (), "max_tokens must be at least 1"),
    ("SELECT * FROM llm_beam_search_tokens('{1}', 2, 64, %(m)s)", (), "exceeds the 64 positions"),
])
def test_bad_input_is_a_clear_error(pg, models, sql, args, message):
    with pytest.raises(psycopg.Error) as e:
        pg.execute(sql, {"m": models["gen"][0]})
    assert message in str(e.value)
    assert pg.execute("SELECT 1").fetchone()[0] == 1


def test_model_without_weights_is_a_clear_error(pg):
    pg.execute("INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) "
               "VALUES ('inf-empty', 1, 1, 8, 8, 8) ON CONFLICT DO NOTHING")
    try:
        with pytest.raises(psycopg.errors.NoDataFound, match='model "inf-empty" has no weights'):
            pg.execute("SELECT llm_generate_tokens('{1}', 2, model => 'inf-empty')")
    finally:
        pg.execute("DELETE FROM llm_model_config WHERE model = 'inf-empty'")


def test_null_tokens_give_null(pg, models):
    assert pg.execute("SELECT llm_generate_tokens(NULL, 5, model => %s)", (models["gen"][0],)).fetchone()[0] is None
    assert pg.execute("SELECT llm_logits(NULL, %s)", (models["gen"][0],)).fetchone()[0] is None


def test_float_and_numeric_arguments_find_the_function(pg, models):
    """psycopg sends Python floats as float8, ints as int2/int4/int8: every one must resolve."""
    name = models["gen"][0]
    a = pg.execute("SELECT llm_generate_tokens(%s, %s, %s, %s, %s, %s, %s)",
                   ([1, 2], 5, 0.7, 10, 0.9, name, 99)).fetchone()[0]
    b = pg.execute("SELECT llm_generate_tokens('{1,2}', 5, 0.7, 10, 0.9, %s, 99)", (name,)).fetchone()[0]
    c = pg.execute("SELECT llm_generate_tokens('{1,2}', 5, 0.7::real, 10, 0.9::real, %s, 99)", (name,)).fetchone()[0]
    assert a == b and len(a) == 5
    assert len(c) == 5


# ---- text: llm_generate, llm_generate_stream, llm_beam_search -------------------------------------

EOT = 50256
TEXT = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257, initializer_range=0.1)
PROMPTS = ["Hello, my name is", "The quick brown fox", "PostgreSQL é 漢字 🐘"]


def forget_model(conn, name):
    conn.execute("DELETE FROM llm_model_config WHERE model = %s", (name,))
    conn.execute("DELETE FROM llm_bpe_merges WHERE model = %s", (name,))
    conn.execute("DELETE FROM llm_bpe_vocab WHERE model = %s", (name,))


@pytest.fixture(scope="module")
def text_model(pg):
    """A small model with GPT-2's vocabulary and tokenizer."""
    m = random_gpt2(21, bos_token_id=EOT, eos_token_id=EOT, **TEXT)
    name = f"inf-text-{uuid.uuid4().hex[:8]}"
    store_hf_model(pg, name, m)
    write_gpt2_tokenizer(pg, name)
    yield name, m
    forget_model(pg, name)


@pytest.fixture(scope="module")
def hf_tokenizer():
    """transformers' GPT-2 tokenizer from the same vocab.json / merges.txt that pgllm bundles."""
    return gpt2_hf_tokenizer()


def without_eot(ids):
    return ids[:-1] if ids and ids[-1] == EOT else ids


def stream_rows(conn, sql, args):
    return conn.execute(f"SELECT (e).* FROM (SELECT {sql} AS e) s", args).fetchall()


def test_text_greedy_matches_generate_and_the_tokenizer(pg, text_model, hf_tokenizer):
    name, m = text_model
    for prompt in PROMPTS:
        ids = hf_tokenizer(prompt)["input_ids"]
        ref = hf_greedy(m, ids, 20, EOT)
        ours = pg.execute("SELECT llm_generate(%s, 20, 0, model => %s)", (prompt, name)).fetchone()[0]
        assert ours == hf_tokenizer.decode(without_eot(ref)), prompt
        assert pg.execute("SELECT llm_generate_tokens(llm_encode(%s, %s), 20, 0, model => %s, eos_token => %s)",
                          (prompt, name, name, EOT)).fetchone()[0] == ref


def test_stream_rows_add_up_to_the_generated_text(pg, text_model, hf_tokenizer):
    """Rows are tokens in order; their texts concatenate to what llm_generate returns with the
    same seed; a token that ends inside a UTF-8 character waits for the next one."""
    name, _ = text_model
    held_back = 0
    for seed in range(6):
        args = ("Once upon a time", 120, 3.0, 0, 1.0, name, seed)
        rows = stream_rows(pg, "llm_generate_stream(%s, %s, %s, %s, %s, %s, %s)", args)
        steps, ids, tokens, texts, complete = map(list, zip(*rows))
        assert steps == list(range(1, len(rows) + 1))
        assert complete == [False] * (len(rows) - 1) + [True]
        assert "".join(tokens) == texts[-1]
        assert all(texts[i] == "".join(tokens[:i + 1]) for i in range(len(rows)))
        assert texts[-1] == pg.execute("SELECT llm_generate(%s, %s, %s, %s, %s, %s, %s)", args).fetchone()[0]
        assert texts[-1] == hf_tokenizer.decode(without_eot(ids))
        assert ids == pg.execute("SELECT llm_generate_tokens(llm_encode(%s, %s), %s, %s, %s, %s, %s, %s, %s)",
                                 (args[0], name, *args[1:], EOT)).fetchone()[0]
        assert len(rows) == 120 or ids[-1] == EOT
        held_back += sum(1 for t, i in zip(tokens[:-1], ids) if t == "" and i != EOT)
    assert held_back > 0, "no token ended inside a character: the UTF-8 path was not exercised"


def test_a_model_smaller_than_its_tokenizer_generates_without_an_end_of_text(pg, models):
    """<|endoftext|> (50256) lies past a 257-token model: generation runs to max_tokens."""
    name, _ = models["five"]
    write_gpt2_tokenizer(pg, name)
    try:
        ids = pg.execute("SELECT llm_generate_tokens(llm_encode('a', %s), 6, 0, model => %s)", (name, name)).fetchone()[0]
        text = pg.execute("SELECT llm_generate('a', 6, 0, model => %s)", (name,)).fetchone()[0]
        assert len(ids) == 6 and text == pg.execute("SELECT llm_decode(%s, %s)", (ids, name)).fetchone()[0]
        rows = pg.execute("SELECT token_ids FROM llm_beam_search('a', 2, 4, %s)", (name,)).fetchall()
        assert [len(r[0]) for r in rows] == [4, 4]
    finally:
        pg.execute("DELETE FROM llm_bpe_merges WHERE model = %s", (name,))
        pg.execute("DELETE FROM llm_bpe_vocab WHERE model = %s", (name,))


def test_text_beam_search_matches_generate(pg, text_model, hf_tokenizer):
    name, m = text_model
    for prompt in PROMPTS[:2]:
        ref = hf_beams(m, hf_tokenizer(prompt)["input_ids"], 3, 10, EOT)
        rows = pg.execute("SELECT rank, score, token_ids, text FROM llm_beam_search(%s, 3, 10, %s) ORDER BY rank",
                          (prompt, name)).fetchall()
        assert [r[2] for r in rows] == [ids for _, ids in ref]
        assert [r[3] for r in rows] == [hf_tokenizer.decode(without_eot(ids)) for _, ids in ref]
        np.testing.assert_allclose([r[1] for r in rows], [s for s, _ in ref], atol=SCORE_ATOL)


@pytest.mark.slow
def test_stream_reaches_the_client_long_before_generation_ends(dsn, pg, gpt2_small):
    """64 tokens of a GPT-2-small-shaped model: the first row reaches the client while the rest are computed.

    Proved by state, not by timing: the client cancels the call as soon as its first row arrives, and the
    call must end cancelled with fewer than 64 rows. Had the rows waited in the server's output buffer
    (8 KB, sent when full or at the end: the 64 rows of one small column fit it), the first would arrive
    with the call already finished and the cancel would find nothing to stop; streamed, the cancel lands
    with 63 steps still to compute (the greedy text of this prompt has no <|endoftext|> in its first 64
    tokens, so the call cannot end early by itself)."""
    name, _ = gpt2_small
    write_gpt2_tokenizer(pg, name)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT llm_logits('{1}', %s)", (name,))  # weights loaded
        rows = 0
        with pytest.raises(psycopg.errors.QueryCanceled), c.cursor() as cur:
            for _ in cur.stream("SELECT (e).step FROM (SELECT llm_generate_stream('Streaming tokens', 64, 0, "
                                "model => %s) AS e) s", (name,)):
                rows += 1
                if rows == 1:
                    c.cancel_safe()
        assert 1 <= rows < 64
        assert c.execute("SELECT llm_generate('Streaming tokens', 2, 0, model => %s)", (name,)).fetchone()[0]


# ---- the client and the CLI -----------------------------------------------------------------------

def test_client_generate_stream_and_beam_search(dsn, pg, text_model):
    name, _ = text_model
    with psycopg.connect(dsn) as conn:  # not autocommit, as in the seed's snippet
        client = PGLLMClient(conn, model=name)
        text = client.generate("Hello from Postgres", temperature=0.6, max_tokens=12, seed=3)
        assert text == pg.execute("SELECT llm_generate('Hello from Postgres', 12, 0.6, 50, 0.95, %s, 3)",
                                  (name,)).fetchone()[0]
        events = list(client.stream("Streaming tokens", max_tokens=4, seed=9))
        assert [e.step for e in events] == list(range(1, len(events) + 1)) and 1 <= len(events) <= 4
        assert events[-1].is_complete and events[-1].text == "".join(e.token for e in events)
        assert all(isinstance(e.token_id, int) for e in events)
        candidates = client.beam_search("Beam me", beam_width=2, max_tokens=6)
        assert len(candidates) == 2 and candidates[0].score >= candidates[1].score
        assert all(isinstance(c.text, str) and 1 <= len(c.token_ids) <= 6 for c in candidates)
        assert client.generate("Hi", temperature=0, max_tokens=5) == client.generate("Hi", temperature=0, max_tokens=5)


@pytest.mark.parametrize("autocommit", [False, True])
def test_client_stream_left_early_leaves_the_connection_usable(dsn, text_model, autocommit):
    name, _ = text_model
    with psycopg.connect(dsn, autocommit=autocommit) as conn:
        client = PGLLMClient(conn, model=name)
        for event in client.stream("Hello", max_tokens=100, temperature=0):
            break
        assert event.step == 1
        assert conn.execute("SELECT 1").fetchone()[0] == 1
        assert len(list(client.stream("Hello", max_tokens=3, temperature=0))) >= 1


SEED_SNIPPET = """
import psycopg
from pg_llm_client import PGLLMClient

with psycopg.connect("postgresql://postgres@localhost:5432/postgres") as conn:
    client = PGLLMClient(conn)
    print(client.generate("Hello from Postgres", temperature=0.6))

    for event in client.stream("Streaming tokens", max_tokens=4):
        print(event.step, event.token, event.text)

    top_candidates = client.beam_search("Beam me", beam_width=2, max_tokens=6)
    for candidate in top_candidates:
        print(candidate.score, candidate.text)
"""


def test_the_seed_snippet_runs_as_written(db):
    """The seed's snippet, with only its connection string pointed at the test database; the
    database's gpt2-small is a small model with GPT-2's tokenizer."""
    with psycopg.connect(db, autocommit=True) as conn:
        store_hf_model(conn, "gpt2-small", random_gpt2(5, **TEXT))
        write_gpt2_tokenizer(conn, "gpt2-small")
    code = SEED_SNIPPET.replace('"postgresql://postgres@localhost:5432/postgres"', repr(db))
    out = io.StringIO()
    with redirect_stdout(out):
        exec(compile(code, "seed_snippet", "exec"), {})
    lines = out.getvalue().splitlines()
    steps = [line.split(" ", 1)[0] for line in lines[-6:-2]]
    assert steps[-1] in {"1", "2", "3", "4"} and len(lines) >= 4
    float(lines[-1].split(" ", 1)[0]), float(lines[-2].split(" ", 1)[0])  # the two beam scores


def test_cli_generate(cli, dsn, text_model, monkeypatch):
    name, _ = text_model
    with psycopg.connect(dsn, autocommit=True) as conn:
        expected = PGLLMClient(conn, model=name).generate("Hello", max_tokens=12, seed=5)
        beams = PGLLMClient(conn, model=name).beam_search("Hello", beam_width=2, max_tokens=5)
    streamed = cli("--dsn", dsn, "generate", "Hello", "--model", name, "--max-tokens", "12", "--seed", "5")
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout == expected + "\n"
    whole = cli("--dsn", dsn, "generate", "Hello", "-m", name, "-n", "12", "--seed", "5", "--no-stream")
    assert whole.exit_code == 0 and whole.stdout == expected + "\n"
    beam = cli("--dsn", dsn, "generate", "Hello", "-m", name, "-n", "5", "--beam-width", "2")
    assert beam.exit_code == 0
    assert beam.stdout.splitlines() == [f"{c.rank}\t{c.score:.4f}\t{c.text}" for c in beams]
    monkeypatch.setenv("PGLLM_MODEL", name)
    default = cli("--dsn", dsn, "generate", "Hello", "-n", "12", "--seed", "5")
    assert default.exit_code == 0 and default.stdout == expected + "\n"


@pytest.mark.parametrize("args, message", [
    (["", "-m", "{m}"], "Error: prompt must not be empty"),
    (["Hi", "-m", "no-such-model"], 'Error: model "no-such-model" does not exist'),
    (["Hi", "-m", "{m}", "--top-p", "0"], "Error: topp must be in (0, 1]"),
    (["Hi", "-m", "{m}", "--temperature", "-1"], "Error: temperature must be a finite number >= 0"),
    (["Hi", "-m", "{m}", "--max-tokens", "-3"], "Error: max_tokens must be at least 1"),
    (["Hi", "-m", "{m}", "--max-tokens", "500"], "exceeds the 128 positions"),
    (["Hi", "-m", "{m}", "--top-k", "-2"], "Error: topk must be >= 0"),
    (["Hi", "-m", "{m}", "--beam-width", "0"], "Error: beam_width must be at least 1"),
])
def test_cli_generate_bad_input(cli, dsn, text_model, args, message):
    result = cli("--dsn", dsn, "generate", *[a.replace("{m}", text_model[0]) for a in args])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("sql, message", [
    ("SELECT llm_generate('', 5, model => %(m)s)", "prompt must not be empty"),
    ("SELECT llm_generate('Hi', 5, model => 'no-such-model')", 'model "no-such-model" does not exist'),
    ("SELECT llm_generate(repeat('ab ', 200), 5, model => %(m)s)", "longer than the 128 positions"),
    ("SELECT llm_generate_stream('Hi', 5, -1, model => %(m)s)", "temperature must be a finite number >= 0"),
    ("SELECT llm_generate_stream('', 5, model => %(m)s)", "prompt must not be empty"),
    ("SELECT * FROM llm_beam_search('Hi', 0, 5, %(m)s)", "beam_width must be at least 1"),
    ("SELECT * FROM llm_beam_search('', 2, 5, %(m)s)", "prompt must not be empty"),
    ("SELECT llm_generate('Hi', 5, model => %(g)s)", "has no tokenizer"),
])
def test_text_bad_input_is_a_clear_error(pg, models, text_model, sql, message):
    with pytest.raises(psycopg.Error) as e:
        pg.execute(sql, {"m": text_model[0], "g": models["gen"][0]})
    assert message in str(e.value)
