"""llm_train: parity with PyTorch, exact resume, progress, bad input, cancel.

The reference is transformers.GPT2LMHeadModel (dropout 0, gelu_new, LayerNorm eps 1e-5) trained
with torch.optim.AdamW (nanoGPT's parameter groups: 2-D tensors decay, the rest do not),
clip_grad_norm_ and the same warmup + cosine schedule, on the same rows in the same order.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from .conftest import PGLLM_BIN
from .weights import hf_tensors, load_optim_state, load_params, store_hf_model

FORTUNES = Path("/usr/share/games/fortunes")

torch.set_num_threads(2)


def make_hf_model(seed: int, n_layer: int, n_head: int, n_embd: int, n_positions: int, vocab: int):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                     vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     activation_function="gelu_new", layer_norm_epsilon=1e-5)
    model = GPT2LMHeadModel(cfg)
    # GPT-2's initialisation leaves biases at 0 and LayerNorm at (1, 0): perturb them so that
    # a kernel that mixed them up could not pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def fill_dataset(conn, rows: np.ndarray) -> list[int]:
    """rows (N, T+1) of token ids -> llm_dataset (tokens, target = shifted by one); ids in order."""
    with conn.cursor() as cur:
        with cur.copy("COPY llm_dataset (tokens, target) FROM STDIN") as copy:
            for r in rows:
                copy.write_row(([int(x) for x in r[:-1]], [int(x) for x in r[1:]]))
    return [i for (i,) in conn.execute("SELECT id FROM llm_dataset ORDER BY id")]


def lr_at(it: int, lr_max: float, lr_min: float, warmup: int, total: int) -> float:
    """The schedule of llm_train: linear warmup, then cosine to lr_min at `total`."""
    if it < warmup:
        return lr_max * (it + 1) / warmup
    if it >= total:
        return lr_min
    ratio = (it - warmup) / (total - warmup)
    return lr_min + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr_max - lr_min)


class TorchTrainer:
    """What llm_train does, in PyTorch."""

    def __init__(self, model, rows: np.ndarray, *, batch_size, grad_accum=1, beta1=0.9, beta2=0.999,
                 eps=1e-8, wd=0.01, lr_max=1e-3, lr_min=0.0, warmup=2, total_steps=10, grad_clip=1.0):
        self.model, self.rows = model, torch.tensor(rows, dtype=torch.long)
        self.B, self.A = batch_size, grad_accum
        self.lr = dict(lr_max=lr_max, lr_min=lr_min, warmup=warmup, total=total_steps)
        self.grad_clip = grad_clip
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=lr_max, betas=(beta1, beta2), eps=eps)
        self.step_no, self.data_pos = 0, 0

    def step(self) -> tuple[float, float]:
        V = self.model.config.vocab_size
        n = len(self.rows)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step_no, **self.lr)
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for k in range(self.A):
            idx = [(self.data_pos + k * self.B + i) % n for i in range(self.B)]
            batch = self.rows[idx]
            logits = self.model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1))
            (loss / self.A).backward()
            total += loss.item() / self.A
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.step_no += 1
        self.data_pos += self.B * self.A
        return total, float(norm)


def train_sql(conn, model: str, steps: int, **kw) -> float:
    names = ", ".join(f"{k} => %s" for k in kw)
    return conn.execute(f"SELECT llm_train(%s, %s{', ' + names if names else ''})",
                        (model, steps, *kw.values())).fetchone()[0]


def log_rows(conn, model):
    return conn.execute("SELECT step, lr, loss, grad_norm, tokens_per_s FROM llm_train_log "
                        "WHERE model = %s ORDER BY step", (model,)).fetchall()


# (n_layer, n_head, n_embd, n_positions, vocab, batch_size, T, grad_accum, rows in the dataset)
SHAPES = [
    (2, 3, 48, 32, 97, 2, 16, 1, 5),      # odd head count, the data wraps around
    (1, 5, 70, 16, 211, 3, 9, 2, 8),      # d_model not a multiple of 8, odd T, accumulation
    (3, 4, 64, 64, 512, 4, 32, 1, 12),
    (1, 2, 16, 64, 50257, 16, 48, 1, 20),  # 768 x 50257 logits: the head runs in two chunks of rows
]

# Tolerances (float32 on both sides, different summation orders):
LOSS_RTOL = 1e-5      # per-step mean loss, relative
PARAM_ATOL = 2e-5     # parameters after 3 steps (they move by up to lr_max = 1e-3 per step)
PARAM_RTOL = 1e-4


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}H{}C{}V{}B{}T{}A{}".format(*s[:3], *s[4:8]))
def test_three_steps_match_pytorch(conn, shape):
    n_layer, n_head, n_embd, n_pos, vocab, B, T, A, N = shape
    hf = make_hf_model(7, n_layer, n_head, n_embd, n_pos, vocab)
    store_hf_model(conn, "tiny", hf)
    rng = np.random.default_rng(3)
    rows = rng.integers(0, vocab, size=(N, T + 1))
    fill_dataset(conn, rows)

    hp = dict(beta1=0.9, beta2=0.95, eps=1e-8, wd=0.1, lr_max=1e-3, lr_min=1e-4, warmup=2, total_steps=5,
              grad_clip=1.0)
    ref = TorchTrainer(hf, rows, batch_size=B, grad_accum=A, **hp)
    ref_log = [ref.step() for _ in range(3)]

    last = train_sql(conn, "tiny", 3, batch_size=B, grad_accum=A, **hp)
    log = log_rows(conn, "tiny")
    assert [r[0] for r in log] == [1, 2, 3]
    for (step, lr, loss, norm, tps), (ref_loss, ref_norm) in zip(log, ref_log):
        assert lr == pytest.approx(lr_at(step - 1, 1e-3, 1e-4, 2, 5), rel=1e-6)
        assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL)
        assert norm == pytest.approx(ref_norm, rel=1e-4)
        assert tps > 0
    assert last == pytest.approx(ref_log[-1][0], rel=LOSS_RTOL)

    ours = load_params(conn, "tiny")
    theirs = hf_tensors(hf)
    assert ours.keys() == theirs.keys()
    C = n_embd
    for name, expected in theirs.items():
        got = ours[name]
        if name.endswith("attn.c_attn.bias"):
            # The key bias has an exactly zero gradient (softmax ignores a constant added to every
            # score of a row): both sides see rounding noise there, which Adam scales up to
            # +-lr-sized steps of either sign. Everything else must agree tightly.
            np.testing.assert_allclose(got[C:2 * C], expected[C:2 * C], atol=3 * 1e-3, err_msg=name)
            got, expected = np.r_[got[:C], got[2 * C:]], np.r_[expected[:C], expected[2 * C:]]
        np.testing.assert_allclose(got, expected, rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=name)

    state = conn.execute("SELECT step, data_pos FROM llm_train_state WHERE model = 'tiny'").fetchone()
    assert state == (3, 3 * B * A)


# (n_layer, n_head, n_embd, n_positions, vocab, T): prompts of 1 to T tokens run both of inference's
# product paths (the matrix-vector kernel up to 8 rows, split sgemm beyond).
LOGITS_SHAPES = [(2, 3, 48, 32, 97, 16), (1, 5, 70, 16, 211, 16), (2, 4, 64, 64, 512, 40)]
# Tolerance of the mean cross-entropy (about 4 to 7 here): the two passes share the kernel library
# but not their products (BLAS over the batch vs the inference kernels) nor their attention.
FORWARD_RTOL, FORWARD_ATOL = 1e-5, 1e-6


@pytest.mark.parametrize("shape", LOGITS_SHAPES, ids=lambda s: "L{}H{}C{}V{}T{}".format(*s[:3], *s[4:]))
def test_llm_logits_equals_the_training_forward_pass(conn, db, shape):
    """One step with lr_max 0 on a one-row dataset returns the mean cross-entropy of the training
    forward pass; llm_logits of every prefix gives the same, and the rolled-back call left nothing."""
    n_layer, n_head, n_embd, n_pos, vocab, T = shape
    hf = make_hf_model(11, n_layer, n_head, n_embd, n_pos, vocab)
    store_hf_model(conn, "fwd", hf)
    row = np.random.default_rng(5).integers(0, vocab, size=T + 1)
    fill_dataset(conn, row[None, :])
    with psycopg.connect(db) as tx:
        loss = train_sql(tx, "fwd", 1, lr_max=0.0, warmup=1, batch_size=1)
        tx.rollback()
    assert conn.execute("SELECT count(*) FROM llm_train_state WHERE model = 'fwd'").fetchone() == (0,)

    tokens, targets = [int(x) for x in row[:-1]], row[1:]
    losses = []
    for t in range(T):
        logits = np.array(conn.execute("SELECT llm_logits(%s, 'fwd')", (tokens[:t + 1],)).fetchone()[0],
                          dtype=np.float64)
        top = logits.max()
        losses.append(top + math.log(np.exp(logits - top).sum()) - logits[targets[t]])
    assert loss == pytest.approx(float(np.mean(losses)), rel=FORWARD_RTOL, abs=FORWARD_ATOL)


def small_setup(conn, model="tiny", *, seed=7, shape=(2, 3, 48, 32, 97), T=16, N=6, data_seed=3):
    """A tiny model and a dataset of N rows of T tokens; returns the HF model and the rows."""
    n_layer, n_head, n_embd, n_pos, vocab = shape
    hf = make_hf_model(seed, n_layer, n_head, n_embd, n_pos, vocab)
    store_hf_model(conn, model, hf)
    rows = np.random.default_rng(data_seed).integers(0, vocab, size=(N, T + 1))
    if conn.execute("SELECT count(*) FROM llm_dataset").fetchone()[0] == 0:
        fill_dataset(conn, rows)
    return hf, rows


def snapshot(conn, model):
    """Everything llm_train writes for a model."""
    return (load_params(conn, model), load_optim_state(conn, model),
            conn.execute("SELECT step, data_pos FROM llm_train_state WHERE model = %s", (model,)).fetchone(),
            [r[:4] for r in log_rows(conn, model)])


def assert_same_state(a, b):
    params_a, optim_a, state_a, log_a = a
    params_b, optim_b, state_b, log_b = b
    assert params_a.keys() == params_b.keys() and optim_a.keys() == optim_b.keys()
    for name in params_a:
        assert np.array_equal(params_a[name], params_b[name]), name
    for name in optim_a:
        assert np.array_equal(optim_a[name][0], optim_b[name][0]), name
        assert np.array_equal(optim_a[name][1], optim_b[name][1]), name
    assert state_a == state_b
    assert log_a == log_b


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_six_steps_in_one_call_equal_three_plus_three(conn, db, dropout):
    """Resume is exact: parameters, moments, log and data position, bit for bit; the second
    call of three runs in a new session, so everything it uses comes back from the tables."""
    hp = dict(batch_size=4, lr_max=1e-3, warmup=2, total_steps=6, wd=0.1, dropout=dropout, seed=5)
    small_setup(conn, "one")       # 6 rows, 4 per step: the data wraps around mid-run
    small_setup(conn, "two")
    train_sql(conn, "one", 6, **hp)
    train_sql(conn, "two", 3, **hp)
    with psycopg.connect(db, autocommit=True) as other:
        train_sql(other, "two", 3, **hp)
    one, two = snapshot(conn, "one"), snapshot(conn, "two")
    assert one[2] == (6, 24)
    assert [r[0] for r in one[3]] == [1, 2, 3, 4, 5, 6]
    assert_same_state(one, two)


# ---- dropout: the same masks in PyTorch -----------------------------------------------------

def _splitmix64(x):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def dropout_mask(p: float, seed: int, step: int, micro: int, site: int, n: int) -> torch.Tensor:
    """The keep mask (times 1/(1-p)) that llm_train's dropout draws for n elements of one site:
    element i is kept when the top 24 bits of splitmix64(key ^ i * K) reach p * 2^24."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed))
        for x in (step, micro, site):
            key = _splitmix64(key ^ np.uint64(x))
        i = np.arange(n, dtype=np.uint64)
        bits = _splitmix64(key ^ (i * np.uint64(0xD1B54A32D192ED03))) >> np.uint64(40)
    threshold = int(float(np.float32(p)) * 16777216.0)
    scale = np.float32(1.0) / (np.float32(1.0) - np.float32(p))
    return torch.from_numpy(np.where(bits >= threshold, scale, np.float32(0.0)).astype(np.float32))


