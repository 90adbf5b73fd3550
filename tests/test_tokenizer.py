"""The tokenizer: `pgllm tokenizer`, llm_encode / llm_decode against Hugging Face, bad input.

The reference is transformers' GPT-2 tokenizer loaded with from_pretrained from a folder holding
the same two files pgllm bundles (vocab.json, merges.txt). Every comparison is exact equality.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import unicodedata
import uuid
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from pgllm.bundled import gpt2_hf_tokenizer, gpt2_tokenizer_files
from pgllm.cli import app

from .conftest import REPO, make_home

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "gpt2"
EOT = "<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf():
    """transformers' GPT-2 tokenizer, from a folder with the bundled vocab.json / merges.txt."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()  # no "sequence longer than 1024" warnings
    tok = gpt2_hf_tokenizer()
    assert tok("Hello world")["input_ids"] == [15496, 995]  # not an empty tokenizer
    assert tok.convert_tokens_to_ids(EOT) == 50256
    return tok


def _new_database(cluster) -> str:
    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = cluster.dsn(name)
    with psycopg.connect(url) as conn:
        conn.execute("CREATE EXTENSION pg_llm")
    return name


# A tokenizer belongs to a registered model (a foreign key since 0.3.0): the models these tests
# load tokenizers for, registered without weights in each test's database.
MODELS = ("gpt2", "r", "x", "c", "tiny", "cli", "bad", "sql", "nb", "m", "m1", "m2", "bard", "other", "v", "w")


