"""The walkthroughs run as written: README.md's "In ten lines" and docs/guide.md (its sections and
the seed's table), every command line in order, on a fresh embedded server, as a user would.

What the test provides, and the only changes it makes to the lines:
- what the text says the user has: a `notes` table, Shakespeare's CSV (a few speeches of it),
  `corpus/*.txt`, `prompts.txt`, and the model id `gpt2` in the Hugging Face cache (a small random
  GPT-2 with GPT-2's vocabulary and positions, saved by transformers: the Hub is out of reach here);
- training runs 2 steps where the text says hundreds (`--steps N`, `llm_train(model, N`,
  `--eval-every N`), so that the test takes minutes, not hours;
- optional parts in brackets (`[--png loss.png]`) are left out, and `pip install` is not run (the
  suite's environment is the installed package).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import PGLLM_BIN, REPO, make_home
from .weights import random_gpt2

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
        "and arrows of outrageous fortune, or to take arms against a sea of troubles.")


def code_blocks(page: str, until: str | None = None, start: str | None = None) -> list[tuple[str, str]]:
    """(language, text) of the fenced blocks of a page, in order, from the heading `start` to the
    heading `until`."""
    body = (REPO / page).read_text()
    if until:
        body = body[:body.index(until)]
    if start:
        body = body[body.index(start):]
    return re.findall(r"```(\w*)\n(.*?)```", body, re.S)


def seed_table() -> list[str]:
    """The `pgllm` column of guide.md's seed table, each command in order."""
    body = (REPO / "docs" / "guide.md").read_text()
    table = body[body.index("## The seed's workflow"):body.index("## From Python")]
    commands = []
    for row in table.splitlines():
        cells = row.split(" | ")
        if row.startswith("| ") and len(cells) >= 3 and "`pgllm" in cells[1]:
            commands += re.findall(r"`(pgllm [^`]+)`", cells[1])
    return commands


def as_run(line: str) -> str:
    """The line with the test's declared changes: 2 training steps, no optional [parts] (a space
    before the bracket: an array subscript such as ids[i] stays)."""
    line = re.sub(r"\s+\[[^\]]*\]", "", line)
    line = re.sub(r"--steps \d+", "--steps 2", line)
    line = re.sub(r"--eval-every \d+", "--eval-every 1", line)
    return re.sub(r"(llm_train\('[^']+', )\d+", r"\g<1>2", line)


def shell_lines(block: str) -> list[str]:
    lines = block.replace("\\\n", " ").splitlines()
    return [line.split("   #")[0].split("  #")[0].strip() for line in lines
            if line.strip() and not line.lstrip().startswith(("#", "pip "))]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A user's directory, home and Hugging Face cache, with what the walkthroughs assume."""
    work = tmp_path_factory.mktemp("walkthrough")
    work.chmod(0o755)
    (work / "build" / "demo").mkdir(parents=True)
    # Shakespeare's speeches: here this repository's documentation, a paragraph a speech
    paragraphs = [p.strip() for page in sorted((REPO / "docs").glob("*.md"))
                  for p in page.read_text().split("\n\n") if p.strip()]
    with open(work / "build" / "demo" / "shakespeare.csv", "w", newline="") as f:
        csv.writer(f).writerows(("Hamlet", "HAMLET" if i % 2 else "OPHELIA", p) for i, p in enumerate(paragraphs))
    (work / "corpus").mkdir()
    for i in range(4):
        (work / "corpus" / f"{i}.txt").write_text((TEXT + "\n") * 30)
    (work / "prompts.txt").write_text("KING.\nHAMLET.\n")
    # the model id gpt2 in the Hugging Face cache, as `from_pretrained("gpt2")` leaves it
    snapshot = work / "hf" / "models--gpt2" / "snapshots" / "0"
    random_gpt2(seed=5, n_layer=2, n_head=2, n_embd=32, n_positions=1024, vocab_size=50257).save_pretrained(snapshot)
    (work / "hf" / "models--gpt2" / "refs").mkdir()
    (work / "hf" / "models--gpt2" / "refs" / "main").write_text("0")
    return work


@pytest.fixture
def user(workdir):
    """Runs a command line as the user would, in workdir, on a fresh embedded server of its own."""
    home = make_home("pgllm-docs-")
    # the PostgreSQL to use stays (make test runs this on 15 and on 18); nothing names a server
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGLLM_")) or k == "PGLLM_PG_CONFIG"},
           "PGLLM_HOME": str(home), "HF_HUB_CACHE": str(workdir / "hf"), "HF_HUB_OFFLINE": "1",
           "PATH": f"{PGLLM_BIN.parent}:{os.environ['PATH']}"}

    def run(line: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", "-c", line], cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"`{line}` failed:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def sql(text: str) -> subprocess.CompletedProcess:
        dsn = json.loads(run("pgllm server status --json").stdout)["dsn"]
        script = workdir / "block.sql"
        script.write_text(text)
        return run(f"psql '{dsn}' -X -q -v ON_ERROR_STOP=1 -f {script}")

    run.sql = sql
    yield run
    subprocess.run([str(PGLLM_BIN), "server", "stop"], env=env, capture_output=True)
    shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_readme_in_ten_lines(user):
    ten = code_blocks("README.md", start="## In ten lines", until="## Performance")[:2]
    user("pgllm server start")
    # notes: this repository's documentation, a paragraph a row (text enough for 2048 tokens)
    paragraphs = [p for page in sorted((REPO / "docs").glob("*.md")) for p in page.read_text().split("\n\n")]
    user.sql("CREATE TABLE notes (id int GENERATED ALWAYS AS IDENTITY, body text);\n"
             + "".join(f"INSERT INTO notes (body) VALUES ($t${p}$t$);\n" for p in paragraphs if "$t$" not in p))
    assert [lang for lang, _ in ten] == ["bash", "sql"]
    for line in shell_lines(ten[0][1]):
        user(as_run(line))
    out = user.sql(as_run(ten[1][1])).stdout
    assert "ppl" in out and "(5 rows)" in out


def run_blocks(user, blocks) -> None:
    for lang, text in blocks:
        if lang == "bash":
            for line in shell_lines(text):
                user(as_run(line))
        elif lang == "sql":
            user.sql(as_run(text))


@pytest.mark.slow
def test_guide(user, workdir):
    """Every block before the seed's workflow; the pgvector section where the server has pgvector
    (make test's PostgreSQL 18 run: Debian's 15 has none)."""
    search = "## Semantic search with pgvector"
    blocks = code_blocks("docs/guide.md", until=search)
    assert len(blocks) >= 8
    run_blocks(user, blocks)
    assert (workdir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    if "vector" in user.sql("SELECT name FROM pg_available_extensions WHERE name = 'vector'").stdout:
        run_blocks(user, code_blocks("docs/guide.md", until="## The seed's workflow", start=search))


@pytest.mark.slow
def test_the_seeds_table(user):
    """On a server of its own: the table is a walkthrough of its own."""
    commands = seed_table()
    assert len(commands) >= 10 and commands[1].startswith("pgllm convert --source gpt2")
    for line in commands:
        user(as_run(line))
    out = user("pgllm generate \"Hello from Postgres\" --temperature 0.6 --no-stream").stdout
    assert out.strip()
