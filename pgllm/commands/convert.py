"""`pgllm convert`: a Hugging Face GPT-2 checkpoint -> pgllm's checkpoint file (float32), with the
checkpoint's tokenizer (its vocab.json and merges.txt, or tokenizer.json) when it has one, which
`pgllm import` then loads as the model's tokenizer."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import typer

from .. import npz, tokenizer_files
from ..bundled import gpt2_tokenizer_files
from ..errors import PgllmError
from ..optional import need
from ..progress import bytes_progress

# Architecture settings pg_llm computes with; a checkpoint that needs others would give other logits.
SUPPORTED = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "layer_norm_epsilon": (1e-5,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
}
BUFFERS = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal masks of older transformers


def hf_name(key: str) -> str:
    """A Hugging Face state-dict key as pg_llm names it: no `transformer.`, no `.weight` on embeddings."""
    key = key.removeprefix("transformer.")
    return key.removesuffix(".weight") if key in ("wte.weight", "wpe.weight") else key


def config_from_hf(cfg: dict, where: str) -> npz.Config:
    """The architecture of a config.json, refusing settings that pg_llm does not compute."""
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise PgllmError(f"{where} is a {cfg.get('model_type')!r} model, not GPT-2")
    for key, allowed in SUPPORTED.items():
        if key in cfg and cfg[key] not in allowed:
            raise PgllmError(f"{where} has {key}={cfg[key]!r}; pg_llm computes GPT-2 with {key}={allowed[0]!r}")
    d = cfg.get("n_embd", 768)
    if cfg.get("n_inner") not in (None, 4 * d):
        raise PgllmError(f"{where} has n_inner={cfg['n_inner']}; pg_llm's MLP is 4 * n_embd = {4 * d} wide")
    return npz.Config(cfg.get("n_layer", 12), cfg.get("n_head", 12), d, cfg.get("n_positions", 1024),
                      cfg.get("vocab_size", 50257))


def infer_config(state: dict, n_head: int | None, where: str) -> npz.Config:
    """The architecture from the tensors alone (n_head cannot be seen in them)."""
    names = {hf_name(k) for k in state}
    if "wte" not in names or "wpe" not in names:
        raise PgllmError(f"{where} has no wte/wpe tensors: not a GPT-2 state dict")
    wte = next(v for k, v in state.items() if hf_name(k) == "wte")
    wpe = next(v for k, v in state.items() if hf_name(k) == "wpe")
    layers = {int(m.group(1)) for n in names if (m := re.match(r"h\.(\d+)\.", n))}
    vocab, d = wte.shape
    if n_head is None:
        if d % 64:
            raise PgllmError(f"{where} does not say how many attention heads it has", hint="pass --n-head")
        n_head = d // 64  # every GPT-2 size has 64-wide heads
        typer.echo(f"assuming n_head={n_head} (64-wide heads, as every GPT-2); pass --n-head to change it", err=True)
    return npz.Config(len(layers), n_head, d, wpe.shape[0], vocab)


def read_safetensors(path: Path) -> dict:
    """A .safetensors file without torch when numpy can hold its dtypes (bfloat16 needs torch)."""
    need("pgllm convert of a .safetensors file", "safetensors")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except (TypeError, ValueError):
        need(f"pgllm convert of {path.name} (bfloat16)", "torch")
        from safetensors.torch import load_file as load_torch
        return load_torch(str(path))
    except (SafetensorError, OSError) as e:
        raise PgllmError(f"cannot read {path}: {e}") from None


def read_numpy(path: Path) -> dict:
    """A NumPy .npz archive (np.savez) of a state dict: numpy alone reads it."""
    import numpy as np
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise PgllmError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def read_torch(path: Path) -> dict:
    need("pgllm convert of a PyTorch file", "torch")
    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle, zip and torch errors alike
        raise PgllmError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PgllmError(f"{path} does not hold a state dict of tensors")
    return state


OFFLINE_HINT = ("a model id works offline only when it is in the Hugging Face cache; otherwise give a directory "
                "written by save_pretrained")


def check_hub(source: str, timeout: float = 5.0) -> None:
    """Fail at once when the Hub cannot be reached (transformers would retry for half a minute).

    One TCP connection to HF_ENDPOINT (default huggingface.co); skipped behind a proxy, which
    only the HTTP client knows how to use.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise PgllmError(f"cannot download {source!r}: the Hugging Face Hub ({url.hostname}:{port}) is unreachable: "
                         f"{e.strerror or e}", hint=OFFLINE_HINT) from None