def register(url: str, *names: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for name in names:
            conn.execute("INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) "
                         "VALUES (%s, 1, 1, 8, 8, 50257) ON CONFLICT DO NOTHING", (name,))


@pytest.fixture(autouse=True)
def registered_models(request):
    if "db" in request.fixturenames:
        register(request.getfixturevalue("db"), *MODELS)


@pytest.fixture(scope="module")
def gpt2_db(cluster):
    """One database for the module with the bundled GPT-2 tokenizer loaded by `pgllm tokenizer`."""
    name = _new_database(cluster)
    url = cluster.dsn(name)
    register(url, MODEL)
    result = CliRunner().invoke(app, ["--dsn", url, "tokenizer", "--model", MODEL], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"loaded the tokenizer of {MODEL}: 50257 tokens, 50000 merges" in result.output
    yield url
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def g(gpt2_db):
    with psycopg.connect(gpt2_db, autocommit=True) as c:
        yield c


def encode(conn, texts: list[str], model: str = MODEL) -> list[list[int]]:
    rows = conn.execute("SELECT llm_encode(t, %s) FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, i) ORDER BY i",
                        (model, texts)).fetchall()
    return [r[0] for r in rows]


def round_trip(conn, texts: list[str], model: str = MODEL) -> list[str]:
    rows = conn.execute("SELECT llm_decode(llm_encode(t, %s), %s) FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, i) "
                        "ORDER BY i", (model, model, texts)).fetchall()
    return [r[0] for r in rows]


def assert_same_as_hf(conn, hf, texts: list[str]) -> None:
    ours = encode(conn, texts)
    theirs = hf(texts)["input_ids"]
    for text, a, b in zip(texts, ours, theirs):
        assert a == b, f"ids differ for {text[:200]!r}:\n ours {a[:50]}\n   hf {b[:50]}"
    back = round_trip(conn, texts)
    for text, d in zip(texts, back):
        assert d == text, f"round trip differs for {text[:200]!r}: got {d[:200]!r}"


# ---------------------------------------------------------------------------------------------
# Exactness against Hugging Face
# ---------------------------------------------------------------------------------------------

PROSE = """\
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of
foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light,
it was the season of Darkness, it was the spring of hope, it was the winter of despair.

"I don't know," she said. "We'll see what they've done -- they're late, and I'm tired; you'd think
they'd call." He shrugged: 'twas ever thus... Mr. O'Neill's dog (a 3-year-old) cost $1,299.99!
Dr. Smith & Co. -- e-mail: smith@example.com; see https://example.com/a?b=c&d=e#f.
"""

CODE = '''\
#include <stdio.h>
int main(int argc, char **argv) {
\tfor (int i = 0; i < argc; i++) {
\t\tprintf("%d: %s\\n", i, argv[i]);   // print each argument
\t}
\treturn 0;
}

def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

SELECT model, count(*) FROM llm_bpe_vocab WHERE token_id >= 256 GROUP BY 1 HAVING count(*) > 0;
const f = async (x) => { await x?.y ?? z; return `${x}`; };  /* JS */
x86_64-linux-gnu-gcc -O2 -Wall -o a.out main.c && ./a.out --flag=1 -v 2>&1 | tee log.txt
'''

MULTILINGUAL = [
    "漢字仮名交じり文。東京都渋谷区、中文测试：你好，世界！한국어 텍스트입니다.",
    "مرحبا بالعالم! هذا اختبار للنص العربي ١٢٣٤ مع أرقام.",
    "नमस्ते दुनिया, यह एक परीक्षण है। १२३ संख्याएँ और मात्राएँ: क़ ख़ ग़",
    "Ελληνικά: Γειά σου Κόσμε! Русский: Привет, мир! עברית: שלום עולם. ไทย: สวัสดีชาวโลก",
    "ᐊᐃᐅ ᠮᠣᠩᠭᠣᠯ አማርኛ ქართული Հայերեն ܐܪܡܝܐ ߒߞߏ ꦗꦮ 𓀀𓁐 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
]

EMOJI = [
    "👩‍👩‍👧‍👦 family, 👍🏽 thumbs up, 🏳️‍🌈 flag, ❤️‍🔥, 🇫🇷🇯🇵 flags, 👨🏿‍💻 coder, 1️⃣ keycap",
    "🧑🏻‍🤝‍🧑🏿🫱🏼‍🫲🏾 🏴󠁧󠁢󠁳󠁣󠁴󠁿 😀😃😄😁😆😅🤣😂 🙂🙃🫠",
    "👋🏻👋🏼👋🏽👋🏾👋🏿 ✌︎✌️ ☺︎ ‼️ ™️ ©️",
]

COMBINING = [
    "e\u0301 a\u0308\u0323 Z\u0351\u0352\u0353 n\u0303o\u0302",
    "Z̴̡̛̗͍̜̱̓̀͑a̷̢̠̟͊̾l̸̰̗̈́g̶̡̪̈o̵̡͙͆",
    "\u0301 starts with a combining mark, \u200d\u200c joiners, \u00ad soft hyphen, \ufeff BOM",
    "각 (composed) vs \u1100\u1161\u11a8 (jamo), å vs a\u030a, ﬁ ligature, Å vs Å",
]

WHITESPACE = [
    "a\tb\t\tc\r\nd\r\n\r\ne\n\n\nf\x0bg\x0ch",
    " " * 1000 + "x",
    "x" + " " * 1000,
    "\t" * 500 + "y" + "\n" * 300 + " z",
    "\u3000 \u00a0\t\n\u2003x\u2028y\u2029z\u0085w\u1680v\u202f\u205f",
    "   leading and trailing   ",
    " ",
    "  ",
    "\n",
    "\r\n",
    "word \n word\t \tword \u00a0word",
    "\x1c\x1d\x1e\x1f separators that are not \\s",
    "a  b   c    d     e      f",
]

DIGITS = [
    "abc123def 1a2b3c 3.14159 1,000,000 0x1F 2nd 4th x86_64 ١٢٣ ½ ² Ⅻ ௰",
    "12345678901234567890 2024-01-01T12:34:56Z v1.2.3-rc4 +1 (555) 010-9999",
    "a1 1a 11aa aa11 ' 1'1 '1' 12's 9'll",
]

SPECIAL = [
    EOT,
    f"a{EOT}b",
    f" {EOT} ",
    f"{EOT}{EOT}",
    f"text{EOT}\n\nmore text {EOT}",
    "<|endoftext|",
    "<|endoftext",
    "<<|endoftext|>>",
    "<|ENDOFTEXT|>",
    "< |endoftext|>",
    f"{EOT}'s",
]


def _contractions() -> list[str]:
    """Every contraction in every upper/lower case mix, after words, spaces and symbols."""
    out = []
    for suffix in ("s", "t", "re", "ve", "m", "ll", "d"):
        variants = {""}
        for ch in suffix:
            variants = {v + c for v in variants for c in (ch.lower(), ch.upper())}
        for v in sorted(variants):
            out.append(f"it'{v} I'{v} don'{v} DON'{v} x '{v} '{v}'{v} !'{v} 1'{v} '{v}x")
    out.append("DON'T don't I'M i'm 'S ’s ʼs Don’t")
    out.append("'s't're've'm'll'd")
    return out


def _fortunes(limit: int = 200_000) -> list[str]:
    folder = Path("/usr/share/games/fortunes")
    texts, size = [], 0
    for f in sorted(folder.glob("*")) if folder.is_dir() else []:
        if f.suffix or not f.is_file():
            continue
        text = f.read_bytes().decode("utf-8", errors="replace")
        texts.append(text)
        size += len(text)
        if size > limit:
            break
    return texts


def _source_files() -> list[str]:
    files = sorted((REPO / "pgllm").rglob("*.py")) + sorted((REPO / "ext" / "src").glob("*.[ch]"))
    return [f.read_text(encoding="utf-8") for f in files if f.name != "unicode_tables.h"]


def test_known_ids(g):
    assert encode(g, ["Hello world", "DON'T don't", f" {EOT}", ""]) == [
        [15496, 995], [41173, 6, 51, 836, 470], [220, 50256], []]


def test_broad_corpus_matches_hf(g, hf):
    texts = ([PROSE, CODE] + MULTILINGUAL + EMOJI + COMBINING + WHITESPACE + DIGITS + SPECIAL
             + _contractions() + _fortunes() + _source_files())
    assert_same_as_hf(g, hf, texts)


def test_every_unicode_general_category(g, hf):
    """Runs of each general category, alone and after letters, digits, symbols and spaces."""
    by_cat: dict[str, list[str]] = {}
    for cp in range(1, 0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        by_cat.setdefault(unicodedata.category(chr(cp)), []).append(chr(cp))
    assert len(by_cat) == 29  # every category but Cs (surrogates cannot be UTF-8)
    rng = random.Random(7)
    texts = []
    for cat, chars in sorted(by_cat.items()):
        sample = rng.sample(chars, min(len(chars), 300))
        run = "".join(sample[:40])
        texts.append(run)
        texts.append(" ".join(sample))
        texts.append("".join(f"a{c}1{c}!{c} {c}\t{c}'s{c}" for c in sample))
    assert_same_as_hf(g, hf, texts)


def test_every_code_point_is_classified_as_hf_does(g, hf):
    """Each code point after a letter, a digit and a symbol: it joins the run of its own class.

    All of the BMP, every 4th code point of the planes with assignments (1-3, 14), every 64th of
    the rest (unassigned, private use): a Unicode-version drift between us and tokenizers shows.
    """
    def sampled(cp: int) -> bool:
        plane = cp >> 16
        return plane == 0 or (plane in (1, 2, 3, 14) and cp % 4 == 0) or cp % 64 == 0

    cps = [cp for cp in range(1, 0x110000) if not 0xD800 <= cp <= 0xDFFF and sampled(cp)]
    texts = ["".join(f"a{chr(c)}1{chr(c)}!{chr(c)}" for c in cps[i:i + 4096]) for i in range(0, len(cps), 4096)]
    assert_same_as_hf(g, hf, texts)


def _random_text(rng: random.Random) -> str:
    pools = [
        (0.35, lambda: chr(rng.randint(0x20, 0x7E))),
        (0.10, lambda: rng.choice(" \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u200a\u2028\u2029\u202f\u205f\u3000\x1c")),
        (0.10, lambda: rng.choice(["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'", " '", EOT])),
        (0.15, lambda: chr(rng.choice([rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0xFFFF)]))),
        (0.10, lambda: chr(rng.randint(0x10000, 0x10FFFF))),
        (0.10, lambda: chr(rng.randint(0x1F300, 0x1FAFF)) + rng.choice(["", "\u200d", "\ufe0f", "\U0001F3FD"])),
        (0.10, lambda: chr(rng.randint(0x300, 0x36F))),
    ]
    out = []
    for _ in range(rng.randint(0, 60)):
        r = rng.random()
        for weight, make in pools:
            r -= weight
            if r <= 0:
                out.append(make())
                break
        else:
            out.append(str(rng.randint(0, 99999)))
    return "".join(out)


def test_random_valid_utf8_matches_hf(g, hf):
    rng = random.Random(20240501)
    texts = [_random_text(rng) for _ in range(5000)]
    # and random byte strings that happen to be valid UTF-8, decoded as such
    while len(texts) < 6000:
        raw = bytes(rng.randint(1, 255) for _ in range(rng.randint(1, 40)))
        text = raw.decode("utf-8", errors="ignore")
        if text:
            texts.append(text)
    assert_same_as_hf(g, hf, texts)


def test_long_inputs_match_hf(g, hf):
    """Pieces far longer than the word cache's limit and than the short-word BPE path."""
    rng = random.Random(3)
    texts = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(20_000)),  # one 20 kB word
        "=" * 5000 + "-" * 5000,
        "9" * 10_000,
        " " * 50_000,
        "ab" * 10_000,
        ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 2000),
    ]
    assert_same_as_hf(g, hf, texts)


