"""The `pgllm` command: global options, the error boundary, and the subcommands."""

from __future__ import annotations

import os
import sys

import psycopg
import psycopg.sql
import typer
from typer.core import TyperGroup

from . import __version__, db, interrupt
from .errors import PgllmError, database_error_line
from .extension import control_version


# click's exception classes, found through typer: typer 0.16 uses click, later versions carry a copy
# of their own (typer._click) and no longer install click.
_CLICK = {cls.__name__: cls for cls in typer.BadParameter.__mro__}
USAGE_ERROR, CLICK_EXCEPTION = _CLICK["UsageError"], _CLICK["ClickException"]


def fail(message: str, exit_code: int) -> typer.Exit:
    """The one line of a failure, on stderr (never wrapped: it is not rich's)."""
    typer.echo(f"Error: {' '.join(message.split())}", err=True)
    return typer.Exit(exit_code)


class ErrorBoundary(TyperGroup):
    """Expected failures end as one `Error: ...` line on stderr and a non-zero exit code: usage
    errors too (exit code 2), without click's or rich's usage panel. Ctrl-C ends as `Error:
    interrupted` and exit code 130, also when the server had finished the statement it cancelled.

    Anything else is a bug and raises, with its traceback, so that tests see it.
    """

    def invoke(self, ctx):
        try:
            rv = super().invoke(ctx)
            interrupt.check()
            return rv
        except PgllmError as e:
            raise fail(str(e), e.exit_code) from None
        except psycopg.Error as e:
            if interrupt.requested() and isinstance(e, psycopg.errors.QueryCanceled):
                raise fail("interrupted", 130) from None
            raise fail(database_error_line(e), 1) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except USAGE_ERROR as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # click >= 8.2: `pgllm server` alone
                typer.echo(e.ctx.get_help())
                rv = 2
            else:
                where = e.ctx.command_path if e.ctx is not None else "pgllm"
                rv = fail(f"{e.format_message()} (see {where} --help)", e.exit_code).exit_code
        except CLICK_EXCEPTION as e:
            rv = fail(e.format_message(), e.exit_code).exit_code
        except typer.Abort:
            rv = fail("interrupted", 130).exit_code
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="pgllm",
    cls=ErrorBoundary,
    help="Train and serve GPT-2 models inside PostgreSQL.",
    no_args_is_help=True,
    invoke_without_command=True,  # for --version, which may follow --dsn
    add_completion=False,
    pretty_exceptions_enable=False,
)


def installed_extension(dsn: str | None) -> str:
    """The database's pg_llm, for --version: never starts a server, never fails."""
    target, cluster = db.resolve_dsn(dsn)
    if cluster is not None and not cluster.running():
        return "unknown, the embedded server is not running (pgllm server start)"
    os.environ.setdefault("PGCONNECT_TIMEOUT", "5")
    try:
        with db.connect(dsn, autocommit=True, start=False) as conn:
            row = conn.execute("SELECT e.extversion, n.nspname FROM pg_catalog.pg_extension e "
                               "JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace "
                               "WHERE e.extname = 'pg_llm'").fetchone()
            if row is None:
                return f"not installed in {db.redact(target)} (pgllm install)"
            version, schema = row
            try:
                library = conn.execute(psycopg.sql.SQL("SELECT {}.pg_llm_version()").format(
                    psycopg.sql.Identifier(schema))).fetchone()[0]
            except psycopg.Error as e:
                library = f"unusable ({database_error_line(e)})"
    except (PgllmError, psycopg.Error) as e:
        return f"unknown, {e if isinstance(e, PgllmError) else database_error_line(e)}"
    where = f"{version} in {db.redact(target)}"
    return where if library == version else f"{where}, library {library} (pgllm install updates it)"


@app.callback()
def main_options(
    ctx: typer.Context,
    dsn: str = typer.Option(None, "--dsn", help="PostgreSQL connection string.",
                            show_default="PGLLM_DSN, libpq's PG* variables, then the embedded server"),
    version: bool = typer.Option(False, "--version", help="Show pgllm's version and the database's pg_llm version."),
) -> None:
    if version:
        typer.echo(f"pgllm {__version__} (carries pg_llm {control_version()})")
        typer.echo(f"pg_llm in the database: {installed_extension(dsn)}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)
    ctx.obj = {"dsn": dsn}


def _register() -> None:
    from .commands import (adapter, checkpoint, convert, dataset, eval, export, generate, grant, import_, init, install,
                           log, models, quantize, server, tokenizer, train)

    app.command("install")(install.install)
    app.add_typer(server.app, name="server")
    app.command("convert")(convert.convert)
    app.command("init")(init.init)
    app.command("import")(import_.import_)
    app.command("export")(export.export)
    app.add_typer(checkpoint.app, name="checkpoint")
    app.command("tokenizer")(tokenizer.tokenizer)
    app.command("dataset")(dataset.dataset)
    app.command("train")(train.train)
    app.command("log")(log.log)
    app.command("eval")(eval.eval_)
    app.add_typer(models.app, name="models")
    app.add_typer(adapter.app, name="adapter")
    app.command("generate")(generate.generate)
    app.command("grant")(grant.grant)
    app.command("revoke")(grant.revoke)
    app.command("quantize")(quantize.quantize)


_register()


def main() -> None:
    interrupt.install()
    app()
