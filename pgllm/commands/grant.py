"""`pgllm grant ROLE [--train]` and `pgllm revoke ROLE`: pg_llm's rights for an ordinary role.

They run llm_grant / llm_revoke (ext/sql/pg_llm--0.1.0--0.2.0.sql, the one place that says which
rights serving and training need), as the extension's owner or a superuser. Serving: generate,
stream, beams, logits, encode/decode. Training: also train, init, import and tokenizers sent over
the connection, datasets, checkpoints. Never the server-file functions.
"""

from __future__ import annotations

import typer

from .. import db

ROLE = typer.Argument(..., help="An existing PostgreSQL role.", show_default=False)


def grant(
    ctx: typer.Context,
    role: str = ROLE,
    train: bool = typer.Option(False, "--train", help="Training rights too (train, init, import, datasets, "
                               "checkpoints), not only serving."),
) -> None:
    """Let ROLE use pg_llm: serve models, or with --train also train and load them."""
    with db.session(ctx.obj["dsn"]) as pg:
        pg.execute("SELECT {llm_grant}(%s::regrole, train => %s)", (quote_role(pg, role), train))
        database = pg.conn.info.dbname
    what = "serve and train" if train else "serve (generate, stream, beams, logits, encode/decode)"
    typer.echo(f"role {role} may now {what} the models of database {database}")


def revoke(ctx: typer.Context, role: str = ROLE) -> None:
    """Take back the rights that pgllm grant gave ROLE."""
    with db.session(ctx.obj["dsn"]) as pg:
        pg.execute("SELECT {llm_revoke}(%s::regrole)", (quote_role(pg, role),))
        database = pg.conn.info.dbname
    typer.echo(f"role {role} has no more rights on pg_llm's tables in database {database}")


def quote_role(pg: db.Pgllm, role: str) -> str:
    """The role's name as regrole's input wants it (quoted), so that any name works as typed."""
    return pg.conn.execute("SELECT quote_ident(%s)", (role,)).fetchone()[0]