def test_decode_matches_hf_on_random_ids(g, hf):
    """Any id sequence, including ones that cut UTF-8 characters: U+FFFD exactly where HF puts it.

    One documented difference: a NUL byte (token 188) cannot be text in PostgreSQL and becomes
    U+FFFD, where HF returns "\\x00".
    """
    rng = random.Random(11)
    seqs = [[rng.randrange(50257) for _ in range(rng.randint(1, 12))] for _ in range(1500)]
    seqs += [[rng.randrange(94, 256) for _ in range(rng.randint(1, 6))] for _ in range(1500)]  # byte tokens
    seqs += [[188], [188, 15496], []]
    for ids in seqs:
        ours = g.execute("SELECT llm_decode(%s::int[], %s)", (ids, MODEL)).fetchone()[0]
        expected = hf.decode(ids).replace("\x00", "\ufffd")
        assert ours == expected, f"decode differs for {ids}: {ours!r} vs {expected!r}"


def test_token_bytes_and_info(g, hf):
    info = g.execute("SELECT vocab_size, tokens, merges, eot_id FROM llm_tokenizer_info(%s)", (MODEL,)).fetchone()
    assert info == (50257, 50257, 50000, 50256)
    assert g.execute("SELECT llm_token_bytes(15496, %s)", (MODEL,)).fetchone()[0] == b"Hello"
    assert g.execute("SELECT llm_token_bytes(220, %s)", (MODEL,)).fetchone()[0] == b" "
    assert g.execute("SELECT llm_token_bytes(188, %s)", (MODEL,)).fetchone()[0] == b"\x00"
    assert g.execute("SELECT llm_token_bytes(447, %s)", (MODEL,)).fetchone()[0] == b"\xe2\x80"
    assert encode(g, ["a<|endoftext|>b"]) == [[64, 50256, 65]]
    # The raw bytes of every token, joined, are what HF decodes (before UTF-8 repair).
    ids = encode(g, ["naïve café 日本 👍🏽"])[0]
    rows = g.execute("SELECT llm_token_bytes(i, %s) FROM unnest(%s::int[]) WITH ORDINALITY u(i, o) ORDER BY o",
                     (MODEL, ids)).fetchall()
    raw = b"".join(r[0] for r in rows)
    assert raw.decode("utf-8") == "naïve café 日本 👍🏽"