def gpt2_forward_with_masks(model, idx, p, seed, step, micro):
    """GPT-2's forward written out, with llm_train's dropout masks at GPT-2's three places:
    embeddings, attention probabilities, and each residual branch."""
    tr = model.transformer
    B, T = idx.shape
    C, NH = model.config.n_embd, model.config.n_head
    hs = C // NH
    site = lambda layer, k: (layer + 1) * 4 + k  # noqa: E731  (as site_key in train.c)
    x = tr.wte(idx) + tr.wpe(torch.arange(T))
    x = x * dropout_mask(p, seed, step, micro, site(-1, 0), B * T * C).view(B, T, C)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer, block in enumerate(tr.h):
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, NH, hs).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
        att = torch.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)
        att = att * dropout_mask(p, seed, step, micro, site(layer, 0), B * NH * T * T).view(B, NH, T, T)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + block.attn.c_proj(y) * dropout_mask(p, seed, step, micro, site(layer, 1), B * T * C).view(B, T, C)
        h = block.mlp.c_proj(block.mlp.act(block.mlp.c_fc(block.ln_2(x))))
        x = x + h * dropout_mask(p, seed, step, micro, site(layer, 2), B * T * C).view(B, T, C)
    return tr.ln_f(x) @ tr.wte.weight.T


