"""Test utility: put a transformers GPT-2 model's weights into pg_llm's tables directly.

This is test setup, not a mock: it writes the rows that `pgllm import` writes (llm_model_config,
then one llm_param row per tensor of the Hugging Face state dict without `transformer.`), so the
engine is tested against a real reference model without depending on the import command.
"""

from __future__ import annotations

import functools

import psycopg
import torch
from transformers import GPT2Config, GPT2LMHeadModel


def random_gpt2(seed: int = 0, **config) -> GPT2LMHeadModel:
    """A GPT-2 with random weights (float32, eval mode). config: GPT2Config keyword arguments."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config))
    return model.float().eval()


def write_model_weights(conn: psycopg.Connection, name: str, model: GPT2LMHeadModel) -> None:
    """Register `name` with the model's architecture and write all of its tensors."""
    cfg = model.config
    conn.execute(
        "INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) "
        "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (model) DO UPDATE SET n_layer = EXCLUDED.n_layer, "
        "n_head = EXCLUDED.n_head, d_model = EXCLUDED.d_model, n_positions = EXCLUDED.n_positions, "
        "vocab = EXCLUDED.vocab",
        (name, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions, cfg.vocab_size))
    conn.execute("DELETE FROM llm_param WHERE model = %s", (name,))
    with conn.cursor().copy("COPY llm_param (model, name, shape, data) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["text", "text", "int4[]", "bytea"])
        for key, tensor in model.state_dict().items():
            if key.startswith("lm_head.") or key.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # the head is tied to wte; the others are buffers, not parameters
            tensor_name = key.removeprefix("transformer.")
            if tensor_name in ("wte.weight", "wpe.weight"):
                tensor_name = tensor_name.removesuffix(".weight")
            t = tensor.detach().float().contiguous()
            copy.write_row((name, tensor_name, list(t.shape), t.numpy().astype("<f4").tobytes()))


@functools.lru_cache(maxsize=1)
def _gpt2_tokenizer_entries():
    from pgllm.bundled import gpt2_tokenizer_files
    from pgllm.commands.tokenizer import parse_merges, parse_vocab

    vocab_file, merges_file = gpt2_tokenizer_files()
    vocab = parse_vocab(vocab_file)
    return vocab, parse_merges(merges_file, {token for token, _ in vocab})


def write_gpt2_tokenizer(conn: psycopg.Connection, name: str) -> None:
    """Give model `name` the GPT-2 tokenizer bundled with pgllm, as `pgllm tokenizer` does."""
    from pgllm.commands.tokenizer import load

    vocab, merges = _gpt2_tokenizer_entries()
    with conn.transaction():
        load(conn, name, vocab, merges, replace=True)