def test_encode_runs_read_only(g):
    """llm_encode writes nothing, so it works in a read-only transaction (and on a hot standby)."""
    with g.transaction():
        g.execute("SET TRANSACTION READ ONLY")
        assert encode(g, ["Hello world"]) == [[15496, 995]]


def test_long_encode_can_be_cancelled(g, hf):
    """statement_timeout stops a long encode promptly: the loops check for interrupts.

    The text (unique hex words, so that the word cache cannot help) is made beforehand, so that
    the time limit falls inside llm_encode.
    """
    g.execute("CREATE TEMP TABLE long_text (t text)")
    g.execute("ALTER TABLE long_text ALTER t SET STORAGE EXTERNAL")
    g.execute("INSERT INTO long_text SELECT string_agg(md5(i::text), ' ') FROM generate_series(1, 900000) i")
    g.execute("SET statement_timeout = '100ms'")
    try:
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            g.execute("SELECT cardinality(llm_encode(t, %s)) FROM long_text", (MODEL,))
        assert time.monotonic() - started < 0.75  # a whole encode of these 30 MB takes about 1.5 s
    finally:
        g.execute("RESET statement_timeout")
        g.execute("DROP TABLE long_text")
    assert encode(g, ["still works"]) == [hf("still works")["input_ids"]]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_decode_refuses_invalid_ids(g):
    for bad in (-1, 50257, 2_000_000_000):
        with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
            g.execute("SELECT llm_decode(%s::int[], %s)", ([15496, bad], MODEL))
        assert f"token id {bad} is not in the vocabulary of model \"{MODEL}\"" in str(e.value)
    with pytest.raises(psycopg.Error, match="NULL"):
        g.execute("SELECT llm_decode(ARRAY[15496, NULL]::int[], %s)", (MODEL,))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="token id -5"):
        g.execute("SELECT llm_token_bytes(-5, %s)", (MODEL,))


def test_model_without_tokenizer(g):
    for sql in ("SELECT llm_encode('hi', 'no-such-model')", "SELECT llm_decode('{1}', 'no-such-model')"):
        with pytest.raises(psycopg.errors.UndefinedObject) as e:
            g.execute(sql)
        assert 'model "no-such-model" has no tokenizer' in str(e.value)
        assert "pgllm tokenizer --model no-such-model" in e.value.diag.message_hint


