"""`pgllm export`: a model's weights from the database into a file on this machine.

npz: pgllm's checkpoint file (what `pgllm import` reads), with the model's tokenizer when it has
one; safetensors: a Hugging Face model directory (config.json, generation_config.json,
model.safetensors and the tokenizer's files) that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load, and that `pgllm convert DIR` turns back into a checkpoint file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import typer

from .. import db, npz, safetensors_file, tokenizer_files
from ..errors import PgllmError
from ..options import MODEL, MODEL_POSITIONAL
from ..progress import bytes_progress
from .tokenizer import write_files

FORMATS = ("npz", "safetensors")


def hf_key(name: str) -> str:
    """pg_llm's tensor name as GPT2LMHeadModel's state dict names it."""
    return f"transformer.{name}.weight" if name in ("wte", "wpe") else f"transformer.{name}"


def hf_config(cfg: npz.Config, eos: int) -> dict:
    """config.json for GPT2LMHeadModel: the architecture, GPT-2's settings that pg_llm computes, and
    the tokenizer's <|endoftext|> id as the beginning and end of text."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab,
        "n_positions": cfg.n_positions,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-05,
        "initializer_range": 0.02,
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": "float32",
    }


def read_tensors(pg: db.Pgllm, model: str, cfg: npz.Config):
    """(name, shape, float32 bytes) of every tensor in state-dict order, one at a time."""
    for name, shape in cfg.tensors():
        row = pg.execute("SELECT data FROM {llm_param} WHERE model = %s AND name = %s", (model, name),
                         binary=True).fetchone()
        if row is None:
            raise PgllmError(f"model {model!r} has no weights for tensor {name!r}",
                             hint="load them with pgllm import, or create them with pgllm init")
        data = row[0]
        if len(data) != 4 * int(np.prod(shape)):
            raise PgllmError(f"tensor {name!r} of model {model!r} has {len(data)} bytes in llm_param, "
                             f"expected {4 * int(np.prod(shape))} for shape {shape}")
        yield name, shape, data


def write_atomically(target: Path, write) -> None:
    part = target.with_name(target.name + ".part")
    try:
        with open(part, "wb") as f:
            write(f)
        os.replace(part, target)
    except OSError as e:
        raise PgllmError(f"cannot write {target}: {e.strerror or e}") from None
    finally:
        part.unlink(missing_ok=True)


def export(
    ctx: typer.Context,
    model_arg: str = MODEL_POSITIONAL,
    model: str = MODEL,
    output: Path = typer.Option(..., "--output", "-o", help="npz: the file to write; safetensors: the directory."),
    format: str = typer.Option("npz", "--format", help="npz (pgllm's checkpoint file) or safetensors "
                               "(a Hugging Face directory: config.json, model.safetensors, the tokenizer)."),
    compress: bool = typer.Option(False, "--compress", help="npz: Huffman-code the data (about 7% smaller)."),
) -> None:
    """Export a model's weights (and tokenizer) to a checkpoint file or a Hugging Face directory."""
    if format not in FORMATS:
        raise PgllmError(f"--format must be npz or safetensors, not {format!r}")
    model = model_arg or model
    start = time.perf_counter()
    output = output.expanduser()
    with db.session(ctx.obj["dsn"]) as pg:
        cfg = pg.require_model(model, hint="pgllm models lists them")
        tok = tokenizer_files.from_database(pg, model)
        total = 4 * cfg.num_params()
        with bytes_progress() as progress:
            task = progress.add_task(f"exporting {model}", total=total)
            if format == "npz":
                def write(f):
                    writer = npz.Writer(f, cfg, compress=compress, tokenizer=tok and (
                        tokenizer_files.vocab_bytes(tok[0]), tokenizer_files.merges_bytes(tok[1])))
                    for name, shape, data in read_tensors(pg, model, cfg):
                        writer.write_raw(name, shape, data)
                        progress.update(task, advance=len(data))
                    writer.close()
                write_atomically(output, write)
            else:
                if output.exists() and not output.is_dir():
                    raise PgllmError(f"{output} exists and is not a directory")
                output.mkdir(parents=True, exist_ok=True)

                def write(f):
                    f.write(safetensors_file.header((hf_key(name), shape) for name, shape in cfg.tensors()))
                    for _, _, data in read_tensors(pg, model, cfg):
                        f.write(data)
                        progress.update(task, advance=len(data))
                write_atomically(output / "model.safetensors", write)
                # <|endoftext|> of the model's tokenizer; without one, GPT-2's place for it
                eos = tok[0].get(tokenizer_files.EOT, cfg.vocab - 1) if tok else cfg.vocab - 1
                files = {"config.json": hf_config(cfg, eos),
                         "generation_config.json": {"bos_token_id": eos, "eos_token_id": eos}}
                write_files(output, {name: json.dumps(v, indent=2).encode() + b"\n" for name, v in files.items()})
                if tok:
                    write_files(output, tokenizer_files.hf_files(*tok, n_positions=cfg.n_positions))
    typer.echo(f"exported model {model!r} ({cfg.num_params():,} parameters) to {output} as {format}"
               + (", with its tokenizer" if tok else ", without a tokenizer (the model has none)")
               + f" in {time.perf_counter() - start:.1f} s")
