"""`pgllm adapter [list|create|drop|export|import]`: a model's LoRA adapters (llm_adapter,
llm_adapter_param), and the round trip with PEFT.

A PEFT directory is what `PeftModel.save_pretrained` writes and `PeftModel.from_pretrained` reads:
adapter_config.json and adapter_model.safetensors. pg_llm's tensor h.{l}.{target}.lora_A is
PEFT's base_model.model.transformer.h.{l}.{target}.lora_A.weight, the same matrix in the same
orientation (lora_A (rank, in), lora_B (out, rank): PEFT's nn.Linear weights beside GPT-2's
Conv1D, fan_in_fan_out), so the tensors travel as they are, float32. Which names, shapes and
targets an adapter has is the server's rule: the import lets llm_adapter_create make the rows, then
fills them from the file, all in one transaction.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from .. import db, safetensors_file
from ..errors import PgllmError
from ..options import MODEL
from .export import write_atomically

app = typer.Typer(help="LoRA adapters of a model: list, create, drop, and export or import them as PEFT "
                       "directories (pgllm adapter alone lists them).", invoke_without_command=True)

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_DIR_HINT = "give the directory that PeftModel.save_pretrained or pgllm adapter export wrote"
PEFT_PREFIX = "base_model.model.transformer."
# PEFT's key of one of pg_llm's tensors: the prefix of a PeftModel of GPT2LMHeadModel (no
# `transformer.` for a GPT2Model), the name, `.default` in a state dict saved by hand (save_pretrained
# leaves the adapter's name out), `.weight`.
PEFT_KEY = re.compile(r"base_model\.model\.(?:transformer\.)?(h\.\d+\..+\.lora_[AB])(?:\.default)?\.weight")
# PEFT's defaults (LoraConfig) for the fields a config may leave out.
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0}
# PEFT's options that change what an adapter computes beyond alpha / r * B A x, or add tensors that
# pg_llm's adapters have not: each must be off (false, null, empty). use_rslora is not among them:
# its scale alpha / sqrt(r) is plain LoRA's with alpha sqrt(r) for alpha (read_peft_config).
UNSUPPORTED = ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "modules_to_save",
               "layer_replication", "target_parameters", "trainable_token_indices", "alora_invocation_tokens",
               "use_qalora")


def number(x: float) -> float | int:
    """A float32 column's value as its shortest decimal (0.1, not 0.10000000149011612), an integer
    when it is one (PEFT writes lora_alpha 16)."""
    x = float(str(np.float32(x)))
    return int(x) if x.is_integer() else x


def require_adapter(pg: db.Pgllm, adapter: str) -> tuple:
    row = pg.execute("SELECT model, rank, alpha, dropout, targets FROM {llm_adapter} WHERE adapter = %s",
                     (adapter,)).fetchone()
    if row is None:
        raise PgllmError(f'adapter "{adapter}" does not exist', hint="pgllm adapter list lists them")
    return row


def refuse_existing(pg: db.Pgllm, adapter: str, replace: str | None = None) -> None:
    if pg.execute("SELECT 1 FROM {llm_adapter} WHERE adapter = %s", (adapter,)).fetchone():
        raise PgllmError(f'adapter "{adapter}" already exists',
                         hint=replace or "drop it with pgllm adapter drop, or choose another name")


@app.callback()
def adapter(ctx: typer.Context) -> None:
    """LoRA adapters of a model: list, create, drop, and export or import them as PEFT directories."""
    if ctx.invoked_subcommand is None:
        list_(ctx, None)


@app.command("list")
def list_(ctx: typer.Context,
          model: str = typer.Argument(None, metavar="[MODEL]", help="Only this model's adapters.",
                                      show_default="every model's")) -> None:
    """List the adapters: model, rank, alpha, dropout, targets, step, parameters, and whether the base
    model's weights changed since the adapter last trained (stale)."""
    with db.session(ctx.obj["dsn"]) as pg:
        rows = pg.execute("SELECT adapter, model, rank, alpha, dropout, targets, step, parameters, stale, updated_at "
                          "FROM {llm_adapters} WHERE %(model)s::text IS NULL OR model = %(model)s "
                          "ORDER BY model, adapter", {"model": model}).fetchall()
    if not rows:
        typer.echo(f"no adapters{f' of model {model!r}' if model else ''} (create one with pgllm adapter create "
                   "or pgllm adapter import)")
        return
    table = Table("adapter", "model", "rank", "alpha", "dropout", "targets", "step", "parameters", "stale", "updated")
    for name, base, rank, alpha, dropout, targets, step, params, stale, updated in rows:
        table.add_row(name, base, str(rank), str(number(alpha)), str(number(dropout)), ", ".join(targets), str(step),
                      f"{(params or 0):,}", "yes" if stale else "no", f"{updated:%Y-%m-%d %H:%M}")
    Console(width=200).print(table)


