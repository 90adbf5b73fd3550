"""`pgllm quantize`: build a model's copy of the weights in a reduced precision ahead of time.

Inference computes in the precision of the server setting `pg_llm.inference_precision`
(float32, bfloat16, int8, int4); each precision is a copy derived from the float32 weights and shared
by the server's backends. The first session that needs a copy builds it; this builds it now, so
that no session waits (run it again after the weights change: the copy follows weights_version).
"""

from __future__ import annotations

import time

import typer

from .. import db
from ..options import MODEL, MODEL_POSITIONAL
from ..progress import spinner


def quantize(
    ctx: typer.Context,
    model_arg: str = MODEL_POSITIONAL,
    model: str = MODEL,
    precision: str = typer.Option("int8", "--precision", "-p", help="int8, int4, bfloat16 or float32 (the server checks it)."),
) -> None:
    """Build the server's shared copy of MODEL's weights in --precision (used where pg_llm.inference_precision names it)."""
    model = model_arg or model
    start = time.perf_counter()
    warnings = []
    with db.session(ctx.obj["dsn"]) as pg, spinner() as progress:
        pg.conn.add_notice_handler(lambda d: warnings.append(
            d.message_primary + (f" ({d.message_detail})" if d.message_detail else "")))
        progress.add_task(f"building the {precision} copy of {model}")
        fmt, version, size, shared = pg.execute("SELECT * FROM {pg_llm_weight_cache_build}(%s, %s)",
                                                (model, precision)).fetchone()
    where = "shared by the server's backends" if shared else "not shared: " + ("; ".join(warnings) or "weights changed in this transaction")
    typer.echo(f"{model}: {fmt} copy of weights_version {version}, {size / 2**20:.0f} MB, {where}, "
               f"in {time.perf_counter() - start:.1f} s")
    typer.echo(f"use it with: SET pg_llm.inference_precision = {fmt} (or ALTER ROLE/DATABASE ... SET)")
