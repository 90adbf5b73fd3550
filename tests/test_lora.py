"""LoRA adapters: training equals PEFT's LoRA on transformers' GPT-2, serving equals the merged model.

The reference is peft's LoRA (fan_in_fan_out for GPT-2's Conv1D, lora_dropout 0, bias none) on
transformers.GPT2LMHeadModel, trained with torch.optim.AdamW over the adapter's tensors, the same
schedule, clipping and rows as llm_train (tests/test_training.py's TorchTrainer: the base's tensors
have no gradient, so its optimizer and clipping see the adapter's alone).
"""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
import torch
from peft import LoraConfig, get_peft_model

from .test_training import LOSS_RTOL, TorchTrainer, fill_dataset, lr_at, make_hf_model
from .weights import load_params, store_hf_model

PREFIX = "base_model.model.transformer."

# (n_layer, n_head, n_embd, n_positions, vocab, batch_size, T, grad_accum, rows, rank, alpha, targets)
SHAPES = [
    (2, 3, 48, 32, 97, 2, 16, 1, 5, 4, 8.0, ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    (1, 5, 70, 16, 211, 3, 9, 2, 8, 2, 3.0, ["attn.c_attn"]),
    (3, 4, 64, 64, 512, 4, 32, 1, 12, 8, 16.0, ["mlp.c_fc", "mlp.c_proj"]),
]

# Tolerances, float32 on both sides in different summation orders. The adapter's tensors move by
# up to lr_max = 1e-2 per step (Adam's steps are about lr in size whatever the gradient, so an entry
# whose gradient is nearly zero moves by rounding noise scaled up to a step): 1% of a step.
# Measured here (Zen 3, AVX2): losses within 1e-7 relative, gradient norms 2e-7, tensors 3.6e-5.
GRAD_NORM_RTOL = 1e-4
ADAPTER_ATOL, ADAPTER_RTOL = 1e-4, 1e-4
LOGITS_ATOL = 2e-4    # logits of about +-3 after training; the passes share no product


def peft_model(hf, rank: int, alpha: float, targets: list[str], seed: int):
    """hf with a PEFT LoRA adapter whose B is random too (PEFT starts B at zero, which would leave
    A's gradient zero and hide it from the comparison)."""
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                     fan_in_fan_out=True, init_lora_weights=True)
    model = get_peft_model(hf, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def adapter_tensors(model) -> dict[str, np.ndarray]:
    """The adapter's tensors under pg_llm's names (h.0.attn.c_attn.lora_A), float32."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            name = name.removeprefix(PREFIX).replace(".default.weight", "")
            out[name] = p.detach().cpu().numpy().astype("<f4")
    return out


def store_adapter(conn, adapter: str, model: str, peft, rank: int, alpha: float, targets: list[str]) -> None:
    """llm_adapter_create, then PEFT's values into its rows."""
    conn.execute("SELECT llm_adapter_create(%s, %s, rank => %s, alpha => %s, targets => %s)",
                 (adapter, model, rank, alpha, targets))
    tensors = adapter_tensors(peft)
    names = {n for (n,) in conn.execute("SELECT name FROM llm_adapter_param WHERE adapter = %s", (adapter,))}
    assert names == tensors.keys()
    for name, a in tensors.items():
        shape = conn.execute("SELECT shape FROM llm_adapter_param WHERE adapter = %s AND name = %s",
                             (adapter, name)).fetchone()[0]
        assert tuple(shape) == a.shape, name
        conn.execute("UPDATE llm_adapter_param SET data = %s WHERE adapter = %s AND name = %s",
                     (a.tobytes(), adapter, name))


def load_adapter(conn, adapter: str) -> dict[str, np.ndarray]:
    rows = conn.execute("SELECT name, shape, data FROM llm_adapter_param WHERE adapter = %s", (adapter,)).fetchall()
    return {name: np.frombuffer(data, dtype="<f4").reshape(shape) for name, shape, data in rows}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}C{}V{}B{}T{}A{}-r{}-{}".format(
    s[0], s[2], s[4], s[5], s[6], s[7], s[9], len(s[11])))
