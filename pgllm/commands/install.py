"""`pgllm install`: build pg_llm with PGXS, install it, and create or update it in the database."""

from __future__ import annotations

from pathlib import Path

import typer

from .. import db
from ..cluster import find_system_pg_config
from ..extension import (build_and_install, check_prerequisites, check_same_major, control_version,
                         create_or_update, source_dir)


def install(
    ctx: typer.Context,
    pg_config: Path = typer.Option(None, "--pg-config", help="pg_config of the installation to build for.",
                                   show_default="the embedded server's, else the one on PATH"),
) -> None:
    """Build and install the pg_llm extension, then CREATE or ALTER EXTENSION ... UPDATE."""
    dsn, cluster = db.resolve_dsn(ctx.obj["dsn"])
    if pg_config is None:
        if cluster is not None:
            cluster.ensure_tree()
            pg_config = cluster.pg_config
        else:
            pg_config = find_system_pg_config()
    cfg = check_prerequisites(pg_config)
    with db.connect(ctx.obj["dsn"]) as conn:
        check_same_major(conn, cfg)
        typer.echo(f"building pg_llm {control_version()} from {source_dir()} with {pg_config}")
        build_and_install(pg_config)
        typer.echo(f"installed into {cfg['pkglibdir']}")
        old, new = create_or_update(conn)
    if cluster is not None and cluster.tcp_enabled():
        cluster.serve_tcp_clients()  # the database `postgres` that TCP clients use gets pg_llm too
    if old is None:
        typer.echo(f"created extension pg_llm {new}")
    elif old != new:
        typer.echo(f"updated extension pg_llm from {old} to {new}")
    else:
        typer.echo(f"extension pg_llm {new} is up to date")