# ---------------------------------------------------------------------------------------------
# Small tokenizers written by the tests: the CLI, replacing, caching, several models
# ---------------------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, n = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def write_tokenizer(folder: Path, merges: list[str], *, eot: bool = True) -> tuple[Path, Path]:
    """A byte-level vocab (256 bytes, the merged tokens, optionally <|endoftext|>) and its merges."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for merge in merges:
        left, right = merge.split(" ")
        vocab.setdefault(left + right, len(vocab))
    if eot:
        vocab[EOT] = len(vocab)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    for p in (vocab_path, merges_path):
        os.chmod(p, 0o644)
    return vocab_path, merges_path


HELLO_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"]


@pytest.fixture
def files():
    """A folder the server process can read too (it runs as postgres when the tests run as root)."""
    folder = make_home("pgllm-tok-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def one_error_line(result) -> str:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def counts(conn, model: str) -> tuple[int, int]:
    return (conn.execute("SELECT count(*) FROM llm_bpe_vocab WHERE model = %s", (model,)).fetchone()[0],
            conn.execute("SELECT count(*) FROM llm_bpe_merges WHERE model = %s", (model,)).fetchone()[0])


def test_cli_loads_files_refuses_a_second_load_and_truncate_replaces(cli, db, conn, files):
    vocab, merges = write_tokenizer(files / "a", HELLO_MERGES)
    result = cli("--dsn", db, "tokenizer", "--model", "tiny", "--vocab", str(vocab), "--merges", str(merges))
    assert result.exit_code == 0, result.output
    assert "loaded the tokenizer of tiny: 263 tokens, 6 merges" in result.output
    # byte tokens have ids 0..255 in byte order; "hello" = 259, "Ġwo" = 261
    assert encode(conn, ["hello world"], "tiny") == [[259, 261, ord("r"), ord("l"), ord("d")]]

    # a second load without --truncate: one clear line, nothing changed
    result = cli("--dsn", db, "tokenizer", "--model", "tiny", "--vocab", str(vocab), "--merges", str(merges))
    line = one_error_line(result)
    assert 'model "tiny" already has a tokenizer (263 tokens, 6 merges)' in line and "--truncate" in line
    assert counts(conn, "tiny") == (263, 6)

    # --truncate replaces it; the same connection sees the new tokenizer (cache invalidated)
    vocab2, merges2 = write_tokenizer(files / "b", ["h e"], eot=False)
    result = cli("--dsn", db, "tokenizer", "--model", "tiny", "--vocab", str(vocab2), "--merges", str(merges2),
                 "--truncate")
    assert result.exit_code == 0, result.output
    assert counts(conn, "tiny") == (257, 1)
    assert encode(conn, ["hello"], "tiny") == [[256, ord("l"), ord("l"), ord("o")]]
    # without <|endoftext|> in the vocabulary it is plain text
    assert len(encode(conn, [EOT], "tiny")[0]) == len(EOT)
    assert conn.execute("SELECT eot_id FROM llm_tokenizer_info('tiny')").fetchone()[0] in (None, -1)


def test_cli_bundled_tokenizer_and_several_models(cli, db, conn, files):
    result = cli("--dsn", db, "tokenizer", "--model", "m1")
    assert result.exit_code == 0, result.output
    assert "bundled GPT-2 tokenizer" in result.output
    vocab, merges = write_tokenizer(files, HELLO_MERGES)
    assert cli("--dsn", db, "tokenizer", "--model", "m2", "--vocab", str(vocab), "--merges", str(merges)).exit_code == 0
    assert encode(conn, ["hello"], "m1") == [[31373]]
    assert encode(conn, ["hello"], "m2") == [[259]]
    assert conn.execute("SELECT llm_decode('{31373, 995}', 'm1'), llm_decode('{259}', 'm2')").fetchone() == (
        "hello world", "hello")


def test_cli_trains_a_tokenizer_from_a_query(cli, db, conn):
    """--train: a byte-level BPE trained on a table's rows gives the ids Hugging Face's gives with it."""
    from tokenizers import ByteLevelBPETokenizer

    rng = random.Random(3)
    words = ["thou", "thee", "art", "the", "king", "lord", "my", "good", "night", "sweet", "prince", "What's"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) + rng.choice([".", "!", "?\n"])
            for _ in range(400)]
    conn.execute("CREATE TABLE lines (id int, body text)")
    with conn.cursor().copy("COPY lines FROM STDIN") as copy:
        for i, d in enumerate(docs):
            copy.write_row((i, d))
    conn.execute("INSERT INTO lines VALUES (400, NULL)")  # skipped
    result = cli("--dsn", db, "tokenizer", "--model", "bard", "--train", "SELECT body FROM lines ORDER BY id",
                 "--vocab-size", "300")
    assert result.exit_code == 0, result.output
    assert "trained and loaded the tokenizer of bard: 300 tokens, 43 merges" in result.output
    hf = ByteLevelBPETokenizer()
    hf.train_from_iterator(docs, vocab_size=300, special_tokens=[EOT], show_progress=False)
    samples = docs[:20] + ["Good night, sweet prince" + EOT + "thou art", "ünïcode and 'quotes' 123"]
    assert encode(conn, samples, "bard") == [hf.encode(s).ids for s in samples]

    result = cli("--dsn", db, "tokenizer", "--model", "x", "--train", "SELECT 1", "--vocab-size", "10")
    assert result.exit_code == 2 and "--vocab-size" in result.output  # fewer than the 256 bytes and <|endoftext|>
    line = one_error_line(cli("--dsn", db, "tokenizer", "--model", "x", "--train", "SELECT nope FROM lines"))
    assert 'column "nope" does not exist' in line
    assert counts(conn, "x") == (0, 0)


def test_cli_argument_errors(cli, db, files):
    vocab, merges = write_tokenizer(files, HELLO_MERGES)
    line = one_error_line(cli("--dsn", db, "tokenizer", "--model", "x", "--vocab", str(vocab)))
    assert "--vocab and --merges" in line
    line = one_error_line(cli("--dsn", db, "tokenizer", "--model", "x", "--vocab", str(files / "nope.json"),
                              "--merges", str(merges)))
    assert "nope.json" in line and "not found" in line


# Malformed files: (name, vocab text or None for a good one, merges text or None, line, words in the message).
# Texts are str (written as UTF-8) or bytes (written as they are).
def _bad_cases(good_vocab: str, good_merges: str):
    dup_id = good_vocab[:-1] + ',\n"zz": 5}'
    dup_token = good_vocab[:-1] + ',\n"he": 999}'
    merges_lines = len(good_merges.splitlines())
    return [
        ("bad json", '{"a": 0,\n "b": 1,\n "c" 2}', None, 3, ["Expecting", "delimiter"]),
        ("not an object", "[1, 2]", None, 1, ["JSON object"]),
        ("duplicate id", dup_id, None, 2, ["id 5 is given to two tokens (the other on line 1)"]),
        ("duplicate token", dup_token, None, 2, ['token "he" appears twice (first on line 1)']),
        ("negative id", '{"a": 0,\n"b": -1}', None, 2, ['token "b" has a negative id']),
        ("fractional id", '{"a": 0,\n"b": 1.5}', None, 2, ['token "b" needs a non-negative integer id']),
        ("merge of unknown tokens", None, good_merges + "q zzz\n", merges_lines + 1, ["zzz", "not in the vocabulary"]),
        ("merge whose result is unknown", None, good_merges + "x y\n", merges_lines + 1, ["xy", "not in the vocabulary"]),
        ("wrong header", None, "version 0.2\nh e\n", 1, ["#version"]),
        ("three tokens on a line", None, "#version: 0.2\nh e\nh e l\n", 3, ["two tokens"]),
        ("repeated merge", None, "#version: 0.2\nh e\nl l\nh e\n", 4, ["h e"]),
        # where pgllm tokenizer and the server loaders used to disagree, or had no test
        ("empty token", '{"a": 0,\n"": 1}', None, 2, ["empty token"]),
        ("exponent id", '{"a": 0,\n"b": 1e3}', None, 2, ['token "b" needs a non-negative integer id']),
        ("string id", '{"a": 0,\n"b": "1"}', None, 2, ['token "b" needs a non-negative integer id']),
        ("object as an id", '{"a": 0,\n"b": {"c": 1}}', None, 2, ['token "b" needs a non-negative integer id']),
        ("id past the limit", '{"a": 0,\n"b": 10000000}', None, 2, ['token "b" has id past 9999999']),
        ("huge id", '{"a": 0,\n"b": 123456789012345678901234567890}', None, 2, ["has id past"]),
        ("leading zeros", '{"a": 0,\n"b": 007}', None, 2, ['invalid token "007"']),
        ("\\u0000 in a token", '{"a": 0,\n"b\\u0000": 1}', None, 2, ["\\u0000"]),
        ("unpaired surrogate", '{"a": 0,\n"\\ud800x": 1}', None, 2, ["surrogate"]),
        ("bad escape", '{"a": 0,\n"\\q": 1}', None, 2, ["bad escape \\q"]),
        ("raw control character", '{"a": 0,\n"b\tc": 1}', None, 2, ["control character"]),
        ("text after the object", '{"a": 0}\n{"b": 1}', None, 2, ["after the JSON object"]),
        ("unfinished object", '{"a": 0,\n"b": 1', None, 2, ["ends inside"]),
        ("empty vocabulary", "{}", None, 1, ["empty"]),
        ("empty vocabulary file", "", None, 1, ["JSON object"]),
        ("vocabulary not UTF-8", b'{"a": 0,\n"\xff": 1}', None, 2, ["not valid UTF-8"]),
        ("NUL byte in the vocabulary", b'{"a": 0,\n"b\x00": 1}', None, 2, ["NUL"]),
        ("empty merges file", None, "", 1, ["#version"]),
        ("one token on a line", None, "#version: 0.2\nh e\nh\n", 3, ["two tokens"]),
        ("merges not UTF-8", None, b"#version: 0.2\nh e\n\xc3 e\n", 3, ["not valid UTF-8"]),
    ]


@pytest.fixture
def good_files(files):
    vocab, merges = write_tokenizer(files / "good", HELLO_MERGES)
    return vocab, merges


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    os.chmod(path, 0o644)
    return path


def test_malformed_files_are_refused_alike_by_the_server_loaders_and_the_cli(cli, db, conn, files, good_files):
    """One corpus of bad files through both ways in: pg_llm_load_bpe_vocab/merges on server files,
    and pgllm tokenizer, which sends the bytes to the same loader. Each file is refused with its
    name and the line at fault, the same message both ways, and nothing is loaded."""
    good_vocab, good_merges = good_files
    cases = _bad_cases(good_vocab.read_text(), good_merges.read_text())
    for name, vocab_text, merges_text, line, words in cases:
        vocab = _write(files / "bad_vocab.json", vocab_text) if vocab_text is not None else good_vocab
        merges = _write(files / "bad_merges.txt", merges_text) if merges_text is not None else good_merges
        bad = vocab if vocab_text is not None else merges

        # the server's loaders on the server's files
        if vocab_text is None:
            conn.execute("SELECT pg_llm_load_bpe_vocab(%s, 'bad')", (str(good_vocab),))
            sql = "SELECT pg_llm_load_bpe_merges(%s, 'bad')"
        else:
            sql = "SELECT pg_llm_load_bpe_vocab(%s, 'bad')"
        with pytest.raises(psycopg.Error) as e:
            conn.execute(sql, (str(bad),))
        server = e.value.diag
        assert f"line {line}:" in server.message_primary and str(bad) in server.message_primary, (name, server.message_primary)
        for word in words:
            assert word in server.message_primary, (name, server.message_primary)
        assert counts(conn, "bad") == ((0, 0) if vocab_text is not None else (263, 0)), name
        conn.execute("DELETE FROM llm_bpe_vocab WHERE model = 'bad'")

        # pgllm tokenizer: one line, the server's message and hint
        result = cli("--dsn", db, "tokenizer", "--model", "bad", "--vocab", str(vocab), "--merges", str(merges))
        message = one_error_line(result)
        assert f"line {line}:" in message, (name, message)
        assert str(vocab if vocab_text is not None else merges) in message, (name, message)
        for word in words:
            assert word in message, (name, message)
        assert message == f"Error: {server.message_primary} ({server.message_hint or server.message_detail})", name
        assert counts(conn, "bad") == (0, 0), name


def test_bytes_loaders_need_only_the_table_rights(conn, good_files):
    """pg_llm_load_bpe_vocab_bytes/merges_bytes: a role with rights on the tokenizer tables and the
    version they bump (not on server files) loads a tokenizer; without them it is refused by the
    tables' own rights (the version trigger runs with its caller's rights since 0.3.0)."""
    vocab, merges = good_files
    role = f"tok_{uuid.uuid4().hex[:8]}"
    conn.execute(f'CREATE ROLE "{role}" NOSUPERUSER')
    try:
        conn.execute(f'SET ROLE "{role}"')
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pg_llm_load_bpe_vocab_bytes(%s, 'r')", (vocab.read_bytes(),))
        conn.execute("RESET ROLE")
        conn.execute(f'GRANT SELECT, INSERT, DELETE ON llm_bpe_vocab, llm_bpe_merges TO "{role}"')
        conn.execute(f'GRANT SELECT, INSERT, UPDATE ON llm_tokenizer_version TO "{role}"')
        conn.execute(f'GRANT USAGE ON SEQUENCE llm_tokenizer_version_seq TO "{role}"')
        conn.execute(f'SET ROLE "{role}"')
        assert conn.execute("SELECT pg_llm_load_bpe_vocab_bytes(%s, 'r')", (vocab.read_bytes(),)).fetchone() == (263,)
        assert conn.execute("SELECT pg_llm_load_bpe_merges_bytes(%s, 'r')",
                            (merges.read_bytes(),)).fetchone() == (len(HELLO_MERGES),)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pg_llm_load_bpe_vocab(%s, 'r', replace => true)", (str(vocab),))
    finally:
        conn.execute("RESET ROLE")
        conn.execute(f'REVOKE ALL ON llm_bpe_vocab, llm_bpe_merges, llm_tokenizer_version FROM "{role}"')
        conn.execute(f'REVOKE ALL ON SEQUENCE llm_tokenizer_version_seq FROM "{role}"')
        conn.execute(f'DROP ROLE "{role}"')
    assert encode(conn, ["hello world"], "r") == [[259, 261, ord("r"), ord("l"), ord("d")]]


def test_bundled_tokenizer_in_a_sql_ascii_database(cluster, cli, hf):
    """In a database whose encoding is not UTF8, the JSON parser would turn the bundled vocab.json's
    \\u escapes into that encoding (or refuse them in SQL_ASCII): the loader writes them out as
    UTF-8 first, so the tokenizer is the same as in a UTF8 database."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE \"{name}\" ENCODING 'SQL_ASCII' LOCALE 'C' TEMPLATE template0")
    try:
        with psycopg.connect(cluster.dsn(name), autocommit=True) as c:
            c.execute("CREATE EXTENSION pg_llm")
        register(cluster.dsn(name), MODEL)
        result = cli("--dsn", cluster.dsn(name), "tokenizer", "--model", MODEL)
        assert result.exit_code == 0, result.output
        with psycopg.connect(cluster.dsn(name), autocommit=True) as c:
            c.execute("SET client_encoding = 'UTF8'")
            texts = [PROSE, "naïve café 日本 👍🏽", "Ġ ĉ Ċ"]
            rows = c.execute("SELECT llm_encode(convert_from(t, 'UTF8'), %s) FROM unnest(%s::bytea[]) "
                             "WITH ORDINALITY AS u(t, i) ORDER BY i", (MODEL, [t.encode() for t in texts])).fetchall()
            assert [r[0] for r in rows] == hf(texts)["input_ids"]
    finally:
        with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_server_loaders_match_the_cli(cli, db, conn, files):
    vocab, merges = gpt2_tokenizer_files()
    shutil.copy(vocab, files / "vocab.json")
    shutil.copy(merges, files / "merges.txt")
    for p in ("vocab.json", "merges.txt"):
        os.chmod(files / p, 0o644)
    assert conn.execute("SELECT pg_llm_load_bpe_vocab(%s, 'sql')", (str(files / "vocab.json"),)).fetchone()[0] == 50257
    assert conn.execute("SELECT pg_llm_load_bpe_merges(%s, 'sql')", (str(files / "merges.txt"),)).fetchone()[0] == 50000
    assert cli("--dsn", db, "tokenizer", "--model", "cli").exit_code == 0
    texts = [PROSE, CODE, *MULTILINGUAL, *EMOJI, *SPECIAL]
    assert encode(conn, texts, "sql") == encode(conn, texts, "cli")
    assert conn.execute("SELECT * FROM llm_bpe_merges WHERE model = 'sql' EXCEPT "
                        "SELECT 'sql', rank, \"left\", \"right\" FROM llm_bpe_merges WHERE model = 'cli'").fetchall() == []


