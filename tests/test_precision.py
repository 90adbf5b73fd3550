"""Reduced-precision inference: pg_llm.inference_precision = bfloat16 | int8 | int4 against float32.

Quality is judged on a model trained in this file until its next-token distributions are peaked
(random weights give near-uniform distributions, which hide errors): a tiny GPT-2 (2 layers, 4
heads, d_model 80 and vocab 203, neither a multiple of 32) learns a synthetic language, a Markov
chain in which each token has one likely successor (p = 0.9), trained with torch and stored as
`pgllm import` stores weights. The bounds (docs/sql.md), over 48 held-out sequences of 64 tokens
(3024 predicted positions) and 16 greedy continuations of 32 tokens:

    precision   mean KL(float32 || it)   perplexity / float32's   greedy tokens equal to float32's
    bfloat16    <= 0.005 nats            within 0.5%              >= 95%
    int8        <= 0.01 nats             within 1%                >= 95%
    int4        <= 0.02 nats             within 2%                >= 95%

The same bounds hold on the plain-C kernels (pg_llm.simd = portable: what a CPU without AVX runs,
forced here), on the first 16 held-out sequences (1008 positions); int8 and int4 give there bitwise
the logits of the SIMD kernels (exact integer sums per block: tests/gemv_test.c checks the kernels
themselves). On random models of odd shapes the logits of each precision stay near float32's
(relative L2 error at most 1% for bfloat16, 2% for int8, 12% for int4: bf16 keeps 8 bits of
mantissa, int8 7 bits per block of 32, int4 3 plus a sign). Each precision's copy is shared like
float32's, follows weights_version; the int8 copy is about 0.27x the float32 one, int4's (4-bit
layers, 6-bit head) about 0.2x. bench/quality.py measures the same on larger trained models.
"""

from __future__ import annotations

import threading

import numpy as np
import psycopg
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from bench.quality import greedy, log_softmax, markov, prefix_logits

from .test_batch import cancel_until_ended
from .test_weight_cache import copies, wait_for
from .weights import random_gpt2, store_hf_model

V, L, P = 203, 64, 64  # vocabulary, held-out sequence length, positions
BOUNDS = {"bfloat16": (0.005, 0.005), "int8": (0.01, 0.01), "int4": (0.02, 0.02)}  # mean KL (nats), perplexity ratio - 1
GREEDY_AGREEMENT = 0.95
LOGITS_RTOL = {"float32": 1e-5, "bfloat16": 0.01, "int8": 0.02, "int4": 0.12}


def markov_tokens(n: int, length: int, seed: int) -> np.ndarray:
    """bench.quality's chain over the whole vocabulary: successor with p 0.9, second with 0.07, any with 0.03."""
    return markov(n, length, seed, np.arange(V))


def trained_gpt2(steps: int = 150) -> GPT2LMHeadModel:
    """About 0.7 nats of held-out loss (the chain's entropy is 0.55) after 150 steps of 16 x 32 tokens."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only wait for each other on a busy machine
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=80, n_positions=P, vocab_size=V,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    try:
        for step in range(steps):
            batch = torch.from_numpy(markov_tokens(16, 32, seed=1000 + step))
            loss = model(batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.float().eval()


def connect(dsn) -> psycopg.Connection:
    """One thread per backend: the models here are tiny, and results do not depend on threads."""
    return psycopg.connect(dsn, autocommit=True, options="-c pg_llm.threads=1")


@pytest.fixture(scope="module")
def trained(dsn):
    """(name, connection) of the trained model in the suite's database."""
    name = "precision-trained"
    with connect(dsn) as conn:
        store_hf_model(conn, name, trained_gpt2())
        yield name, conn
        conn.execute("DELETE FROM llm_model_config WHERE model = %s", (name,))


def precision(conn, value: str) -> None:
    conn.execute("SELECT set_config('pg_llm.inference_precision', %s, false)", (value,))


def quality(conn, model: str, prec: str, seqs: np.ndarray, prompts: np.ndarray, ref: dict) -> dict:
    """Mean KL from float32's distributions, perplexity ratio, greedy agreement; ref: float32's."""
    precision(conn, prec)
    lp = log_softmax(prefix_logits(conn, model, seqs))
    targets = seqs[:, 1:]
    nll = -np.take_along_axis(lp, targets[..., None], -1).mean()
    kl = (np.exp(ref["lp"]) * (ref["lp"] - lp)).sum(-1).mean()
    agree = (greedy(conn, model, prompts) == ref["greedy"]).mean()
    precision(conn, "float32")
    return {"kl": kl, "ppl_ratio": np.exp(nll - ref["nll"]), "greedy": agree, "positions": lp.shape[0] * lp.shape[1]}


@pytest.fixture(scope="module")
def reference(trained):
    """float32's log-probabilities, held-out NLL and greedy continuations on the held-out text."""
    name, conn = trained
    seqs, prompts = markov_tokens(48, L, seed=7), markov_tokens(16, 8, seed=8)
    precision(conn, "float32")
    lp = log_softmax(prefix_logits(conn, name, seqs))
    nll = -np.take_along_axis(lp, seqs[:, 1:, None], -1).mean()
    return {"seqs": seqs, "prompts": prompts, "lp": lp, "nll": nll, "greedy": greedy(conn, name, prompts)}


