"""Test setup: Hugging Face GPT-2 models and pg_llm's tables.

Not a mock: these write the rows that `pgllm import` and `pgllm tokenizer` write (llm_model_config,
one llm_param row per tensor of the state dict without `transformer.`, the bundled GPT-2
tokenizer), so the engine is tested against real reference models independently of the import.
"""

from __future__ import annotations

import functools

import numpy as np
import psycopg
import torch
from transformers import GPT2Config, GPT2LMHeadModel


def random_gpt2(seed: int = 0, **config) -> GPT2LMHeadModel:
    """A GPT-2 with random weights (float32, eval mode). config: GPT2Config keyword arguments."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config))
    return model.float().eval()


def hf_tensors(hf_model) -> dict[str, np.ndarray]:
    """The model's tensors under pg_llm's names (the state dict without `transformer.`), float32."""
    out = {}
    for name, t in hf_model.transformer.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older transformers, not parameters
        if name in ("wte.weight", "wpe.weight"):
            name = name.removesuffix(".weight")
        out[name] = t.detach().cpu().numpy().astype("<f4")
    return out


def store_hf_model(conn, model_name: str, hf_model) -> None:
    """Register the model's architecture and write every tensor into llm_param."""
    cfg = hf_model.config
    conn.execute(
        "INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) "
        "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (model) DO UPDATE SET n_layer = excluded.n_layer, "
        "n_head = excluded.n_head, d_model = excluded.d_model, n_positions = excluded.n_positions, "
        "vocab = excluded.vocab",
        (model_name, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions, cfg.vocab_size))
    conn.execute("DELETE FROM llm_param WHERE model = %s", (model_name,))
    with conn.cursor() as cur:
        with cur.copy("COPY llm_param (model, name, shape, data) FROM STDIN") as copy:
            for name, a in hf_tensors(hf_model).items():
                copy.write_row((model_name, name, list(a.shape), a.tobytes()))


def load_params(conn, model_name: str) -> dict[str, np.ndarray]:
    """Every tensor of the model in llm_param, as float32 arrays of their stored shapes."""
    rows = conn.execute("SELECT name, shape, data FROM llm_param WHERE model = %s", (model_name,)).fetchall()
    return {name: np.frombuffer(data, dtype="<f4").reshape(shape) for name, shape, data in rows}


def load_optim_state(conn, model_name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rows = conn.execute("SELECT name, m, v FROM llm_optim_state WHERE model = %s", (model_name,)).fetchall()
    return {name: (np.frombuffer(m, dtype="<f4"), np.frombuffer(v, dtype="<f4")) for name, m, v in rows}


@functools.lru_cache(maxsize=1)
def _gpt2_tokenizer_files() -> tuple[bytes, bytes]:
    from pgllm.bundled import gpt2_tokenizer_files

    vocab_file, merges_file = gpt2_tokenizer_files()
    return vocab_file.read_bytes(), merges_file.read_bytes()


def write_gpt2_tokenizer(conn: psycopg.Connection, name: str) -> None:
    """Give model `name` the GPT-2 tokenizer bundled with pgllm, as `pgllm tokenizer` does."""
    from pgllm.commands.tokenizer import load

    vocab, merges = _gpt2_tokenizer_files()
    with conn.transaction():
        load(conn, name, vocab, merges, replace=True)