def test_dropout_matches_pytorch_with_the_same_masks(conn):
    p, seed, B, T, A = 0.2, 11, 2, 12, 2
    hf = make_hf_model(5, 2, 3, 48, 16, 97)
    store_hf_model(conn, "drop", hf)
    rows = np.random.default_rng(9).integers(0, 97, size=(5, T + 1))
    fill_dataset(conn, rows)
    # the written-out forward is GPT-2's: without dropout it gives transformers' logits
    with torch.no_grad():
        idx = torch.tensor(rows[:2, :-1])
        np.testing.assert_allclose(gpt2_forward_with_masks(hf, idx, 0.0, seed, 0, 0).numpy(),
                                   hf(input_ids=idx).logits.numpy(), rtol=1e-5, atol=1e-5)

    hp = dict(lr_max=1e-3, warmup=1, total_steps=4, wd=0.1)
    ref = TorchTrainer(hf, rows, batch_size=B, grad_accum=A, **hp)
    ref_losses = []
    for step in range(3):
        for group in ref.opt.param_groups:
            group["lr"] = lr_at(step, 1e-3, 0.0, 1, 4)
        ref.opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(A):
            batch = torch.tensor(rows[[(step * B * A + micro * B + i) % len(rows) for i in range(B)]])
            logits = gpt2_forward_with_masks(hf, batch[:, :-1], p, seed, step, micro)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), batch[:, 1:].reshape(-1))
            (loss / A).backward()
            total += loss.item() / A
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        ref.opt.step()
        ref_losses.append(total)

    train_sql(conn, "drop", 3, batch_size=B, grad_accum=A, dropout=p, seed=seed, **hp)
    losses = [r[2] for r in log_rows(conn, "drop")]
    assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL)
    ours = load_params(conn, "drop")
    for name, expected in hf_tensors(hf).items():
        got = ours[name]
        if name.endswith("attn.c_attn.bias"):  # the key bias: see test_three_steps_match_pytorch
            got, expected = np.r_[got[:48], got[96:]], np.r_[expected[:48], expected[96:]]
        np.testing.assert_allclose(got, expected, rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=name)


