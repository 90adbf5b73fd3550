"""The docs stay true to the code: every SQL function, setting and `pgllm` command is documented,
and every `pgllm` command line in README.md and docs/ names a real command with real options."""

from __future__ import annotations

import re
import shlex

import pytest
import typer.main

from pgllm.cli import app

from .conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CLI = typer.main.get_command(app)


def text(*pages) -> str:
    return "\n".join(p.read_text() for p in pages)


def is_group(cmd) -> bool:
    return hasattr(cmd, "commands")  # a click group (typer carries its own click)


def commands(group=CLI, path: tuple[str, ...] = ()):
    """Every command path: ('server',), ('server', 'start'), ..."""
    for name, cmd in group.commands.items():
        yield (*path, name)
        if is_group(cmd):
            yield from commands(cmd, (*path, name))


def pgllm_lines() -> list[tuple[str, str]]:
    """(page, command line) for every `pgllm ...` in a code block or inline code span."""
    found = []
    for page in PAGES:
        body = page.read_text()
        snippets = []
        for block in re.findall(r"```[^\n]*\n(.*?)```", body, re.S):
            snippets += block.replace("\\\n", " ").splitlines()
        snippets += re.findall(r"(?<!`)`(pgllm [^`]+)`", re.sub(r"```.*?```", "", body, flags=re.S))
        for line in snippets:
            line = re.sub(r"^\s*(\$ |sudo )?", "", line)
            for part in re.split(r"&&|;|\|\|", line.split(" #")[0]):
                part = part.strip()
                if part.startswith("pgllm ") or part == "pgllm":
                    found.append((page.name, part.replace("\\|", "|")))
    return found


def check_line(line: str) -> None:
    """Resolve `pgllm [--dsn X] CMD [SUB] ...` to a command and check every --option it names."""
    try:
        words = shlex.split(line)[1:]
    except ValueError:
        words = line.split()[1:]
    cmd = CLI
    options = {o for p in CLI.params for o in (*p.opts, *p.secondary_opts)}
    i = 0
    while i < len(words):
        w = words[i].strip("[]")
        if w in ("--dsn",):
            i += 2
            continue
        if w.startswith("-") or not is_group(cmd):
            break
        if w.isupper() or w.endswith("..."):  # a placeholder: pgllm COMMAND
            return
        names = w.split("|")  # checkpoint save|load|list|delete
        missing = [n for n in names if n not in cmd.commands]
        assert not missing, f"`{line}`: no command {' '.join(missing)} (have: {', '.join(cmd.commands)})"
        if len(names) > 1:
            return
        cmd = cmd.commands[names[0]]
        i += 1
    options |= {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    for opt in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", " ".join(words[i:])):
        assert opt in options, f"`{line}`: {cmd.name} has no option {opt}"


def test_every_pgllm_command_is_in_the_cli_reference():
    cli_page = (REPO / "docs" / "cli.md").read_text().replace("\\|", "|")
    missing = [" ".join(p) for p in commands() if f"pgllm {' '.join(p)}" not in cli_page
               and not (len(p) == 2 and re.search(rf"pgllm {p[0]} [a-z|]*\b{p[1]}\b", cli_page))]
    assert not missing, f"commands missing from docs/cli.md: {missing}"


def test_every_pgllm_command_line_in_the_docs_is_real():
    lines = pgllm_lines()
    assert len(lines) > 40 and {page for page, _ in lines} >= {"README.md", "cli.md", "guide.md"}
    errors = []
    for page, line in lines:
        try:
            check_line(line)
        except AssertionError as e:
            errors.append(f"{page}: {e}")
    assert not errors, "\n".join(errors)


def test_the_checker_catches_a_wrong_command():
    check_line("pgllm --dsn x checkpoint save --model m --note n")
    for bad in ("pgllm fly --model m", "pgllm checkpoint fly", "pgllm train --no-such-option 1",
                "pgllm server start --port 1 --colour"):
        with pytest.raises(AssertionError):
            check_line(bad)


def test_every_sql_function_is_documented(conn):
    functions = {r[0] for r in conn.execute(
        "SELECT p.proname FROM pg_depend d JOIN pg_proc p ON p.oid = d.objid "
        "WHERE d.classid = 'pg_proc'::regclass AND d.refclassid = 'pg_extension'::regclass "
        "AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_llm') "
        "AND p.prorettype <> 'trigger'::regtype")}
    assert {"llm_train", "llm_generate", "pg_llm_version"} <= functions
    sql_page = (REPO / "docs" / "sql.md").read_text()
    missing = sorted(f for f in functions if not re.search(rf"\b{f}\(", sql_page))
    assert not missing, f"SQL functions missing from docs/sql.md: {missing}"


def test_every_table_and_view_is_documented(conn):
    relations = {r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_depend d JOIN pg_class c ON c.oid = d.objid "
        "WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_extension'::regclass "
        "AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_llm') AND c.relkind IN ('r', 'v')")}
    sql_page = (REPO / "docs" / "sql.md").read_text()
    missing = sorted(r for r in relations if f"`{r}`" not in sql_page)
    assert not missing, f"tables missing from docs/sql.md: {missing}"


def test_every_setting_is_documented(conn):
    conn.execute("SELECT pg_llm_version()")  # loads the library, which defines the settings
    settings = {r[0] for r in conn.execute("SELECT name FROM pg_settings WHERE name LIKE 'pg_llm.%'")}
    assert "pg_llm.threads" in settings
    page = (REPO / "docs" / "settings.md").read_text()
    missing = sorted(s for s in settings if f"`{s}`" not in page)
    assert not missing, f"settings missing from docs/settings.md: {missing}"


def test_relative_links_lead_to_files_and_anchors():
    def anchors(page) -> set[str]:
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}

    errors = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                errors.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                errors.append(f"{page.name}: {target} (no such heading)")
    assert not errors, "\n".join(errors)