def test_three_adapter_steps_match_peft(conn, shape):
    n_layer, n_head, n_embd, n_pos, vocab, B, T, A, N, rank, alpha, targets = shape
    hf = make_hf_model(7, n_layer, n_head, n_embd, n_pos, vocab)
    store_hf_model(conn, "tiny", hf)
    base_before = load_params(conn, "tiny")
    ref_model = peft_model(hf, rank, alpha, targets, seed=11)
    store_adapter(conn, "tenant", "tiny", ref_model, rank, alpha, targets)
    rows = np.random.default_rng(3).integers(0, vocab, size=(N, T + 1))
    fill_dataset(conn, rows)

    hp = dict(beta1=0.9, beta2=0.95, eps=1e-8, wd=0.1, lr_max=1e-2, lr_min=1e-3, warmup=2, total_steps=5,
              grad_clip=1.0)
    ref = TorchTrainer(ref_model, rows, batch_size=B, grad_accum=A, **hp)
    ref_log = [ref.step() for _ in range(3)]

    names = ", ".join(f"{k} => %s" for k in hp)
    last = conn.execute(f"SELECT llm_train('tiny', 3, batch_size => %s, grad_accum => %s, {names}, adapter => 'tenant')",
                        (B, A, *hp.values())).fetchone()[0]
    log = conn.execute("SELECT step, lr, loss, grad_norm FROM llm_adapter_train_log WHERE adapter = 'tenant' "
                       "ORDER BY step").fetchall()
    assert [r[0] for r in log] == [1, 2, 3]
    for (step, lr, loss, norm), (ref_loss, ref_norm) in zip(log, ref_log):
        assert lr == pytest.approx(lr_at(step - 1, 1e-2, 1e-3, 2, 5), rel=1e-6)
        assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL)
        assert norm == pytest.approx(ref_norm, rel=GRAD_NORM_RTOL)
    assert last == pytest.approx(ref_log[-1][0], rel=LOSS_RTOL)

    ours, theirs = load_adapter(conn, "tenant"), adapter_tensors(ref_model)
    assert ours.keys() == theirs.keys()
    for name, expected in theirs.items():
        np.testing.assert_allclose(ours[name], expected, rtol=ADAPTER_RTOL, atol=ADAPTER_ATOL, err_msg=name)

    # the base is frozen: not a bit of it changed, and it has no training state of its own
    base_after = load_params(conn, "tiny")
    assert all(np.array_equal(base_before[k], base_after[k]) for k in base_before)
    assert conn.execute("SELECT count(*) FROM llm_train_log WHERE model = 'tiny'").fetchone()[0] == 0
    assert conn.execute("SELECT step, data_pos FROM llm_adapter WHERE adapter = 'tenant'").fetchone() == (3, 3 * B * A)

    # serving: the trained adapter's logits equal PEFT's with the same tensors, unmerged and merged
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.from_numpy(ours[name.removeprefix(PREFIX).replace(".default.weight", "")].copy()))
    prompt = [int(x) for x in rows[0][: min(T, 12)]]
    got = np.array(conn.execute("SELECT llm_logits(%s, 'tiny', adapter => 'tenant')", (prompt,)).fetchone()[0])
    with torch.no_grad():
        want = ref_model(input_ids=torch.tensor([prompt])).logits[0, -1].numpy()
        merged = ref_model.merge_and_unload()
        want_merged = merged(input_ids=torch.tensor([prompt])).logits[0, -1].numpy()
    np.testing.assert_allclose(got, want, atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_allclose(got, want_merged, atol=LOGITS_ATOL, rtol=0)
    base = np.array(conn.execute("SELECT llm_logits(%s, 'tiny')", (prompt,)).fetchone()[0])
    assert np.abs(base - got).max() > 10 * LOGITS_ATOL, "the adapter changes what the model computes"


def test_an_adapter_resumes_exactly(conn):
    """3 + 3 steps in two calls equal 6 in one (the moments and the position come back from the rows)."""
    n_layer, n_head, n_embd, n_pos, vocab, B, T, A, N, rank, alpha, targets = SHAPES[0]
    hf = make_hf_model(7, n_layer, n_head, n_embd, n_pos, vocab)
    store_hf_model(conn, "tiny", hf)
    fill_dataset(conn, np.random.default_rng(5).integers(0, vocab, size=(N, T + 1)))
    hp = "lr_max => 1e-2, warmup => 2, total_steps => 6, batch_size => 2"
    for name in ("once", "twice"):
        conn.execute("SELECT llm_adapter_create(%s, 'tiny', rank => 4, targets => %s, seed => 9)", (name, targets))
    conn.execute(f"SELECT llm_train('tiny', 6, {hp}, adapter => 'once')")
    conn.execute(f"SELECT llm_train('tiny', 3, {hp}, adapter => 'twice')")
    conn.execute(f"SELECT llm_train('tiny', 3, {hp}, adapter => 'twice')")
    once, twice = load_adapter(conn, "once"), load_adapter(conn, "twice")
    assert all(np.array_equal(once[k], twice[k]) for k in once)
    losses = conn.execute("SELECT adapter, array_agg(loss ORDER BY step) FROM llm_adapter_train_log "
                          "GROUP BY adapter ORDER BY adapter").fetchall()
    assert losses[0][1] == losses[1][1]


def test_a_rolled_back_call_leaves_the_adapter_as_it_was_and_dropout_is_seeded(conn):
    """An adapter's training is transactional like a model's; LoRA's dropout draws its masks from the
    call's seed (the same seed, the same adapter; another seed, another), and trains."""
    n_layer, n_head, n_embd, n_pos, vocab, B, T, A, N, rank, alpha, targets = SHAPES[0]
    store_hf_model(conn, "tiny", make_hf_model(7, n_layer, n_head, n_embd, n_pos, vocab))
    fill_dataset(conn, np.random.default_rng(6).integers(0, vocab, size=(N, T + 1)))
    for name in ("d1", "d2", "d3"):
        conn.execute("SELECT llm_adapter_create(%s, 'tiny', rank => 4, dropout => 0.3, targets => %s, seed => 2)",
                     (name, targets))
    before = load_adapter(conn, "d1")
    with conn.transaction(force_rollback=True):
        conn.execute("SELECT llm_train('tiny', 2, lr_max => 1e-2, warmup => 1, batch_size => 2, adapter => 'd1')")
    after = load_adapter(conn, "d1")
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert conn.execute("SELECT step FROM llm_adapter WHERE adapter = 'd1'").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM llm_adapter_train_log").fetchone()[0] == 0

    hp = "lr_max => 1e-2, warmup => 1, batch_size => 2"
    losses = {name: conn.execute(f"SELECT llm_train('tiny', 3, {hp}, seed => %s, adapter => %s)",
                                 (seed, name)).fetchone()[0] for name, seed in (("d1", 5), ("d2", 5), ("d3", 6))}
    d1, d2, d3 = (load_adapter(conn, n) for n in ("d1", "d2", "d3"))
    assert losses["d1"] == losses["d2"] and all(np.array_equal(d1[k], d2[k]) for k in d1)
    assert any(not np.array_equal(d1[k], d3[k]) for k in d1)
    assert all(np.isfinite(v).all() for v in d1.values())


def test_a_new_adapter_changes_nothing_and_bad_input_is_refused(conn):
    hf = make_hf_model(7, 2, 3, 48, 32, 97)
    store_hf_model(conn, "tiny", hf)
    conn.execute("SELECT llm_adapter_create('fresh', 'tiny', targets => ARRAY['attn.c_attn', 'mlp.c_fc'])")
    prompt = [1, 5, 9, 2]
    with_adapter = conn.execute("SELECT llm_logits(%s, 'tiny', adapter => 'fresh')", (prompt,)).fetchone()[0]
    assert with_adapter == conn.execute("SELECT llm_logits(%s, 'tiny')", (prompt,)).fetchone()[0]
    shapes = dict(conn.execute("SELECT name, shape FROM llm_adapter_param WHERE adapter = 'fresh'").fetchall())
    assert shapes["h.1.attn.c_attn.lora_A"] == [8, 48] and shapes["h.1.mlp.c_fc.lora_B"] == [192, 8]

    for sql, message in [
        ("SELECT llm_adapter_create('x', 'tiny', targets => ARRAY['attn.c_attn', 'lm_head'])",
         "\"lm_head\" is not a product an adapter can target"),
        ("SELECT llm_adapter_create('x', 'tiny', rank => 0)", "rank must be between 1 and 1024"),
        ("SELECT llm_adapter_create('x', 'tiny', alpha => -1)", "alpha must be a positive number"),
        ("SELECT llm_adapter_create('x', 'nope')", "model \"nope\" does not exist"),
        ("SELECT llm_adapter_create('fresh', 'tiny')", "adapter \"fresh\" already exists"),
        ("SELECT llm_logits(ARRAY[1, 2], 'tiny', adapter => 'nope')", "adapter \"nope\" does not exist"),
        ("SELECT llm_train('tiny', 1, adapter => 'nope')", "adapter \"nope\" does not exist"),
    ]:
        with pytest.raises(psycopg.Error, match=message):
            conn.execute(sql)
    store_hf_model(conn, "other", make_hf_model(8, 2, 3, 48, 32, 97))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="adapter \"fresh\" belongs to model \"tiny\""):
        conn.execute("SELECT llm_logits(ARRAY[1, 2], 'other', adapter => 'fresh')")
    assert conn.execute("SELECT llm_adapter_drop('fresh'), llm_adapter_drop('fresh')").fetchone() == (True, False)
    assert conn.execute("SELECT count(*) FROM llm_adapter_param").fetchone()[0] == 0


