"""`pgllm server start|stop|status`: the embedded PostgreSQL cluster."""

from __future__ import annotations

import json

import typer

import psycopg

from .. import db
from ..cluster import Cluster

app = typer.Typer(help="Manage the embedded PostgreSQL server (data in PGLLM_HOME).", no_args_is_help=True)


@app.command()
def start(port: int = typer.Option(None, "--port", min=1, max=65535,
                                   help="Also listen on localhost:PORT over TCP (kept for later starts).",
                                   show_default="the port given before, if any")) -> None:
    """Start the embedded server (initdb on first use)."""
    cluster = Cluster.default()
    started = cluster.start(port=port)
    typer.echo(f"{'started' if started else 'already running'}: {cluster.dsn()}")
    if cluster.tcp_enabled():
        typer.echo(f"listening on localhost:{cluster.port} too: postgresql://{cluster.role}@localhost:{cluster.port}/postgres "
                   f"(password in {cluster.pgpass_file()})")


@app.command()
def stop() -> None:
    """Stop the embedded server."""
    cluster = Cluster.default()
    typer.echo("stopped" if cluster.stop() else "not running")


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print the status as JSON.")) -> None:
    """Show where the embedded server lives, whether it runs, the pg_llm version and the shared weights in it."""
    cluster = Cluster.default()
    info = cluster.status()
    if info["extension_version"]:
        with db.connect(cluster.dsn(), autocommit=True, start=False) as conn:
            info["weight_cache"] = weight_cache(db.Pgllm(conn))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    rows = [
        ("running", "yes" if info["running"] else "no"),
        ("server version", info["server_version"] or "-"),
        ("connection", info["dsn"]),
        ("data directory", info["data_directory"]),
        ("log file", info["log_file"]),
        ("pg_llm installed", info["extension_version"] or "no" if info["running"]
         else "unknown (the server is not running)"),
        ("pg_llm available", info["extension_available"] or "no (run `pgllm install`)"),
    ]
    cache = info.get("weight_cache")
    if cache is not None:
        rows.append(("weight cache", f"{len(cache['copies'])} shared copies, {cache['bytes'] / 2**20:.0f} MB of "
                                     f"{cache['size_limit']} (pg_llm.weight_cache_size; shared_weights "
                                     f"{cache['shared_weights']})"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k:<{width}}  {v}")
    for c in cache["copies"] if cache else []:
        typer.echo(f"  {c['database'] or '(dropped)'}  {c['model'] or '(unreadable)'}  version {c['weights_version']}  "
                   f"{c['format']}  {c['bytes'] / 2**20:.0f} MB  {c['backends']} backends  built {c['built_at']}")


def weight_cache(pg: db.Pgllm) -> dict | None:
    """The server's shared copies of model weights (pg_llm_weight_cache()); None before pg_llm 0.2.0."""
    columns = ("database", "model", "weights_version", "format", "bytes", "built_at", "last_used", "backends", "path")
    try:
        rows = pg.execute(f"SELECT {', '.join(columns)} FROM {{pg_llm_weight_cache}}() "
                          "ORDER BY database, model, format, weights_version").fetchall()
    except psycopg.errors.UndefinedFunction:
        return None
    copies = [{k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in zip(columns, row)} for row in rows]
    return {
        "shared_weights": pg.execute("SHOW pg_llm.shared_weights").fetchone()[0],
        "size_limit": pg.execute("SHOW pg_llm.weight_cache_size").fetchone()[0],
        "bytes": sum(c["bytes"] for c in copies),
        "copies": copies,
    }
