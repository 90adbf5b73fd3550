"""`pgllm import`: load a checkpoint file into llm_param.

Two routes, the same checks (all in the server, in one transaction):
- server: the server reads the file itself (pg_llm_import_npz): the fastest, when the server runs
  on this machine, can read the file and the role may read server files;
- client: the file's bytes travel over the connection, staged in a temporary file of the
  server (pg_llm_import_npz_stage, then pg_llm_import_npz_staged): any server, any file size.
`--via auto` (the default) tries the server route when it can work and falls back to the client's.
"""

from __future__ import annotations

import time
from dataclasses import astuple
from pathlib import Path

import psycopg
import typer

from .. import db, npz
from ..errors import PgllmError
from ..options import MODEL
from ..progress import bytes_progress, spinner

CHUNK = 512 << 10  # measured: larger pieces cost more (fresh pages per piece on both sides)
VIA = ("auto", "server", "client")
# What the server says when it cannot open the file itself: not found, not allowed, a directory.
NO_ACCESS = {"58P01", "42501", "58030", "42809"}
LOOPBACK = ("localhost", "127.0.0.1", "::1")


def server_route_possible(pg: db.Pgllm) -> bool:
    """The server runs on this machine and this role may make it read files."""
    host = pg.conn.info.host or ""
    if not (host.startswith("/") or host in LOOPBACK):
        return False
    return pg.conn.execute(
        "SELECT pg_catalog.has_function_privilege(%s, 'EXECUTE') "
        "AND ((SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) "
        "     OR pg_catalog.pg_has_role('pg_read_server_files', 'USAGE'))",
        (pg.name("pg_llm_import_npz") + "(text, text, boolean)",)).fetchone()[0]


def import_via_server(pg: db.Pgllm, path: Path, model: str, replace: bool) -> int:
    with spinner() as progress:
        progress.add_task(f"the server imports {path.name}")
        return pg.execute("SELECT {pg_llm_import_npz}(%s, %s, %s)", (str(path), model, replace)).fetchone()[0]


def import_via_client(pg: db.Pgllm, path: Path, model: str, replace: bool) -> int:
    """Stage the file in the server piece by piece (a temporary file there), then import it."""
    size = path.stat().st_size
    with bytes_progress() as progress, open(path, "rb") as f:
        task = progress.add_task(f"sending {path.name}", total=size)
        while piece := f.read(CHUNK):
            pg.execute("SELECT {pg_llm_import_npz_stage}(%b)", (piece,))
            progress.update(task, advance=len(piece))
    with spinner() as progress:
        progress.add_task(f"the server imports {path.name}")
        return pg.execute("SELECT {pg_llm_import_npz_staged}(%s, %s)", (model, replace)).fetchone()[0]


def import_(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="Checkpoint file written by pgllm convert or pgllm export."),
    model: str = MODEL,
    replace: bool = typer.Option(False, "--replace", help="Overwrite the model's existing weights "
                                 "(also clears its optimizer state, training state and training log)."),
    via: str = typer.Option("auto", "--via", help="server: the server reads FILE; client: send its bytes over "
                            "the connection; auto: the server when it can, else the client."),
) -> None:
    """Import a checkpoint file into the database: all tensors or none, checked against the model."""
    if via not in VIA:
        raise PgllmError(f"--via must be one of {', '.join(VIA)}, not {via!r}")
    path = file.expanduser().absolute()
    if path.is_dir():
        raise PgllmError(f"{file} is a directory, not a checkpoint file",
                         hint="give the .npz file that pgllm convert wrote, or convert the directory first: "
                              f"pgllm convert {file} --output FILE")
    if not path.is_file():
        raise PgllmError(f"{file}: no such file")
    with open(path, "rb") as f:
        npz.check_magic(f.read(4), str(file))  # the server checks too, but cannot name the file it was sent
    start = time.perf_counter()
    with db.session(ctx.obj["dsn"]) as pg:
        existed = pg.model_config(model) is not None
        pg.conn.commit()
        n, route = None, "client"
        if via == "server" or (via == "auto" and server_route_possible(pg)):
            try:
                n, route = import_via_server(pg, path, model, replace), "server"
            except psycopg.Error as e:
                pg.conn.rollback()
                if via == "server" or e.sqlstate not in NO_ACCESS:
                    raise
        if n is None:
            n = import_via_client(pg, path, model, replace)
        pg.conn.commit()
        cfg = pg.model_config(model)
    how = "the server read the file" if route == "server" else f"sent {path.stat().st_size / 1e6:.1f} MB"
    registered = "" if existed else " (registered: n_layer={}, n_head={}, d_model={}, n_positions={}, vocab={})".format(
        *astuple(cfg))
    typer.echo(f"imported {n} tensors into model {model!r}{registered} in {time.perf_counter() - start:.1f} s; {how}")