def test_server_loaders_need_the_file_privilege(conn, good_files):
    vocab, _ = good_files
    role = f"tok_{uuid.uuid4().hex[:8]}"
    conn.execute(f'CREATE ROLE "{role}" NOSUPERUSER')
    try:
        conn.execute(f'SET ROLE "{role}"')
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute("SELECT pg_llm_load_bpe_vocab(%s, 'x')", (str(vocab),))
        assert "permission denied" in str(e.value)
    finally:
        conn.execute("RESET ROLE")
        conn.execute(f'DROP ROLE "{role}"')


def test_cache_follows_changes_and_rollbacks(db, conn, files, cli):
    """The per-backend cache is rebuilt when the tables change, also within one session."""
    vocab, merges = write_tokenizer(files, HELLO_MERGES)
    assert cli("--dsn", db, "tokenizer", "--model", "c", "--vocab", str(vocab), "--merges", str(merges)).exit_code == 0
    assert encode(conn, ["hello"], "c") == [[259]]
    conn.execute("DELETE FROM llm_bpe_merges WHERE model = 'c' AND rank = 3")  # "hell o"
    assert encode(conn, ["hello"], "c") == [[258, ord("o")]]
    with conn.transaction():
        conn.execute("DELETE FROM llm_bpe_merges WHERE model = 'c'")
        assert encode(conn, ["hello"], "c") == [[ord(ch) for ch in "hello"]]
        raise psycopg.Rollback()
    assert encode(conn, ["hello"], "c") == [[258, ord("o")]]
    # a bad row inserted by hand is reported, and the previous state is not used half-built
    conn.execute("INSERT INTO llm_bpe_merges VALUES ('c', 100, 'q', 'nope')")
    with pytest.raises(psycopg.Error, match="nope"):
        encode(conn, ["hello"], "c")
    conn.execute("DELETE FROM llm_bpe_merges WHERE model = 'c' AND rank = 100")
    assert encode(conn, ["hello"], "c") == [[258, ord("o")]]


