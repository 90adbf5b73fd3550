"""llm_train: parity with PyTorch, exact resume, progress, bad input, cancel.

The reference is transformers.GPT2LMHeadModel (dropout 0, gelu_new, LayerNorm eps 1e-5) trained
with torch.optim.AdamW (nanoGPT's parameter groups: 2-D tensors decay, the rest do not),
clip_grad_norm_ and the same warmup + cosine schedule, on the same rows in the same order.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import psycopg
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from .weights import hf_tensors, load_optim_state, load_params, store_hf_model

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