def test_dropout_is_seeded_and_changes_the_loss(conn):
    for name in ("a", "b", "c", "d"):
        small_setup(conn, name)
    losses = {}
    for name, dropout, seed in (("a", 0.0, 1), ("b", 0.2, 1), ("c", 0.2, 1), ("d", 0.2, 2)):
        losses[name] = train_sql(conn, name, 2, batch_size=2, warmup=1, dropout=dropout, seed=seed)
    assert losses["b"] == losses["c"]
    assert losses["b"] != losses["a"] and losses["b"] != losses["d"]
    assert all(math.isfinite(x) for x in losses.values())


def test_the_seed_call_and_architecture_overrides(conn):
    """The walkthrough's call as written: warmup 2000 > steps is a slice of a longer warmup."""
    small_setup(conn, "m")
    loss = conn.execute("SELECT llm_train('m', 2, beta1 => 0.9, beta2 => 0.999, eps => 1e-8, "
                        "wd => 0.01, lr_max => 2.5e-4, warmup => 2000)").fetchone()[0]
    assert math.isfinite(loss)
    lrs = [r[1] for r in log_rows(conn, "m")]
    assert lrs == pytest.approx([2.5e-4 * 1 / 2000, 2.5e-4 * 2 / 2000], rel=1e-6)
    # the architecture arguments confirm the registered architecture (D or d, as SQL folds it)
    conn.execute("SELECT llm_train('m', 1, n_layer => 2, n_head => 3, D => 48, vocab => 97, warmup => 1)")
    conn.execute('SELECT llm_train(\'m\', 1, "D" => 48, warmup => 1)')
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="n_head = 4 does not match"):
        conn.execute("SELECT llm_train('m', 1, n_head => 4)")
    assert conn.execute("SELECT step FROM llm_train_state WHERE model = 'm'").fetchone() == (4,)


def test_progress_messages_and_commit_visibility(conn, db):
    """Each step reports to clients that ask (debug1); other sessions see the new weights
    (and a new weights_version) only after commit."""
    small_setup(conn, "m")
    before = load_params(conn, "m")
    version = conn.execute("SELECT weights_version FROM llm_model_config WHERE model = 'm'").fetchone()[0]
    messages = []
    with psycopg.connect(db) as tx:
        tx.add_notice_handler(lambda d: messages.append(d.message_primary))
        tx.execute("SET client_min_messages = debug1")
        tx.execute("SELECT llm_train('m', 3, warmup => 1, batch_size => 2)")
        assert np.array_equal(load_params(conn, "m")["wte"], before["wte"])      # not committed yet
        tx.commit()
    steps = [m for m in messages if m.startswith("llm_train step=")]
    assert len(steps) == 3 and steps[-1].endswith("done=3/3")
    assert any(m.startswith("llm_train: 3 steps") for m in messages)
    after = load_params(conn, "m")
    assert not np.array_equal(after["wte"], before["wte"])
    assert conn.execute("SELECT weights_version FROM llm_model_config WHERE model = 'm'").fetchone()[0] > version


STEP_FIELDS = {"event", "model", "step", "done", "steps", "total_steps", "loss", "lr", "grad_norm", "tokens_per_s"}
END_FIELDS = {"event", "model", "steps", "seconds", "loading_s", "training_s", "writing_s"}


