"""GPT-2 byte-level BPE tokenizers as files: vocab.json and merges.txt (what pg_llm loads into
llm_bpe_vocab / llm_bpe_merges), Hugging Face's tokenizer.json (what transformers 5 saves), the
files of a Hugging Face model directory, and a tokenizer's fingerprint.

The fingerprint is the server's llm_tokenizer_fingerprint (the upgrade script): the md5 of the
vocabulary (id TAB token, by id) and merges (left SPACE right, by rank). Datasets record it, so
that pgllm dataset's tokenizers (transformers on this machine) and the server's compare.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import PgllmError

EOT = "<|endoftext|>"
Vocab = dict[str, int]
Merges = list[tuple[str, str]]


def fingerprint(vocab: Vocab, merges: Merges) -> str:
    v = "\n".join(f"{i}\t{t}" for t, i in sorted(vocab.items(), key=lambda item: item[1]))
    m = "\n".join(f"{a} {b}" for a, b in merges)
    return hashlib.md5(f"{v}\n\n{m}".encode()).hexdigest()


def parse_merges(text: str) -> Merges:
    """merges.txt as the server reads it: a #version line, then one `left right` per line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [tuple(line.rstrip("\r").split(" ", 1)) for line in lines[1:]]


def vocab_bytes(vocab: Vocab) -> bytes:
    return json.dumps(vocab, ensure_ascii=False).encode()


def merges_bytes(merges: Merges) -> bytes:
    return ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode()


def from_tokenizer_json(data: dict, where: str) -> tuple[Vocab, Merges]:
    """The vocabulary and merges of a Hugging Face tokenizer.json holding a byte-level BPE (with
    its added tokens, such as <|endoftext|>, where they are not in the model's vocabulary)."""
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise PgllmError(f"{where} is not a byte-level BPE tokenizer (model type {model.get('type')!r})",
                         hint="pg_llm's tokenizer is GPT-2's kind: byte-level BPE")
    vocab = dict(model["vocab"])
    for added in data.get("added_tokens") or []:
        vocab.setdefault(added["content"], added["id"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model.get("merges") or []]
    return vocab, merges


def from_directory(path: Path) -> tuple[Vocab, Merges] | None:
    """The tokenizer saved in a Hugging Face directory (vocab.json + merges.txt, or tokenizer.json),
    or None when there is none."""
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        try:
            return (json.loads((path / "vocab.json").read_text(encoding="utf-8")),
                    parse_merges((path / "merges.txt").read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise PgllmError(f"cannot read the tokenizer in {path}: {e}") from None
    if (path / "tokenizer.json").is_file():
        try:
            data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise PgllmError(f"cannot read {path / 'tokenizer.json'}: {e}") from None
        return from_tokenizer_json(data, str(path / "tokenizer.json"))
    return None


def hf_files(vocab: Vocab, merges: Merges, n_positions: int) -> dict[str, bytes]:
    """A Hugging Face tokenizer directory's files (vocab.json, merges.txt and
    tokenizer_config.json), which AutoTokenizer.from_pretrained loads as GPT-2's tokenizer class,
    with <|endoftext|> as its beginning, end and unknown token."""
    if EOT not in vocab:
        raise PgllmError(f"the tokenizer has no {EOT} token", hint="GPT-2 tokenizers end documents with it")
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
              "add_prefix_space": False, "model_max_length": n_positions}
    return {"vocab.json": vocab_bytes(vocab), "merges.txt": merges_bytes(merges),
            "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode()}


def from_database(pg, model: str) -> tuple[Vocab, Merges] | None:
    """A model's tokenizer from llm_bpe_vocab / llm_bpe_merges (pg: db.Pgllm), or None."""
    vocab = {t: i for i, t in pg.execute("SELECT token_id, token FROM {llm_bpe_vocab} WHERE model = %s", (model,))}
    if not vocab:
        return None
    merges = [(a, b) for a, b in pg.execute('SELECT "left", "right" FROM {llm_bpe_merges} WHERE model = %s '
                                            "ORDER BY rank", (model,))]
    return vocab, merges