@app.command("create")
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The new adapter's name."),
    model: str = MODEL,
    rank: int = typer.Option(8, "--rank", "-r", help="The rank r of its matrices."),
    alpha: float = typer.Option(16.0, "--alpha", help="Its update is scaled by alpha / rank."),
    dropout: float = typer.Option(0.0, "--dropout", help="Dropout on the adapter's input while it trains."),
    target: list[str] = typer.Option(["attn.c_attn"], "--target", "-t", help="A product it adapts: attn.c_attn, "
                                     "attn.c_proj, mlp.c_fc or mlp.c_proj; repeat for several.",
                                     show_default="attn.c_attn"),
    seed: int = typer.Option(1337, "--seed", help="Seed of lora_A's random initial values."),
) -> None:
    """Create an adapter of a model with PEFT's initial values: it changes nothing until trained
    (llm_train(model, steps, adapter => NAME)) (llm_adapter_create)."""
    with db.session(ctx.obj["dsn"]) as pg:
        pg.require_model(model, hint="pgllm models lists them")
        pg.execute("SELECT {llm_adapter_create}(%s, %s, rank => %s::int, alpha => %s, dropout => %s, targets => %s, "
                   "seed => %s)", (name, model, rank, alpha, dropout, target, seed))
        params = pg.execute("SELECT parameters FROM {llm_adapters} WHERE adapter = %s", (name,)).fetchone()[0]
    typer.echo(f"created adapter {name!r} of model {model!r}: rank {rank}, alpha {number(alpha)}, "
               f"targets {', '.join(target)}, {params:,} parameters")


@app.command("drop")
def drop(ctx: typer.Context, name: str = typer.Argument(..., help="The adapter to delete.")) -> None:
    """Delete an adapter: its tensors, optimizer state and training log (llm_adapter_drop)."""
    with db.session(ctx.obj["dsn"]) as pg:
        if not pg.execute("SELECT {llm_adapter_drop}(%s)", (name,)).fetchone()[0]:
            raise PgllmError(f'adapter "{name}" does not exist', hint="pgllm adapter list lists them")
    typer.echo(f"deleted adapter {name!r}")


@app.command("copy")
def copy(ctx: typer.Context, source: str = typer.Argument(..., help="The adapter to copy."),
         target: str = typer.Argument(..., help="The copy's name.")) -> None:
    """Copy an adapter under another name with its optimizer state, step and log (llm_adapter_copy):
    a snapshot to come back to, or the start of another tenant's."""
    with db.session(ctx.obj["dsn"]) as pg:
        pg.execute("SELECT {llm_adapter_copy}(%s, %s)", (source, target))
    typer.echo(f"copied adapter {source!r} to {target!r}")


@app.command("merge")
def merge(ctx: typer.Context, name: str = typer.Argument(..., help="The adapter."),
          into: str = typer.Option(..., "--into", help="The new model's name.")) -> None:
    """A new model: the adapter's model with the adapter merged into its weights, its tokenizer and
    training state copied (llm_adapter_merge)."""
    with db.session(ctx.obj["dsn"]) as pg:
        pg.execute("SELECT {llm_adapter_merge}(%s, %s)", (name, into))
    typer.echo(f"merged adapter {name!r} into the new model {into!r}")