def test_progress_channel_contract(conn, db):
    """The documented channel (README, "Training progress"): a client at client_min_messages =
    debug1 receives, per step, one message whose detail is a JSON object with the step's fields,
    equal to what llm_train_log records, then one at the end; pgllm reads them with train_event."""
    from pgllm.commands.train import train_event

    small_setup(conn, "m")
    train_sql(conn, "m", 2, warmup=1, batch_size=2, total_steps=10)  # the counter does not start at 0
    received = []  # (event or None, message): a Diagnostic is only valid inside the handler
    with psycopg.connect(db, autocommit=True) as client:
        client.add_notice_handler(lambda d: received.append((train_event(d), d.message_primary or "")))
        client.execute("SET client_min_messages = debug1")
        client.execute("SELECT llm_train('m', 3, warmup => 1, batch_size => 2, total_steps => 10)")
    events = [e for e, _ in received if e is not None]
    steps = [e for e in events if e["event"] == "llm_train.step"]
    assert [e["event"] for e in events] == ["llm_train.step"] * 3 + ["llm_train.end"]
    assert all(set(e) >= STEP_FIELDS for e in steps) and set(events[-1]) >= END_FIELDS
    log = log_rows(conn, "m")[2:]
    for i, (e, (step, lr, loss, norm, tps)) in enumerate(zip(steps, log)):
        assert (e["model"], e["step"], e["done"], e["steps"], e["total_steps"]) == ("m", step, i + 1, 3, 10)
        assert (e["loss"], e["lr"], e["grad_norm"], e["tokens_per_s"]) == pytest.approx((loss, lr, norm, tps), rel=1e-6)
    end = events[-1]
    assert (end["model"], end["steps"]) == ("m", 3)
    assert end["seconds"] >= end["loading_s"] + end["training_s"] + end["writing_s"] - 1e-6 > 0
    # any other message (PostgreSQL's own debug1 output) is not an event
    assert all(e is None for e, message in received if not message.startswith("llm_train"))


def test_rollback_after_training_leaves_no_trace(conn, db):
    """BEGIN; llm_train; ROLLBACK: the tables and this backend's cached weights are as before,
    so training again gives exactly what a fresh session gives."""
    small_setup(conn, "a")
    small_setup(conn, "b")
    before = snapshot(conn, "a")
    with psycopg.connect(db) as tx:
        train_sql(tx, "a", 2, batch_size=2, warmup=1)
        tx.rollback()
        assert_same_state(snapshot(conn, "a"), before)
        train_sql(tx, "a", 2, batch_size=2, warmup=1)
        tx.commit()
    with psycopg.connect(db, autocommit=True) as fresh:
        train_sql(fresh, "b", 2, batch_size=2, warmup=1)
    a, b = snapshot(conn, "a"), snapshot(conn, "b")
    assert_same_state(a, b)


def test_nan_loss_stops_training_and_writes_nothing(conn):
    small_setup(conn, "m")
    before = snapshot(conn, "m")
    # lr 1e30: step 1's loss is fine, its update is not (and step 2's loss would be NaN)
    with pytest.raises(psycopg.errors.NumericValueOutOfRange,
                       match=r"the update of step 1 left parameters of model \"m\" that are not finite"):
        train_sql(conn, "m", 5, lr_max=1e30, warmup=0, grad_clip=0.0)
    assert_same_state(snapshot(conn, "m"), before)
    assert snapshot(conn, "m")[2] is None
    # the backend dropped its modified weights: a good call now starts from the stored ones
    small_setup(conn, "ref")
    train_sql(conn, "m", 1, warmup=1)
    train_sql(conn, "ref", 1, warmup=1)
    assert np.array_equal(load_params(conn, "m")["wte"], load_params(conn, "ref")["wte"])