def test_the_trained_model_is_peaked(reference):
    """Otherwise the bounds below would prove little: float32 puts most mass on one token."""
    assert np.exp(reference["lp"]).max(-1).mean() > 0.7
    assert np.exp(reference["nll"]) < 2.5  # the chain's own perplexity is about 1.7


@pytest.mark.parametrize("simd", ["auto", "portable"])
@pytest.mark.parametrize("prec", ["bfloat16", "int8", "int4"])
def test_quality_on_a_trained_model(trained, reference, prec, simd):
    name, conn = trained
    # the plain-C kernels are slow: a third of the held-out text (1008 positions) for them
    n = len(reference["seqs"]) // (3 if simd == "portable" else 1)
    lp, seqs = reference["lp"][:n], reference["seqs"][:n]
    ref = {"lp": lp, "nll": -np.take_along_axis(lp, seqs[:, 1:, None], -1).mean(), "greedy": reference["greedy"]}
    conn.execute("SELECT set_config('pg_llm.simd', %s, false)", (simd,))
    try:
        q = quality(conn, name, prec, seqs, reference["prompts"], ref)
    finally:
        conn.execute("RESET pg_llm.simd")
    max_kl, max_ppl = BOUNDS[prec]
    print(f"{prec} ({simd}): {q}")
    assert q["positions"] >= (3000 if simd == "auto" else 1000)
    assert q["kl"] <= max_kl
    assert abs(q["ppl_ratio"] - 1) <= max_ppl
    assert q["greedy"] >= GREEDY_AGREEMENT


def logits(conn, model, tokens) -> np.ndarray:
    return np.array(conn.execute("SELECT llm_logits(%s, %s)", (list(tokens), model)).fetchone()[0], dtype=np.float64)


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


SHAPES = {  # n_layer, n_head, d_model, n_positions, vocab
    "odd": dict(n_layer=2, n_head=3, n_embd=45, n_positions=16, vocab_size=77),
    "wide-head": dict(n_layer=1, n_head=7, n_embd=91, n_positions=24, vocab_size=203),
    "even": dict(n_layer=3, n_head=2, n_embd=64, n_positions=32, vocab_size=1000),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_precision_near_float32_on_odd_shapes(db, shape):
    hf = random_gpt2(seed=3, **SHAPES[shape])
    with connect(db) as conn:
        store_hf_model(conn, shape, hf)
        for T in (1, 5, SHAPES[shape]["n_positions"]):
            tokens = [(11 * i + 3) % SHAPES[shape]["vocab_size"] for i in range(T)]
            with torch.no_grad():
                hf_logits = hf(torch.tensor([tokens])).logits[0, -1].double().numpy()
            for prec, rtol in LOGITS_RTOL.items():
                for simd in ("auto", "portable"):
                    conn.execute("SELECT set_config('pg_llm.simd', %s, false)", (simd,))
                    precision(conn, prec)
                    err = rel_error(logits(conn, shape, tokens), hf_logits)
                    assert err <= rtol, (prec, simd, T, err)


def test_setting_per_session_role_and_database(cluster, db):
    """ALTER ROLE / ALTER DATABASE ... SET pg_llm.inference_precision reach new sessions; each
    precision is its own shared copy, which pg_llm_weight_cache() shows with its format."""
    role = "precision_reader"
    with psycopg.connect(db, autocommit=True) as conn:
        store_hf_model(conn, "m", random_gpt2(seed=4, **SHAPES["even"]))
        expected = {}
        for prec in ("float32", "bfloat16", "int8"):
            precision(conn, prec)
            expected[prec] = logits(conn, "m", (1, 2, 3))
        assert not np.array_equal(expected["int8"], expected["float32"])
        assert not np.array_equal(expected["bfloat16"], expected["float32"])

        conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
        conn.execute(f"ALTER ROLE {role} IN DATABASE \"{conn.info.dbname}\" SET pg_llm.inference_precision = int8")
        conn.execute(f"ALTER DATABASE \"{conn.info.dbname}\" SET pg_llm.inference_precision = bfloat16")
        try:
            with psycopg.connect(db.replace(f"{cluster.role}@", f"{role}@", 1), autocommit=True) as r, \
                    psycopg.connect(db, autocommit=True) as d:
                assert r.execute("SHOW pg_llm.inference_precision").fetchone()[0] == "int8"
                assert d.execute("SHOW pg_llm.inference_precision").fetchone()[0] == "bfloat16"
                assert np.array_equal(logits(r, "m", (1, 2, 3)), expected["int8"])
                assert np.array_equal(logits(d, "m", (1, 2, 3)), expected["bfloat16"])
                d.execute("SET pg_llm.inference_precision = float32")  # the session's own setting wins
                assert np.array_equal(logits(d, "m", (1, 2, 3)), expected["float32"])
                formats = {f: b for f, b in conn.execute(
                    "SELECT format, backends FROM pg_llm_weight_cache() WHERE model = 'm' "
                    "AND database = current_database()").fetchall()}
                assert set(formats) == {"float32", "bfloat16", "int8"}
                assert formats["int8"] >= 1 and formats["float32"] >= 1
        finally:
            conn.execute(f"ALTER DATABASE \"{conn.info.dbname}\" RESET pg_llm.inference_precision")
            conn.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}")
            conn.execute(f"ALTER ROLE {role} IN DATABASE \"{conn.info.dbname}\" RESET ALL")
            conn.execute(f"DROP ROLE {role}")