# ---- serving: every entry point, from the one base, equals the merged model ----------------------

SERVE_ADAPTERS = {"a": (4, 8.0, ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]), "b": (2, 4.0, ["attn.c_attn"])}
TEXTS = ["The quick brown fox", "Hello there, general", "In the beginning the database", "SELECT *"]
MERGED_ATOL = 1e-4    # the adapter beside the weights vs merged into them: other sums, same float32


@pytest.fixture(scope="module")
def served(pg):
    """A GPT-2-vocabulary model with the GPT-2 tokenizer, adapters a and b (PEFT's, with random B),
    and the models base_a and base_b that llm_adapter_merge made of them."""
    import copy

    from .weights import write_gpt2_tokenizer

    hf = make_hf_model(5, 2, 2, 32, 64, 50257)
    store_hf_model(pg, "lora_base", hf)
    write_gpt2_tokenizer(pg, "lora_base")
    refs = {}
    for name, (rank, alpha, targets) in SERVE_ADAPTERS.items():
        pg.execute("SELECT llm_adapter_drop(%s)", (name,))
        pg.execute("SELECT llm_model_drop(%s)", (f"lora_base_{name}",)) if pg.execute(
            "SELECT 1 FROM llm_model_config WHERE model = %s", (f"lora_base_{name}",)).fetchone() else None
        refs[name] = peft_model(copy.deepcopy(hf), rank, alpha, targets, seed=21 + rank)
        store_adapter(pg, name, "lora_base", refs[name], rank, alpha, targets)
        pg.execute("SELECT llm_adapter_merge(%s, %s)", (name, f"lora_base_{name}"))
    return refs