def peft_config(model: str, rank: int, alpha: float, dropout: float, targets: list[str]) -> dict:
    """adapter_config.json as PEFT 0.21 writes it for this adapter, with every field that changes
    what it computes said explicitly (PEFT's defaults may change; these must not)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model,
        "r": rank,
        "lora_alpha": number(alpha),
        "lora_dropout": number(dropout),
        "target_modules": targets,
        "fan_in_fan_out": True,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
    }


@app.command("export")
def export(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The adapter."),
    output: Path = typer.Option(..., "--output", "-o", help="The directory to write (made if missing)."),
) -> None:
    """Export an adapter as a PEFT directory (adapter_config.json, adapter_model.safetensors):
    PeftModel.from_pretrained loads it onto the base model that pgllm export --format safetensors writes."""
    output = output.expanduser()
    with db.session(ctx.obj["dsn"]) as pg:
        model, rank, alpha, dropout, targets = require_adapter(pg, name)
        rows = pg.execute("SELECT name, shape, data FROM {llm_adapter_param} WHERE adapter = %s", (name,),
                          binary=True).fetchall()
    tensors = sorted((PEFT_PREFIX + t + ".weight", tuple(shape), data) for t, shape, data in rows)
    for key, shape, data in tensors:
        if len(data) != 4 * int(np.prod(shape)):
            raise PgllmError(f"tensor {key!r} of adapter {name!r} has {len(data)} bytes in llm_adapter_param, "
                             f"expected {4 * int(np.prod(shape))} for shape {list(shape)}")
    if output.exists() and not output.is_dir():
        raise PgllmError(f"{output} exists and is not a directory")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PgllmError(f"cannot create {output}: {e.strerror or e}") from None

    def write_weights(f):
        f.write(safetensors_file.header((key, shape) for key, shape, _ in tensors))
        for _, _, data in tensors:
            f.write(data)

    write_atomically(output / WEIGHTS, write_weights)
    config = json.dumps(peft_config(model, rank, alpha, dropout, list(targets)), indent=2).encode() + b"\n"
    write_atomically(output / CONFIG, lambda f: f.write(config))
    params = sum(int(np.prod(shape)) for _, shape, _ in tensors)
    typer.echo(f"exported adapter {name!r} of model {model!r} ({params:,} parameters) to {output} as a PEFT "
               f"directory; load it onto the base that `pgllm export {model} --format safetensors` writes")


def target_of(tensor: str) -> str:
    """h.0.attn.c_attn.lora_A -> attn.c_attn"""
    return tensor.split(".", 2)[2].rsplit(".", 1)[0]


def read_peft_config(path: Path) -> dict:
    """adapter_config.json: a LoRA adapter of the kind pg_llm has, with PEFT's defaults filled in (an
    rsLoRA adapter's alpha becomes plain LoRA's; "rslora_alpha" keeps the file's)."""
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise PgllmError(f"cannot read {path}: {e.strerror or e}",
                         hint=PEFT_DIR_HINT) from None
    except ValueError as e:
        raise PgllmError(f"{path} is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise PgllmError(f"{path} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise PgllmError(f"{path} has peft_type {config.get('peft_type')!r}; pg_llm's adapters are LoRA adapters")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise PgllmError(f"{path} has task_type {config['task_type']!r}; pg_llm's models are causal language models "
                         "(CAUSAL_LM)")
    if config.get("bias", "none") != "none":
        raise PgllmError(f"{path} has bias {config['bias']!r}; pg_llm's adapters train no biases (bias \"none\")")
    for field in UNSUPPORTED:
        if config.get(field):
            raise PgllmError(f"{path} sets {field} ({json.dumps(config[field])}), which pg_llm's adapters do not have",
                             hint="export it from PEFT without it, or merge it into the base model there")
    config = {**PEFT_DEFAULTS, **config}
    if isinstance(config["r"], bool) or not isinstance(config["r"], int):
        raise PgllmError(f"{path}: r must be an integer, not {json.dumps(config['r'])}")
    for field in ("lora_alpha", "lora_dropout"):
        if isinstance(config[field], bool) or not isinstance(config[field], (int, float)):
            raise PgllmError(f"{path}: {field} must be a number, not {json.dumps(config[field])}")
    if config.get("use_rslora") and config["r"] > 0:
        # rsLoRA scales by alpha / sqrt(r): the same adapter as plain LoRA's alpha' / r
        config = {**config, "lora_alpha": config["lora_alpha"] * math.sqrt(config["r"]),
                  "rslora_alpha": config["lora_alpha"]}
    return config


def read_peft_tensors(path: Path) -> dict[str, np.ndarray]:
    """adapter_model.safetensors: each tensor under pg_llm's name (h.0.attn.c_attn.lora_A)."""
    if not path.is_file():
        raise PgllmError(f"{path}: no such file",
                         hint=PEFT_DIR_HINT)
    tensors = {}
    for key, a in safetensors_file.read(path).items():
        m = PEFT_KEY.fullmatch(key)
        if m is None:
            raise PgllmError(f"{path} has a tensor {key!r} that is not a LoRA matrix of a GPT-2 block's product",
                             hint="pg_llm's adapters adapt attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj only")
        if not np.isfinite(a).all():
            raise PgllmError(f"tensor {key!r} of {path} holds values that are not finite (NaN or infinity)")
        tensors[m.group(1)] = a
    if not tensors:
        raise PgllmError(f"{path} holds no tensors")
    return tensors


@app.command("import")
def import_(
    ctx: typer.Context,
    directory: Path = typer.Argument(..., metavar="DIR", help="A PEFT directory: adapter_config.json and "
                                     "adapter_model.safetensors (PeftModel.save_pretrained, pgllm adapter export)."),
    name: str = typer.Option(..., "--name", help="The adapter's name in the database."),
    model: str = MODEL,
    replace: bool = typer.Option(False, "--replace", help="Replace an adapter of that name (its tensors, optimizer "
                                 "state and training log go)."),
) -> None:
    """Import a PEFT LoRA adapter of a GPT-2 as an adapter of a model: checked against the model's shape,
    all its tensors or none."""
    directory = directory.expanduser()
    if not directory.is_dir():
        raise PgllmError(f"{directory}: no such directory", hint=PEFT_DIR_HINT)
    config = read_peft_config(directory / CONFIG)
    tensors = read_peft_tensors(directory / WEIGHTS)
    targets = sorted({target_of(t) for t in tensors})
    with db.session(ctx.obj["dsn"]) as pg:
        pg.require_model(model, hint="pgllm models lists them; import its base first with pgllm import")
        if replace:
            pg.execute("SELECT {llm_adapter_drop}(%s)", (name,))
        else:
            refuse_existing(pg, name, replace="--replace replaces it")
        # the server makes the rows an adapter of this rank and targets has on this model; the file
        # must fill exactly those
        pg.execute("SELECT {llm_adapter_create}(%s, %s, rank => %s::int, alpha => %s, dropout => %s, targets => %s)",
                   (name, model, config["r"], config["lora_alpha"], config["lora_dropout"], targets))
        shapes = dict(pg.execute("SELECT name, shape FROM {llm_adapter_param} WHERE adapter = %s", (name,)).fetchall())
        missing, extra = sorted(shapes.keys() - tensors.keys()), sorted(tensors.keys() - shapes.keys())
        where = str(directory / WEIGHTS)
        if extra:
            raise PgllmError(f"{where} has {len(extra)} tensor(s) that an adapter of model {model!r} has not, "
                             f"first {extra[0]!r}", hint="is it an adapter of a model of another shape?")
        if missing:
            raise PgllmError(f"{where} lacks {len(missing)} tensor(s) of an adapter of model {model!r} with targets "
                             f"{', '.join(targets)}, first {missing[0]!r}",
                             hint="pg_llm's adapters adapt every layer (PEFT's layers_to_transform unset)")
        for t, shape in shapes.items():
            if tensors[t].shape != tuple(shape):
                raise PgllmError(f"tensor {t!r} of {where} has shape {list(tensors[t].shape)}; an adapter of model "
                                 f"{model!r} of rank {config['r']} needs {shape}",
                                 hint="the config's r and the tensors must agree, and the model be the adapter's base")
        for t, a in tensors.items():
            pg.execute("UPDATE {llm_adapter_param} SET data = %s WHERE adapter = %s AND name = %s",
                       (np.ascontiguousarray(a, dtype="<f4").tobytes(), name, t))
    params = sum(a.size for a in tensors.values())
    rslora = (f" (rsLoRA's alpha {number(config['rslora_alpha'])} / sqrt(rank) as alpha / rank)"
              if "rslora_alpha" in config else "")
    typer.echo(f"imported adapter {name!r} of model {model!r} from {directory}: rank {config['r']}, alpha "
               f"{number(config['lora_alpha'])}{rslora}, targets {', '.join(targets)}, {params:,} parameters")