def test_bad_precision_is_a_clear_error(conn):
    conn.execute("SELECT pg_llm_version()")  # the library loaded: its settings are checked from now on
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        conn.execute("SET pg_llm.inference_precision = int2")
    assert e.value.diag.message_hint == "Available values: float32, bfloat16, int8, int4."
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        conn.execute("SELECT * FROM pg_llm_weight_cache_build('x', 'int2')")
    assert e.value.diag.message_primary == 'unknown precision "int2"'
    assert e.value.diag.message_hint == "Use float32, bfloat16, int8 or int4."


def test_copies_follow_weights_version_in_every_precision_and_their_sizes(db):
    with psycopg.connect(db, autocommit=True) as conn:
        name = "wide"
        conn.execute("SELECT llm_init(%s, 2, 4, 256, 64, 50257)", (name,))
        built = {p: conn.execute("SELECT * FROM pg_llm_weight_cache_build(%s, %s)", (name, p)).fetchone()
                 for p in ("float32", "int8", "bfloat16", "int4")}
        version = conn.execute("SELECT weights_version FROM llm_model_config WHERE model = %s", (name,)).fetchone()[0]
        assert all(b[0] == p and b[1] == version and b[3] for p, b in built.items())
        header = 2 << 20  # a copy's header page, then its data on a 2 MB boundary
        ratio = (built["int8"][2] - header) / (built["float32"][2] - header)
        assert 0.26 < ratio < 0.28, ratio  # 34 bytes per 32 weights, float32 vectors
        assert 0.49 < (built["bfloat16"][2] - header) / (built["float32"][2] - header) < 0.51
        # int4: 18 bytes per 32 weights in the layers, but the head (most of this model: 50257 x 256
        # beside 2 layers of 12 x 256^2) in 6 bits, 26 bytes per 32
        assert 0.19 < (built["int4"][2] - header) / (built["float32"][2] - header) < 0.21
        assert {f for f, in conn.execute("SELECT format FROM pg_llm_weight_cache() WHERE model = %s", (name,))} \
            == {"float32", "int8", "bfloat16", "int4"}

        # new weights: the next copy (any precision) replaces every copy of the old version
        conn.execute("SELECT llm_init(%s, seed => 1, replace => true)", (name,))
        precision(conn, "int8")
        conn.execute("SELECT llm_logits('{1,2}', %s)", (name,))
        [(new_version, path, _)] = copies(conn, name)
        assert new_version > version and path.endswith(".int8")


def test_cancel_during_an_int8_generation(db):
    with psycopg.connect(db, autocommit=True) as conn, psycopg.connect(db, autocommit=True) as admin:
        conn.execute("SELECT llm_init('long', 2, 4, 256, 1024, 50257)")
        precision(conn, "int8")
        conn.execute("SELECT llm_logits('{1}', 'long')")  # the copy exists: what runs is generation
        pid = conn.info.backend_pid
        errors = []

        def generate():
            try:
                conn.execute("SELECT llm_generate_tokens('{1,2,3}', 1000, 0, model => 'long')")
            except psycopg.Error as e:
                errors.append(e)

        t = threading.Thread(target=generate)
        t.start()
        wait_for(lambda: admin.execute("SELECT state = 'active' AND query LIKE '%%llm_generate_tokens%%' "
                                       "FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0],
                 "the generation to run")
        cancel_until_ended(admin, pid, t)
        assert len(errors) == 1 and isinstance(errors[0], psycopg.errors.QueryCanceled)
        assert len(conn.execute("SELECT llm_generate_tokens('{1,2,3}', 3, 0, model => 'long')").fetchone()[0]) == 3


def test_cli_quantize(cli, db):
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("SELECT llm_init('q', 1, 2, 64, 16, 300)")
    result = cli("--dsn", db, "quantize", "q", "--precision", "int8")
    assert result.exit_code == 0, result.output
    assert "int8 copy of weights_version" in result.stdout and "shared" in result.stdout
    with psycopg.connect(db, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_llm_weight_cache() WHERE model = 'q' AND format = 'int8'").fetchone()[0] == 1
    bad = cli("--dsn", db, "quantize", "q", "--precision", "int2")
    assert bad.exit_code == 1 and 'Error: unknown precision "int2"' in bad.output and "Traceback" not in bad.output
    missing = cli("--dsn", db, "quantize", "nope")
    assert missing.exit_code == 1 and 'Error: model "nope" does not exist' in missing.output