@pytest.mark.parametrize("adapter", sorted(SERVE_ADAPTERS))
def test_each_entry_point_with_an_adapter_equals_the_merged_model(pg, served, adapter):
    merged = f"lora_base_{adapter}"
    ids = pg.execute("SELECT llm_encode(%s, 'lora_base')", (TEXTS[0],)).fetchone()[0]

    got = np.array(pg.execute("SELECT llm_logits(%s, 'lora_base', adapter => %s)", (ids, adapter)).fetchone()[0])
    want = np.array(pg.execute("SELECT llm_logits(%s, %s)", (ids, merged)).fetchone()[0])
    np.testing.assert_allclose(got, want, atol=MERGED_ATOL, rtol=0)
    with torch.no_grad():
        ref = served[adapter](input_ids=torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(got, ref, atol=LOGITS_ATOL, rtol=0)

    def both(sql, *args):
        return (pg.execute(sql.format(model="'lora_base'", adapter=", adapter => %s"), (*args, adapter)).fetchall(),
                pg.execute(sql.format(model=f"'{merged}'", adapter=""), args).fetchall())

    ours, theirs = both("SELECT llm_generate_tokens(%s, 8, 0.0, model => {model}{adapter})", ids)
    assert ours == theirs
    ours, theirs = both("SELECT token_ids FROM llm_beam_search_tokens(%s, 3, 5, {model}{adapter})", ids)
    assert ours == theirs
    ours, theirs = both("SELECT llm_generate(%s, 6, 0.0, model => {model}{adapter})", TEXTS[1])
    assert ours == theirs
    ours, theirs = both("SELECT text FROM llm_beam_search(%s, 2, 4, {model}{adapter})", TEXTS[1])
    assert ours == theirs
    ours, theirs = both("SELECT llm_perplexity(%s, {model}{adapter})", TEXTS[2])
    assert ours[0][0] == pytest.approx(theirs[0][0], rel=1e-5)
    for sql in ("SELECT llm_embed(%s, {model}{adapter})",
                "SELECT embedding FROM llm_embed_batch(ARRAY[%s, 'x'], {model}{adapter}) WHERE ord = 1"):
        ours, theirs = both(sql, TEXTS[2])
        np.testing.assert_allclose(ours[0][0], theirs[0][0], atol=1e-5)
    streamed, single = (pg.execute("SELECT string_agg(token, '' ORDER BY step) FROM llm_generate_stream(%s, 6, 1.0, "
                                   "model => 'lora_base', seed => 3, adapter => %s)", (TEXTS[3], adapter)).fetchone()[0],
                        pg.execute("SELECT llm_generate(%s, 6, 1.0, model => 'lora_base', seed => 3, adapter => %s)",
                                   (TEXTS[3], adapter)).fetchone()[0])
    assert streamed == single


def test_rows_with_different_adapters_share_a_batch_and_equal_single_calls(pg, served):
    """One llm_generate_batch over a, none, b, a: each row is what a call with its adapter alone gives,
    bit for bit, whatever its neighbours' adapters (greedy and seeded sampling)."""
    adapters = ["a", None, "b", "a"]
    for temperature, seed in ((0.0, None), (0.9, 11)):
        rows = pg.execute("SELECT text FROM llm_generate_batch(%s, 7, %s, model => 'lora_base', seed => %s, "
                          "adapters => %s) ORDER BY ord", (TEXTS, temperature, seed, adapters)).fetchall()
        singles = [pg.execute("SELECT llm_generate(%s, 7, %s, model => 'lora_base', seed => %s, adapter => %s)",
                              (t, temperature, seed, a)).fetchone() for t, a in zip(TEXTS, adapters)]
        assert rows == singles
    # one adapter for every prompt
    rows = pg.execute("SELECT text FROM llm_generate_batch(%s, 5, 0.0, model => 'lora_base', adapters => ARRAY['b']) "
                      "ORDER BY ord", (TEXTS[:2],)).fetchall()
    assert rows == [pg.execute("SELECT llm_generate(%s, 5, 0.0, model => 'lora_base', adapter => 'b')", (t,)).fetchone()
                    for t in TEXTS[:2]]
    with pytest.raises(psycopg.errors.ArraySubscriptError, match="adapters has 2 elements for 4 prompts"):
        pg.execute("SELECT * FROM llm_generate_batch(%s, 2, model => 'lora_base', adapters => ARRAY['a', 'b'])", (TEXTS,))


@pytest.mark.parametrize("precision", ["bfloat16", "int8", "int4"])
def test_adapters_serve_at_every_precision(pg, served, precision):
    """At a reduced precision the base is the served copy's, the adapter float32: what the adapter adds
    to the logits is what it adds at float32, within the precision's noise."""
    ids = pg.execute("SELECT llm_encode(%s, 'lora_base')", (TEXTS[0],)).fetchone()[0]
    q = "SELECT llm_logits(%s, 'lora_base', adapter => %s)"
    full = {a: np.array(pg.execute(q, (ids, a)).fetchone()[0]) for a in (None, "a")}
    pg.execute("SELECT set_config('pg_llm.inference_precision', %s, false)", (precision,))
    try:
        reduced = {a: np.array(pg.execute(q, (ids, a)).fetchone()[0]) for a in (None, "a")}
    finally:
        pg.execute("RESET pg_llm.inference_precision")
    delta_full, delta_reduced = full["a"] - full[None], reduced["a"] - reduced[None]
    assert np.abs(delta_full).max() > 1e-2
    assert np.abs(delta_reduced - delta_full).max() < 0.1 * np.abs(delta_full).max()


def test_copy_merge_drop_and_the_base_going(pg, served):
    pg.execute("SELECT llm_adapter_drop('a2')")
    pg.execute("SELECT llm_adapter_copy('a', 'a2')")
    ids = [464, 2068, 7586]
    assert pg.execute("SELECT llm_logits(%s, 'lora_base', adapter => 'a2') = llm_logits(%s, 'lora_base', adapter => 'a')",
                      (ids, ids)).fetchone()[0]
    for sql, error, message in [
        ("SELECT llm_adapter_copy('a', 'b')", psycopg.errors.DuplicateObject, "adapter \"b\" already exists"),
        ("SELECT llm_adapter_copy('nope', 'c')", psycopg.errors.UndefinedObject, "adapter \"nope\" does not exist"),
        ("SELECT llm_adapter_merge('nope', 'm')", psycopg.errors.UndefinedObject, "adapter \"nope\" does not exist"),
        ("SELECT llm_adapter_merge('a', 'lora_base_b')", psycopg.errors.DuplicateObject, "already exists"),
    ]:
        with pytest.raises(error, match=message):
            pg.execute(sql)
    listed = dict(pg.execute("SELECT adapter, parameters FROM llm_adapters WHERE model = 'lora_base'").fetchall())
    assert listed["a2"] == listed["a"] == 2 * (4 * 32 + 96 * 4 + 4 * 32 + 32 * 4 + 4 * 32 + 128 * 4 + 4 * 128 + 32 * 4)
    # a copy of the base has no adapters; dropping a model drops its adapters
    pg.execute("SELECT llm_model_copy('lora_base', 'lora_base_copy')")
    assert pg.execute("SELECT count(*) FROM llm_adapter WHERE model = 'lora_base_copy'").fetchone()[0] == 0
    pg.execute("SELECT llm_adapter_copy('a2', 'a3')")
    pg.execute("UPDATE llm_adapter SET model = 'lora_base_copy' WHERE adapter = 'a3'")
    pg.execute("SELECT llm_model_drop('lora_base_copy')")
    assert pg.execute("SELECT count(*) FROM llm_adapter_param WHERE adapter = 'a3'").fetchone()[0] == 0
    assert pg.execute("SELECT llm_adapter_drop('a2')").fetchone()[0]


def test_serving_and_training_honour_the_rights_on_each_adapter(pg, served):
    """A serving role serves with the adapters its rights show it (row-level security per tenant), not
    with the others, and cannot train one; a role with no grants cannot use any."""
    import uuid

    suffix = uuid.uuid4().hex[:8]
    serve, nobody = f"lora_serve_{suffix}", f"lora_none_{suffix}"
    pg.execute(f"CREATE ROLE {serve}")
    pg.execute(f"CREATE ROLE {nobody}")
    pg.execute("SELECT llm_grant(%s)", (serve,))
    ids = [464, 2068, 7586]
    owner = pg.execute("SELECT llm_logits(%s, 'lora_base', adapter => 'a')", (ids,)).fetchone()
    policies = [("tenant_a", "llm_adapter"), ("tenant_a_param", "llm_adapter_param")]
    for table in ("llm_adapter", "llm_adapter_param"):
        pg.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
    for policy, table in policies:
        pg.execute(f"CREATE POLICY {policy} ON {table} FOR SELECT TO {serve} USING (adapter = 'a')")
    try:
        with psycopg.connect(pg.info.dsn, autocommit=True) as c:
            c.execute(f"SET ROLE {serve}")
            assert c.execute("SELECT llm_logits(%s, 'lora_base', adapter => 'a')", (ids,)).fetchone() == owner
            with pytest.raises(psycopg.errors.UndefinedObject, match="adapter \"b\" does not exist"):
                c.execute("SELECT llm_logits(%s, 'lora_base', adapter => 'b')", (ids,))
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for table llm_adapter_param"):
                c.execute("SELECT llm_train('lora_base', 1, adapter => 'a')")
            # llm_adapter shows b, its tensors do not
            pg.execute(f"ALTER POLICY tenant_a ON llm_adapter USING (true)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege,
                               match="permission denied for the tensors of adapter \"b\""):
                c.execute("SELECT llm_generate_batch(ARRAY['x', 'y'], 2, model => 'lora_base', adapters => ARRAY['a', 'b'])")
            c.execute(f"SET ROLE {nobody}")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT llm_logits(%s, 'lora_base', adapter => 'a')", (ids,))
    finally:
        for policy, table in policies:
            pg.execute(f"DROP POLICY {policy} ON {table}")
        for table in ("llm_adapter", "llm_adapter_param"):
            pg.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
        for role in (serve, nobody):
            pg.execute(f"DROP OWNED BY {role}")
            pg.execute(f"DROP ROLE {role}")