BAD_CALLS = [
    ("steps => 0", {"steps": 0}, "steps must be positive"),
    ("steps < 0", {"steps": -3}, "steps must be positive"),
    ("lr_max < 0", {"lr_max": -1e-3}, "lr_max must not be negative"),
    ("lr_min > lr_max", {"lr_min": 1.0}, "lr_min must be between 0 and lr_max"),
    ("batch_size 0", {"batch_size": 0}, "batch_size must be between"),
    ("dropout 1", {"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ("beta1 1", {"beta1": 1.0}, "beta1 and beta2"),
    ("unknown model", {"model": "nope"}, 'model "nope" does not exist'),
]


@pytest.mark.parametrize("label,kw,message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_are_refused(conn, label, kw, message):
    small_setup(conn, "m")
    before = snapshot(conn, "m")
    kw = {"model": "m", "steps": 2, "warmup": 1, **kw}
    with pytest.raises(psycopg.Error, match=message):
        train_sql(conn, kw.pop("model"), kw.pop("steps"), **kw)
    assert_same_state(snapshot(conn, "m"), before)


def test_bad_data_and_missing_weights_are_refused(conn):
    # empty dataset
    hf = make_hf_model(1, 1, 2, 16, 8, 50)
    store_hf_model(conn, "m", hf)
    with pytest.raises(psycopg.errors.NoDataFound, match='dataset "train" of llm_dataset is empty'):
        train_sql(conn, "m", 1)
    # block size larger than n_positions (8)
    fill_dataset(conn, np.zeros((2, 10), dtype=int))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="block size 9 of dataset \"train\" is larger than .* n_positions 8"):
        train_sql(conn, "m", 1)
    conn.execute("TRUNCATE llm_dataset")
    # token ids beyond the vocabulary (50), in a row that only the second step reads
    rows = np.ones((4, 9), dtype=int)
    rows[3, 4] = 50
    ids = fill_dataset(conn, rows)
    with pytest.raises(psycopg.errors.DataException,
                       match=rf"llm_dataset row {ids[3]}: tokens id 50 is outside the model's vocabulary \(0 .. 49\)"):
        train_sql(conn, "m", 2, batch_size=2, warmup=1)
    # rows of different lengths: refused at write; rows written before that check (0.1.0) at read
    conn.execute("TRUNCATE llm_dataset")
    fill_dataset(conn, np.ones((2, 9), dtype=int))
    with pytest.raises(psycopg.errors.CheckViolation, match='every row of dataset "train" must have the same length'):
        fill_dataset(conn, np.ones((1, 5), dtype=int))
    conn.execute("ALTER TABLE llm_dataset DISABLE TRIGGER llm_dataset_length_insert")
    fill_dataset(conn, np.ones((1, 5), dtype=int))
    conn.execute("ALTER TABLE llm_dataset ENABLE TRIGGER llm_dataset_length_insert")
    with pytest.raises(psycopg.errors.DataException, match="must be a one-dimensional int.. of 8 ids"):
        train_sql(conn, "m", 1, batch_size=3, warmup=1)
    assert snapshot(conn, "m")[1:] == ({}, None, [])
    # a model without weights
    conn.execute("INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) "
                 "VALUES ('empty', 1, 2, 16, 8, 50)")
    with pytest.raises(psycopg.errors.NoDataFound, match='model "empty" has no weights'):
        train_sql(conn, "empty", 1)
    assert conn.execute("SELECT count(*) FROM llm_train_log").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM llm_train_state").fetchone()[0] == 0


def medium_setup(conn, model="med"):
    """Big enough that 1000 steps take minutes: something to interrupt."""
    small_setup(conn, model, shape=(4, 4, 128, 128, 2000), T=128, N=8)


@pytest.mark.parametrize("how", ["cancel", "statement_timeout"])
def test_interrupt_stops_within_a_second_and_rolls_back(conn, db, how):
    medium_setup(conn)
    before = snapshot(conn, "med")
    with psycopg.connect(db, autocommit=True) as worker:
        if how == "statement_timeout":
            worker.execute("SET statement_timeout = '1500ms'")
            timer = None
        else:
            timer = threading.Timer(1.5, worker.cancel)
            timer.start()
        start = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            train_sql(worker, "med", 1000, batch_size=8, warmup=1)
        elapsed = time.monotonic() - start
        assert elapsed < 1.5 + 1.0, f"stopped after {elapsed:.2f} s"
        # the session is healthy and its cache consistent: a short call works from the stored weights
        worker.execute("SET statement_timeout = 0")
        train_sql(worker, "med", 1, batch_size=2, warmup=1)
    small_setup(conn, "ref", shape=(4, 4, 128, 128, 2000), T=128, N=8)
    train_sql(conn, "ref", 1, batch_size=2, warmup=1)
    assert np.array_equal(load_params(conn, "med")["wte"], load_params(conn, "ref")["wte"])
    assert before[2] is None


# ---- pgllm train / pgllm log ------------------------------------------------------------------

def test_pgllm_train_in_chunks_equals_one_call(cli, conn, db):
    """Chunks of --commit-every steps, each its own transaction, follow one schedule: the result
    is bit for bit that of a single llm_train call over the same schedule."""
    small_setup(conn, "cli")
    small_setup(conn, "sql")
    result = cli("--dsn", db, "train", "--model", "cli", "--steps", "7", "--commit-every", "3", "--batch-size", "2",
                 "--warmup", "2", "--lr-max", "1e-3", "--lr-min", "1e-4", "--wd", "0.1")
    assert result.exit_code == 0, result.output
    assert 'trained model "cli": steps 1..7 of a 7-step schedule' in result.output
    assert "(3 commits)" in result.output
    train_sql(conn, "sql", 7, batch_size=2, warmup=2, lr_max=1e-3, lr_min=1e-4, wd=0.1, total_steps=7)
    assert_same_state(snapshot(conn, "cli"), snapshot(conn, "sql"))
    # a second run continues the counter and the data position, on a new schedule from step 7 (it says so)
    result = cli("--dsn", db, "train", "--model", "cli", "--steps", "2", "--batch-size", "2", "--warmup", "1")
    assert result.exit_code == 0, result.output
    assert "new schedule, warmup 1 to lr 0.00025, cosine to 0 at step 9 (from step 7)" in result.output
    assert "steps 8..9 of a 2-step schedule (new, from step 7)" in result.output
    assert conn.execute("SELECT step, data_pos FROM llm_train_state WHERE model = 'cli'").fetchone() == (9, 18)
    train_sql(conn, "sql", 2, batch_size=2, warmup=1, total_steps=9, schedule_start=7)
    assert_same_state(snapshot(conn, "cli"), snapshot(conn, "sql"))
    assert conn.execute("SELECT lr FROM llm_train_log WHERE model = 'cli' AND step = 8").fetchone()[0] == \
        pytest.approx(2.5e-4)


def test_pgllm_train_schedule_is_new_or_continued(cli, conn, db):
    """A trained model does not silently run at the end of its old schedule: --schedule continue
    follows the recorded one (refusing one that has ended), --schedule new starts again."""
    small_setup(conn, "m")
    small_setup(conn, "ref")
    base = ["--dsn", db, "train", "--model", "m", "--batch-size", "2", "--commit-every", "2"]
    result = cli(*base, "--steps", "3", "--total-steps", "6", "--warmup", "2", "--lr-max", "1e-3")
    assert result.exit_code == 0, result.output
    assert "steps 1..3 of a 6-step schedule (new, from step 0)" in result.output
    result = cli(*base, "--steps", "3", "--schedule", "continue")
    assert result.exit_code == 0, result.output
    assert "continued schedule, warmup 2 to lr 0.001, cosine to 0 at step 6 (from step 0)" in result.output
    assert "steps 4..6 of a 6-step schedule (continued, from step 0)" in result.output
    # bit for bit the six steps of one schedule
    train_sql(conn, "ref", 6, batch_size=2, warmup=2, lr_max=1e-3, total_steps=6)
    assert_same_state(snapshot(conn, "m"), snapshot(conn, "ref"))
    result = cli(*base, "--steps", "3", "--schedule", "continue")
    assert result.exit_code == 1
    assert 'the schedule of model "m" ended at step 6 (it is at step 6)' in result.output
    assert "--schedule new" in result.output
    result = cli(*base, "--steps", "3", "--schedule", "continue", "--lr-max", "1")
    assert result.exit_code == 1 and "--lr-max would change it" in result.output
    result = cli(*base, "--steps", "2", "--lr-max", "1e-3", "--warmup", "1")
    assert result.exit_code == 0, result.output
    lrs = [r[0] for r in conn.execute("SELECT lr FROM llm_train_log WHERE model = 'm' AND step > 6 ORDER BY step")]
    assert lrs == [pytest.approx(1e-3), pytest.approx(1e-3)]  # warmup 1, then the cosine from its top
    result = cli("--dsn", db, "train", "--model", "ref", "--steps", "1", "--schedule", "continue")
    assert result.exit_code == 1 and 'model "ref" has no schedule of pgllm train to continue' in result.output


def test_pgllm_train_bad_input(cli, conn, db):
    small_setup(conn, "m")
    # a warmup longer than the schedule is legal: the rate never reaches its peak (a note says so)
    result = cli("--dsn", db, "train", "--model", "m", "--steps", "2", "--warmup", "10", "--batch-size", "2")
    assert result.exit_code == 0 and "the warmup (10 steps) is longer than the schedule (2 steps)" in result.output
    assert "never reaches --lr-max" in result.output
    with conn.cursor() as cur:
        notices = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        cur.execute("SELECT llm_train('m', 1, warmup => 10, total_steps => 5, batch_size => 2)")
    assert any("warmup (10 steps) is longer than the schedule (total_steps = 5)" in n for n in notices)
    assert conn.execute("SELECT lr FROM llm_train_log WHERE model = 'm' ORDER BY step DESC LIMIT 1"
                        ).fetchone()[0] == pytest.approx(2.5e-4 * 3 / 10)
    result = cli("--dsn", db, "train", "--model", "nope", "--steps", "5")
    assert result.exit_code == 1 and 'model "nope" does not exist' in result.output
    result = cli("--dsn", db, "train", "--model", "m", "--steps", "2", "--lr-max", "-1")
    assert result.exit_code == 1 and "lr_max must not be negative" in result.output
    assert conn.execute("SELECT count(*) FROM llm_train_log").fetchone()[0] == 3  # the warmup runs above


def test_ctrl_c_loses_at_most_the_chunk_in_progress(conn, db):
    medium_setup(conn)
    proc = subprocess.Popen([str(PGLLM_BIN), "--dsn", db, "train", "--model", "med", "--steps", "1000",
                             "--commit-every", "2", "--batch-size", "4", "--warmup", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            row = conn.execute("SELECT step FROM llm_train_state WHERE model = 'med'").fetchone()
            if row and row[0] >= 2:
                break
            time.sleep(0.2)
        time.sleep(0.3)  # into the next chunk
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Error: interrupted" in err and "steps committed" in err
    step = conn.execute("SELECT step FROM llm_train_state WHERE model = 'med'").fetchone()[0]
    assert step >= 2 and step % 2 == 0
    assert [r[0] for r in log_rows(conn, "med")] == list(range(1, step + 1))
    assert len(load_optim_state(conn, "med")) == len(load_params(conn, "med"))


# A SIGINT that Python delivers while the notice handler drawing pgllm train's progress runs:
# the handler raises KeyboardInterrupt there, psycopg calls it from libpq's callback, which drops
# it, and the statement runs on. `python` is Python's own handler, `pgllm` the command's
# (pgllm/interrupt.py), which cancels the statement instead of raising.
SIGINT_IN_NOTICE_HANDLER = textwrap.dedent("""
    import signal, sys
    import psycopg
    from pgllm import db, interrupt
    if sys.argv[2] == "pgllm":
        interrupt.install()
    conn = db.connect(sys.argv[1], autocommit=True)
    conn.execute("SET client_min_messages = debug1")
    sent = []
    def on_notice(diag):
        if not sent and "llm_train.step" in (diag.message_detail or ""):
            sent.append(1)
            signal.raise_signal(signal.SIGINT)
            sum(range(1000))  # a call: Python runs its signal handler here, inside this one
    conn.add_notice_handler(on_notice)
    try:
        conn.execute("SELECT llm_train('med', 12, batch_size => 2, warmup => 1)")
        print("completed", flush=True)
    except psycopg.errors.QueryCanceled:
        print("cancelled", interrupt.requested(), flush=True)
""")


@pytest.mark.parametrize("handler", ["python", "pgllm"])
def test_ctrl_c_inside_the_progress_handler(conn, db, handler):
    """Why Ctrl-C was lost on a busy machine (issue 22), and that pgllm's handler stops training
    wherever the signal lands."""
    medium_setup(conn)
    proc = subprocess.run([sys.executable, "-c", SIGINT_IN_NOTICE_HANDLER, db, handler],
                          capture_output=True, text=True, timeout=600)
    step = conn.execute("SELECT coalesce((SELECT step FROM llm_train_state WHERE model = 'med'), 0)").fetchone()[0]
    if handler == "python":
        assert proc.stdout.split() == ["completed"] and step == 12, proc.stderr  # the interrupt was lost
    else:
        assert proc.returncode == 0 and proc.stdout.split() == ["cancelled", "True"], proc.stderr
        assert step == 0  # rolled back


def test_pgllm_log_draws_the_curve(cli, conn, db, tmp_path):
    small_setup(conn, "m")
    result = cli("--dsn", db, "log", "--model", "m")
    assert result.exit_code == 1 and 'model "m" has no training log' in result.output
    train_sql(conn, "m", 12, batch_size=2, warmup=2, lr_max=3e-3)
    png = tmp_path / "loss.png"
    result = cli("--dsn", db, "log", "--model", "m", "--png", str(png), "--width", "20", "--height", "6")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("m: 12 steps (1..12), loss ")
    chart = [line for line in lines if "|" in line]
    assert len(chart) == 6 and sum(line.count("*") for line in chart) == 12
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.skipif(not FORTUNES.exists(), reason="Debian package fortunes is not installed")
def test_loss_falls_on_real_text(cli, conn, db):
    """Public-domain text (Debian's fortunes), GPT-2's tokenizer, a freshly initialised model."""
    files = [str(FORTUNES / name) for name in ("fortunes", "literature", "riddles")]
    result = cli("--dsn", db, "dataset", "--input", *files, "--split-on", "%", "--block-size", "64", "--truncate")
    assert result.exit_code == 0, result.output
    # a fresh model: GPT-2's initialisation (std 0.02, LayerNorm 1/0), as pgllm init makes it
    torch.manual_seed(0)
    fresh = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=50257))
    store_hf_model(conn, "fresh", fresh)
    result = cli("--dsn", db, "train", "--model", "fresh", "--steps", "40", "--batch-size", "4",
                 "--lr-max", "3e-3", "--warmup", "4", "--commit-every", "20")
    assert result.exit_code == 0, result.output
    losses = [r[2] for r in log_rows(conn, "fresh")]
    assert len(losses) == 40
    assert losses[0] == pytest.approx(math.log(50257), abs=0.3)     # uniform at the start
    assert np.mean(losses[-5:]) < losses[0] - 2.5, losses


@pytest.mark.parametrize("command", ["train", "generate", "eval", "dataset"])
def test_ctrl_c_stops_each_long_command(conn, db, command):
    """Ctrl-C while the command's statement waits in the server (for a lock this test holds, a
    state, not a clock): the statement is cancelled and the command ends with one line, exit 130."""
    medium_setup(conn)
    conn.execute("CREATE TABLE docs (body text)")
    conn.execute("INSERT INTO docs VALUES ('Hello there, general.')")
    write_gpt2_tokenizer_for(conn, "med")
    args, table, query = {
        "train": (["train", "--model", "med", "--steps", "5", "--any-tokenizer"], "llm_dataset", "%llm_train%"),
        "generate": (["generate", "a", "--model", "med", "--stream"], "llm_param", "%llm_generate_stream%"),
        "eval": (["eval", "med", "--dataset", "train", "--any-tokenizer"], "llm_dataset", "%llm_eval%"),
        "dataset": (["dataset", "--model", "med", "--query", "SELECT body FROM docs", "--dataset", "d"], "docs",
                    "%llm_dataset_build%"),
    }[command]
    with psycopg.connect(db) as blocker:
        blocker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        proc = subprocess.Popen([str(PGLLM_BIN), "--dsn", db, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not conn.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE query LIKE %s AND wait_event_type = 'Lock' "
                    "AND pid <> pg_backend_pid()", (query,)).fetchone():
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        blocker.rollback()
    assert proc.returncode == 130, err
    assert len(err.splitlines()) == 1 and err.startswith("Error: interrupted"), err
    if command == "generate":
        assert out == "\n"  # the error is on a line of its own


def write_gpt2_tokenizer_for(conn, model):
    from .weights import write_gpt2_tokenizer

    write_gpt2_tokenizer(conn, model)