def find_tokenizer(source: str, cfg: npz.Config) -> tuple[tuple[bytes, bytes] | None, str]:
    """The tokenizer to write beside the weights (vocab.json and merges.txt bytes), and where it
    came from: the directory's own, a model id's in the Hugging Face cache, or for a model id of
    GPT-2's vocabulary size without one there, GPT-2's (bundled with pgllm)."""
    path = Path(source).expanduser()
    folder = path if path.is_dir() else path.parent if path.is_file() else None
    hub_id = folder is None
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(source, "config.json")
        except (ImportError, ValueError):
            cached = None
        folder = Path(cached).parent if isinstance(cached, str) else None
    found = tokenizer_files.from_directory(folder) if folder is not None else None
    if found is not None:
        return (tokenizer_files.vocab_bytes(found[0]), tokenizer_files.merges_bytes(found[1])), \
            f"its tokenizer ({len(found[0])} tokens)"
    if hub_id and cfg.vocab == 50257:
        vocab, merges = gpt2_tokenizer_files()
        return (vocab.read_bytes(), merges.read_bytes()), "GPT-2's tokenizer (bundled with pgllm)"
    return None, "no tokenizer (none beside the weights)"


def read_pretrained(source: str) -> tuple[dict, dict]:
    """(config, state dict) through transformers: model ids and directories in other layouts.

    A model id in the Hugging Face cache is loaded from there without asking the Hub (which,
    unreachable, costs half a minute of retries); others are downloaded as transformers does.
    """
    need(f"pgllm convert {source}", "transformers", "torch")
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = Path(source).is_dir() or isinstance(try_to_load_from_cache(source, "config.json"), str)
    except ValueError as e:  # not a valid model id
        raise PgllmError(f"cannot load {source!r}: {str(e).strip().splitlines()[0]}", hint=OFFLINE_HINT) from None
    if not cached:
        check_hub(source)  # before importing torch: seconds under load

    import torch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = GPT2LMHeadModel.from_pretrained(source, dtype=torch.float32, local_files_only=cached)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PgllmError(f"cannot load {source!r}: {first}", hint=OFFLINE_HINT) from None
    return model.config.to_dict(), model.state_dict()