def test_text_byte_without_token_is_an_error(db, conn, files):
    """A vocabulary that lacks a byte cannot encode text containing it: an error, not lost text."""
    folder = files / "nobyte"
    vocab, merges = write_tokenizer(folder, [])
    data = json.loads(vocab.read_text())
    del data["z"]
    data = {tok: i for i, tok in enumerate(data)}
    vocab.write_text(json.dumps(data), encoding="utf-8")
    result = CliRunner().invoke(app, ["--dsn", db, "tokenizer", "--model", "nb", "--vocab", str(vocab),
                                      "--merges", str(merges)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(encode(conn, ["abc"], "nb")[0]) == 3
    with pytest.raises(psycopg.Error, match="(?i)0x7a"):
        encode(conn, ["xyz"], "nb")


def test_cache_survives_extension_recreation(db, conn, files, cli):
    """Dropping and recreating pg_llm restarts the version numbers: a session must not reuse its cache."""
    vocab, merges = write_tokenizer(files / "a", HELLO_MERGES)
    assert cli("--dsn", db, "tokenizer", "--model", "r", "--vocab", str(vocab), "--merges", str(merges)).exit_code == 0
    assert encode(conn, ["hello"], "r") == [[259]]
    conn.execute("DROP EXTENSION pg_llm CASCADE")
    conn.execute("CREATE EXTENSION pg_llm")
    register(db, "r")
    vocab, merges = write_tokenizer(files / "b", ["h e"])
    assert cli("--dsn", db, "tokenizer", "--model", "r", "--vocab", str(vocab), "--merges", str(merges)).exit_code == 0
    assert encode(conn, ["hello"], "r") == [[256, ord("l"), ord("l"), ord("o")]]


def test_cli_without_the_extension(cluster, cli):
    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        line = one_error_line(cli("--dsn", cluster.dsn(name), "tokenizer", "--model", "m"))
        assert "pg_llm extension is not installed" in line and "pgllm install" in line
    finally:
        with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