def load_source(source: str, n_head: int | None) -> tuple[npz.Config, dict]:
    """(architecture, state dict) from a model id, a save_pretrained directory or a weights file.

    safetensors are read directly (no torch, no transformers: seconds faster); the rest goes
    through torch or transformers.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".safetensors":
            state = read_safetensors(path)
        elif path.suffix in (".bin", ".pt", ".pth"):
            state = read_torch(path)
        elif zipfile.is_zipfile(path):  # np.savez; pgllm's own .npz files are gzip streams
            state = read_numpy(path)
        else:
            raise PgllmError(f"{path}: unknown kind of file", hint="give a .safetensors, a PyTorch .bin or a NumPy "
                             ".npz file, a directory written by save_pretrained, or a Hugging Face model id")
        beside = path.parent / "config.json"
        if beside.exists() and n_head is None:
            return config_from_hf(json.loads(beside.read_text()), str(beside)), state
        return infer_config(state, n_head, str(path)), state
    if path.is_dir():
        if not (path / "config.json").exists():
            raise PgllmError(f"{path} has no config.json: not a directory written by save_pretrained")
        hf = json.loads((path / "config.json").read_text())
        index = path / "model.safetensors.index.json"
        if (path / "model.safetensors").exists():
            state = read_safetensors(path / "model.safetensors")
        elif index.exists():
            state = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(read_safetensors(path / shard))
        else:
            hf, state = read_pretrained(str(path))
    else:
        hf, state = read_pretrained(source)
    cfg = config_from_hf(hf, source)
    if n_head is not None and n_head != cfg.n_head:
        raise PgllmError(f"{source} has n_head={cfg.n_head}; --n-head {n_head} contradicts it")
    return cfg, state


def as_float32(value):
    """A torch tensor or numpy array as a float32, C-order numpy array."""
    import numpy as np
    if hasattr(value, "detach"):
        import torch
        return value.detach().to(torch.float32).contiguous().numpy()
    return np.ascontiguousarray(value, dtype=np.float32)


def tensors_in_order(cfg: npz.Config, state: dict, where: str):
    """(name, float32 C-order array) in state-dict order, after checking names, shapes and values."""
    import numpy as np

    by_name = {}
    for key, value in state.items():
        name = hf_name(key)
        if not BUFFERS.match(name) and name != "lm_head.weight":  # lm_head is tied to wte: checked below
            by_name[name] = value
    expected = dict(cfg.tensors())
    unknown = sorted(set(by_name) - set(expected))
    if unknown:
        raise PgllmError(f"{where} has a tensor pg_llm does not know: {unknown[0]!r}"
                         + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    missing = [n for n in expected if n not in by_name]
    if missing:
        raise PgllmError(f"{where} lacks tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    head = next((v for k, v in state.items() if hf_name(k) == "lm_head.weight"), None)
    if head is not None and not np.array_equal(as_float32(head), as_float32(by_name["wte"])):
        raise PgllmError(f"{where} has an lm_head.weight that differs from wte; pg_llm ties the output head to wte")
    for name, shape in cfg.tensors():
        array = as_float32(by_name[name])
        if array.shape != shape:
            raise PgllmError(f"tensor {name!r} has shape {array.shape}, expected {shape} "
                             f"(n_layer={cfg.n_layer}, d_model={cfg.d_model}, n_positions={cfg.n_positions}, "
                             f"vocab={cfg.vocab})")
        if not np.isfinite(array).all():
            raise PgllmError(f"tensor {name!r} contains NaN or infinite values")
        yield name, array


def default_output(source: str) -> Path:
    path = Path(source)
    if path.is_file():
        stem = path.parent.resolve().name if path.stem in ("model", "pytorch_model") else path.stem
    else:
        stem = path.resolve().name if path.is_dir() else source.rstrip("/").split("/")[-1]
    output = Path.cwd() / f"{'gpt2-small' if stem == 'gpt2' else stem}.npz"
    # a NumPy .npz source must not be overwritten by its own conversion
    return output.with_suffix(".pgllm.npz") if path.is_file() and output == path.resolve() else output


def convert(
    source_arg: str = typer.Argument(None, metavar="SOURCE", help="Hugging Face model id (gpt2, distilgpt2, "
                                     "gpt2-medium, ...; from the local cache), a save_pretrained directory, a "
                                     ".safetensors or a .bin file.", show_default="none: --source"),
    source: str = typer.Option(None, "--source", help="The same as SOURCE (the seed's "
                               "convert_gpt2_checkpoint.py --source gpt2).", show_default="none: SOURCE"),
    output: Path = typer.Option(None, "--output", "-o", help="File to write.",
                                show_default="NAME.npz in the current directory; gpt2 -> gpt2-small.npz"),
    n_head: int = typer.Option(None, "--n-head", help="Attention heads, for a bare weights file without "
                               "config.json.", show_default="d_model / 64"),
    compress: bool = typer.Option(False, "--compress", help="Huffman-code the data: about 7% smaller, "
                                  "slower to write and to import."),
) -> None:
    """Convert a Hugging Face GPT-2 checkpoint into pgllm's checkpoint file (float32, gzip records)."""
    if (source_arg is None) == (source is None):
        raise PgllmError("give the checkpoint to convert once: SOURCE or --source SOURCE")
    source = source or source_arg
    start = time.perf_counter()
    output = (output or default_output(source)).expanduser()
    cfg, state = load_source(source, n_head)
    tokenizer, tokenizer_from = find_tokenizer(source, cfg)
    total = 4 * cfg.num_params()
    part = output.with_name(output.name + ".part")
    try:
        with open(part, "wb") as f, bytes_progress() as progress:
            task = progress.add_task(f"writing {output.name}", total=total)
            writer = npz.Writer(f, cfg, compress=compress, tokenizer=tokenizer)
            for name, array in tensors_in_order(cfg, state, source):
                writer.write_tensor(name, array)
                progress.update(task, advance=array.nbytes)
            size = writer.close()
        os.replace(part, output)
    except OSError as e:
        raise PgllmError(f"cannot write {output}: {e.strerror or e}") from None
    finally:
        part.unlink(missing_ok=True)
    typer.echo(f"wrote {output}: {cfg.num_params():,} parameters (n_layer={cfg.n_layer}, n_head={cfg.n_head}, "
               f"d_model={cfg.d_model}, n_positions={cfg.n_positions}, vocab={cfg.vocab}) and {tokenizer_from}, "
               f"{size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s")
