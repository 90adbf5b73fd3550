"""`pgllm adapter`: the adapters' lifecycle from the command line, and the round trip with PEFT.

The reference is peft (0.21.2, the dev extra) itself: `pgllm export --format safetensors` of the
base plus `pgllm adapter export` load with PeftModel.from_pretrained and compute llm_logits(...,
adapter => a); a directory that peft's save_pretrained wrote imports with `pgllm adapter import`,
tensor for tensor.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid

import numpy as np
import psycopg
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from psycopg.conninfo import make_conninfo
from safetensors.numpy import load_file, save_file
from transformers import GPT2LMHeadModel

from pgllm import safetensors_file
from pgllm.errors import PgllmError

from .test_cli import DECOY, decoyed  # noqa: F401 (a fixture)
from .test_lora import load_adapter
from .test_tokenizer import one_error_line
from .test_training import load_params, make_hf_model, small_setup
from .weights import store_hf_model

# float32 on both sides, different summation orders; logits of about +-3 (as tests/test_lora.py)
LOGITS_ATOL = 2e-4
PEFT_PREFIX = "base_model.model.transformer."

# (n_layer, n_head, n_embd, n_positions, vocab, rank, alpha, dropout, targets)
SHAPES = [
    (2, 3, 48, 32, 97, 4, 8.0, 0.0, ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    (3, 4, 64, 64, 211, 2, 3.5, 0.1, ["attn.c_attn", "mlp.c_proj"]),
]


@pytest.fixture
def pgllm(cli, db):
    """`pgllm --dsn DB ARGS`; asserts success and returns stdout."""
    def run(*args: str) -> str:
        result = cli("--dsn", db, *args)
        assert result.exit_code == 0, result.output
        return result.stdout
    return run


def prompt_logits(conn, tokens: list[int], model: str, adapter: str | None) -> np.ndarray:
    return np.array(conn.execute("SELECT llm_logits(%s, %s, adapter => %s)", (tokens, model, adapter)).fetchone()[0])


def randomize_lora_b(conn, adapter: str, seed: int) -> None:
    """B nonzero (a new adapter's B is zero: it would change nothing and hide a wrong A or B)."""
    rng = np.random.default_rng(seed)
    for name, shape in conn.execute("SELECT name, shape FROM llm_adapter_param WHERE adapter = %s AND name LIKE "
                                    "'%%lora_B'", (adapter,)).fetchall():
        data = (0.05 * rng.standard_normal(shape)).astype("<f4")
        conn.execute("UPDATE llm_adapter_param SET data = %s WHERE adapter = %s AND name = %s",
                     (data.tobytes(), adapter, name))


def randomize_peft_b(model, seed: int) -> None:
    """The peft model's lora_B nonzero, as randomize_lora_b makes ours."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))


def peft_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1].numpy()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}C{}-r{}-{}".format(s[0], s[2], s[5], len(s[8])))
def test_an_exported_adapter_loads_in_peft_and_computes_llm_logits(pgllm, conn, tmp_path, shape):
    n_layer, n_head, n_embd, n_pos, vocab, rank, alpha, dropout, targets = shape
    store_hf_model(conn, "tiny", make_hf_model(7, n_layer, n_head, n_embd, n_pos, vocab))
    out = pgllm("adapter", "create", "tenant", "--model", "tiny", "--rank", str(rank), "--alpha", str(alpha),
                "--dropout", str(dropout), *[a for t in targets for a in ("--target", t)], "--seed", "5")
    assert f"created adapter 'tenant' of model 'tiny': rank {rank}" in out
    randomize_lora_b(conn, "tenant", seed=3)
    assert "exported model 'tiny'" in pgllm("export", "tiny", "--format", "safetensors", "-o", str(tmp_path / "base"))
    assert "exported adapter 'tenant'" in pgllm("adapter", "export", "tenant", "-o", str(tmp_path / "lora"))

    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                                   "fan_in_fan_out", "bias", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": targets, "fan_in_fan_out": True, "bias": "none", "base_model_name_or_path": "tiny"}
    # the tensors as they are in the rows, under PEFT's keys, float32
    ours = load_adapter(conn, "tenant")
    written = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert written.keys() == {PEFT_PREFIX + name + ".weight" for name in ours}
    for name, a in ours.items():
        got = written[PEFT_PREFIX + name + ".weight"]
        assert got.dtype == np.float32 and np.array_equal(got, a), name

    base = GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
    peft = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    loaded = {n.removeprefix(PEFT_PREFIX).replace(".default.weight", ""): p.detach().numpy()
              for n, p in peft.named_parameters() if "lora_" in n}
    assert loaded.keys() == ours.keys() and all(np.array_equal(loaded[n], ours[n]) for n in ours)
    rng = np.random.default_rng(1)
    for length in (1, 5, n_pos):
        tokens = [int(t) for t in rng.integers(0, vocab, size=length)]
        got = prompt_logits(conn, tokens, "tiny", "tenant")
        np.testing.assert_allclose(got, peft_logits(peft, tokens), atol=LOGITS_ATOL, rtol=0)
        assert np.abs(got - prompt_logits(conn, tokens, "tiny", None)).max() > 10 * LOGITS_ATOL, \
            "the adapter changes what the model computes"


@pytest.mark.parametrize("target_modules", [["c_attn", "c_fc"], {"c_proj"}], ids=["c_attn+c_fc", "c_proj"])
def test_a_directory_peft_saved_imports_exactly(pgllm, cli, db, conn, tmp_path, target_modules):
    """PEFT's own short names (c_proj: both attn.c_proj and mlp.c_proj) as a list or a set; the
    targets come from the tensors."""
    hf = make_hf_model(7, 2, 3, 48, 32, 97)
    store_hf_model(conn, "tiny", hf)
    config = LoraConfig(r=3, lora_alpha=6, target_modules=target_modules, lora_dropout=0.05, fan_in_fan_out=True,
                        task_type="CAUSAL_LM")
    ref = get_peft_model(hf, config)
    randomize_peft_b(ref, seed=2)
    ref.eval().save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")

    out = pgllm("adapter", "import", str(tmp_path / "saved"), "--name", "imported", "--model", "tiny")
    targets = sorted({k.removeprefix(PEFT_PREFIX).split(".", 2)[2].rsplit(".", 2)[0] for k in saved})
    assert f"imported adapter 'imported' of model 'tiny' from {tmp_path / 'saved'}: rank 3" in out
    row = conn.execute("SELECT model, rank, alpha, dropout, targets, step, base_version FROM llm_adapter "
                       "WHERE adapter = 'imported'").fetchone()
    assert row == ("tiny", 3, 6.0, pytest.approx(0.05), targets, 0, None)
    assert targets == (["attn.c_attn", "mlp.c_fc"] if "c_fc" in target_modules else ["attn.c_proj", "mlp.c_proj"])
    ours = load_adapter(conn, "imported")
    assert {PEFT_PREFIX + n + ".weight" for n in ours} == saved.keys()
    for name, a in ours.items():
        assert np.array_equal(a, saved[PEFT_PREFIX + name + ".weight"]), name
    assert conn.execute("SELECT count(*) FROM llm_adapter_param WHERE adapter = 'imported' AND m IS NOT NULL"
                        ).fetchone()[0] == 0

    tokens = [3, 14, 15, 92, 65, 35]
    np.testing.assert_allclose(prompt_logits(conn, tokens, "tiny", "imported"), peft_logits(ref, tokens),
                               atol=LOGITS_ATOL, rtol=0)

    # an existing name: refused, then replaced with --replace
    line = one_error_line(cli("--dsn", db, "adapter", "import", str(tmp_path / "saved"), "--name", "imported",
                              "--model", "tiny"))
    assert line == 'Error: adapter "imported" already exists (--replace replaces it)'
    conn.execute("UPDATE llm_adapter SET step = 4 WHERE adapter = 'imported'")
    pgllm("adapter", "import", str(tmp_path / "saved"), "--name", "imported", "--model", "tiny", "--replace")
    assert conn.execute("SELECT step FROM llm_adapter WHERE adapter = 'imported'").fetchone() == (0,)

    # and back out: the same tensors
    pgllm("adapter", "export", "imported", "-o", str(tmp_path / "again"))
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert again.keys() == saved.keys() and all(np.array_equal(again[k], saved[k]) for k in saved)


def test_list_create_drop_and_the_sql_defaults(pgllm, cli, db, conn):
    store_hf_model(conn, "tiny", make_hf_model(7, 2, 3, 48, 32, 97))
    store_hf_model(conn, "other", make_hf_model(8, 1, 2, 16, 16, 50))
    assert "no adapters" in pgllm("adapter", "list")
    pgllm("adapter", "create", "a1", "--model", "tiny")
    conn.execute("SELECT llm_adapter_create('a2', 'tiny')")
    pgllm("adapter", "create", "b", "--model", "other", "-r", "2", "-t", "mlp.c_fc", "-t", "attn.c_proj")
    # the command's defaults are llm_adapter_create's: the same row, the same initial values
    row = "SELECT rank, alpha, dropout, targets FROM llm_adapter WHERE adapter = %s"
    assert conn.execute(row, ("a1",)).fetchone() == conn.execute(row, ("a2",)).fetchone() == \
        (8, 16.0, 0.0, ["attn.c_attn"])
    a1, a2 = load_adapter(conn, "a1"), load_adapter(conn, "a2")
    assert a1.keys() == a2.keys() and all(np.array_equal(a1[k], a2[k]) for k in a1)

    listed = pgllm("adapter", "list")
    assert all(name in listed for name in ("a1", "a2", "b", "attn.c_proj, mlp.c_fc"))
    only = pgllm("adapter", "list", "other")
    assert " b " in only and "a1" not in only
    assert "a1" in pgllm("adapter")  # alone: the list
    assert "no adapters of model 'nope'" in pgllm("adapter", "list", "nope")

    assert pgllm("adapter", "drop", "a1").strip() == "deleted adapter 'a1'"
    assert one_error_line(cli("--dsn", db, "adapter", "drop", "a1")) == \
        'Error: adapter "a1" does not exist (pgllm adapter list lists them)'
    assert [r for r, in conn.execute("SELECT adapter FROM llm_adapter ORDER BY 1")] == ["a2", "b"]

    # copy and merge: the copy serves as the original; the merged model as the model with it
    conn.execute("UPDATE llm_adapter_param SET data = set_byte(data, 3, 60) WHERE adapter = 'a2' AND name LIKE '%lora_B'")
    assert pgllm("adapter", "copy", "a2", "a3").strip() == "copied adapter 'a2' to 'a3'"
    assert pgllm("adapter", "merge", "a3", "--into", "tiny-a3").strip() == "merged adapter 'a3' into the new model 'tiny-a3'"
    logits = "SELECT llm_logits('{1,2,3}', %s, adapter => %s)"
    with_adapter, merged = conn.execute(logits, ("tiny", "a3")).fetchone()[0], conn.execute(logits, ("tiny-a3", None)).fetchone()[0]
    assert with_adapter == conn.execute(logits, ("tiny", "a2")).fetchone()[0]
    assert np.abs(np.array(with_adapter) - np.array(merged)).max() < 1e-4
    assert one_error_line(cli("--dsn", db, "adapter", "copy", "a2", "b")) == \
        'Error: adapter "b" already exists (Drop it first (llm_adapter_drop), or choose another name.)'


def test_an_rslora_directory_imports_as_plain_lora(pgllm, conn, tmp_path):
    """PEFT's rsLoRA scales by alpha / sqrt(r): it imports as the adapter of alpha sqrt(r), which
    computes peft's logits, and exports as that plain LoRA adapter (the same model in PEFT)."""
    hf = make_hf_model(7, 2, 3, 48, 32, 97)
    store_hf_model(conn, "tiny", hf)
    ref = get_peft_model(hf, LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_proj"], use_rslora=True,
                                        fan_in_fan_out=True, task_type="CAUSAL_LM"))
    randomize_peft_b(ref, seed=3)
    ref.eval().save_pretrained(tmp_path / "rs")
    out = pgllm("adapter", "import", str(tmp_path / "rs"), "--name", "rs", "--model", "tiny")
    assert "rank 3, alpha 10.392304 (rsLoRA's alpha 6 / sqrt(rank) as alpha / rank)" in out
    assert conn.execute("SELECT alpha FROM llm_adapter WHERE adapter = 'rs'").fetchone()[0] == \
        pytest.approx(6 * 3 ** 0.5, rel=1e-7)
    tokens = [3, 14, 15, 92, 65, 35]
    np.testing.assert_allclose(prompt_logits(conn, tokens, "tiny", "rs"), peft_logits(ref, tokens),
                               atol=LOGITS_ATOL, rtol=0)
    pgllm("adapter", "export", "rs", "-o", str(tmp_path / "plain"))
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == pytest.approx(6 * 3 ** 0.5, rel=1e-7)
    again = PeftModel.from_pretrained(make_hf_model(7, 2, 3, 48, 32, 97), tmp_path / "plain").eval()
    np.testing.assert_allclose(peft_logits(again, tokens), peft_logits(ref, tokens), atol=LOGITS_ATOL, rtol=0)


def adapter_state(conn, adapter: str):
    """Everything llm_train writes for an adapter."""
    return (conn.execute("SELECT name, data, m, v FROM llm_adapter_param WHERE adapter = %s ORDER BY name",
                         (adapter,)).fetchall(),
            conn.execute("SELECT step, data_pos FROM llm_adapter WHERE adapter = %s", (adapter,)).fetchone())


def test_pgllm_train_adapter_in_chunks_equals_one_call(pgllm, cli, db, conn):
    """pgllm train --adapter: chunks of --commit-every steps and a --schedule continue run follow
    one schedule, bit for bit one llm_train(..., adapter => ...) call over it; the base is untouched;
    one run per adapter, while another adapter of the same base trains beside it."""
    small_setup(conn, "m")
    small_setup(conn, "other", shape=(1, 2, 16, 16, 97))
    for name in ("cli", "sql"):
        conn.execute("SELECT llm_adapter_create(%s, 'm', rank => 2, targets => '{attn.c_attn,mlp.c_fc}', seed => 5)",
                     (name,))
    base = load_params(conn, "m")
    run = ["train", "--adapter", "cli", "--batch-size", "2", "--commit-every", "2"]
    out = pgllm(*run, "--steps", "5", "--total-steps", "7", "--warmup", "2", "--lr-max", "1e-3")
    assert 'training adapter "cli" of model "m" from step 0 to 5' in out
    assert 'trained adapter "cli" of model "m": steps 1..5 of a 7-step schedule (new, from step 0)' in out
    assert "(3 commits)" in out
    out = pgllm(*run, "--steps", "2", "--schedule", "continue")
    assert "steps 6..7 of a 7-step schedule (continued, from step 0)" in out
    assert pgllm("log", "--adapter", "cli").startswith("cli: 7 steps (1..7), loss ")
    assert one_error_line(cli("--dsn", db, "log", "--adapter", "sql")) == \
        'Error: adapter "sql" has no training log (train it with pgllm train --adapter)'
    conn.execute("SELECT llm_train('m', 7, batch_size => 2, warmup => 2, lr_max => 1e-3, total_steps => 7, "
                 "adapter => 'sql')")
    assert adapter_state(conn, "cli") == adapter_state(conn, "sql")
    assert adapter_state(conn, "cli")[1] == (7, 14)
    assert conn.execute("SELECT schedule->>'total_steps' FROM llm_adapter WHERE adapter = 'cli'").fetchone()[0] == "7"
    after = load_params(conn, "m")
    assert all(np.array_equal(base[k], after[k]) for k in base)
    assert conn.execute("SELECT count(*) FROM llm_train_state WHERE model = 'm' AND step > 0").fetchone()[0] == 0
    assert one_error_line(cli("--dsn", db, *run, "--steps", "1", "--schedule", "continue")) == \
        'Error: the schedule of adapter "cli" of model "m" ended at step 7 (it is at step 7): its learning rate ' \
        'is at its floor, 0 (start a new one with --schedule new)'

    # another session holds the adapter's lock: a second run is refused at once, naming it; an
    # adapter of the same base trains meanwhile
    with psycopg.connect(db, autocommit=True) as holder:
        pid = holder.execute("SELECT pg_backend_pid()").fetchone()[0]
        holder.execute("SELECT llm_adapter_train_lock('cli')")
        assert one_error_line(cli("--dsn", db, *run, "--steps", "1")) == \
            f'Error: adapter "cli" is being trained by another session (pid {pid}) (Wait for that run to finish, ' \
            f'or stop it with SELECT pg_cancel_backend({pid}).)'
        pgllm("train", "--adapter", "sql", "--steps", "1", "--batch-size", "2")
    assert adapter_state(conn, "cli")[1] == (7, 14)

    assert one_error_line(cli("--dsn", db, "train", "--adapter", "nope", "--steps", "1")) == \
        'Error: adapter "nope" does not exist (pgllm adapter create makes one; pgllm adapter list shows those ' \
        'you may read)'
    assert one_error_line(cli("--dsn", db, "train", "--adapter", "cli", "--model", "other", "--steps", "1")) == \
        'Error: adapter "cli" belongs to model "m", not "other" (leave out --model: an adapter trains on its own base)'
    assert adapter_state(conn, "cli")[1] == (7, 14)


def save_peft(hf, path, **config) -> dict:
    """A PEFT adapter of hf saved by peft; returns its tensors."""
    model = get_peft_model(hf, LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": ["c_attn"],
                                             "fan_in_fan_out": True, **config}))
    model.save_pretrained(path)
    return load_file(path / "adapter_model.safetensors")


def test_bad_input_is_one_error_line_and_writes_nothing(cli, db, conn, tmp_path):
    hf = make_hf_model(7, 2, 3, 48, 32, 97)
    store_hf_model(conn, "tiny", hf)
    store_hf_model(conn, "wide", make_hf_model(8, 2, 4, 64, 32, 97))
    conn.execute("SELECT llm_adapter_create('kept', 'tiny', rank => 2)")
    good = tmp_path / "good"
    save_peft(make_hf_model(7, 2, 3, 48, 32, 97), good)

    def variant(name: str, config: dict | None = None, tensors: dict | None = None) -> str:
        """A copy of the good directory with a changed config or tensors."""
        d = tmp_path / name
        shutil.copytree(good, d)
        if config is not None:
            cfg = json.loads((d / "adapter_config.json").read_text())
            (d / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
        if tensors is not None:
            save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})
        return str(d)

    good_tensors = load_file(good / "adapter_model.safetensors")
    no_config = tmp_path / "no-config"
    shutil.copytree(good, no_config)
    (no_config / "adapter_config.json").unlink()
    no_weights = tmp_path / "no-weights"
    shutil.copytree(good, no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    truncated = variant("truncated")
    (tmp_path / "truncated" / "adapter_model.safetensors").write_bytes(
        (good / "adapter_model.safetensors").read_bytes()[:100])
    not_json = variant("not-json")
    (tmp_path / "not-json" / "adapter_config.json").write_text("{")
    lm_head = tmp_path / "lm-head"
    save_peft(make_hf_model(7, 2, 3, 48, 32, 97), lm_head, target_modules=["c_attn", "lm_head"])
    one_layer = {k: v for k, v in good_tensors.items() if ".h.1." not in k}
    key_a = PEFT_PREFIX + "h.0.attn.c_attn.lora_A.weight"

    imp = ["adapter", "import"]
    hint = "give the directory that PeftModel.save_pretrained or pgllm adapter export wrote"
    for args, expected in [
        ([*imp, str(tmp_path / "nope"), "--name", "x", "--model", "tiny"],
         f"Error: {tmp_path / 'nope'}: no such directory ({hint})"),
        ([*imp, str(no_config), "--name", "x", "--model", "tiny"],
         f"Error: cannot read {no_config / 'adapter_config.json'}: No such file or directory ({hint})"),
        ([*imp, str(no_weights), "--name", "x", "--model", "tiny"],
         f"Error: {no_weights / 'adapter_model.safetensors'}: no such file ({hint})"),
        ([*imp, truncated, "--name", "x", "--model", "tiny"], "is not a safetensors file: a header of"),
        ([*imp, str(good), "--name", "kept", "--model", "tiny"], 'Error: adapter "kept" already exists '
         "(--replace replaces it)"),
        ([*imp, str(good), "--name", "x", "--model", "nope"], 'Error: model "nope" does not exist'),
        # an adapter of a model of another width
        ([*imp, str(good), "--name", "x", "--model", "wide"], "tensor 'h.0.attn.c_attn.lora_A' of "),
        # a rank that does not fit the tensors
        ([*imp, variant("rank", config={"r": 3}), "--name", "x", "--model", "tiny"],
         "has shape [2, 48]; an adapter of model 'tiny' of rank 3 needs [3, 48]"),
        ([*imp, variant("rank0", config={"r": 0}), "--name", "x", "--model", "tiny"],
         "Error: rank must be between 1 and 1024, got 0"),
        ([*imp, variant("huge-rank", config={"r": 2**40}), "--name", "x", "--model", "tiny"],
         "Error: integer out of range"),
        ([*imp, variant("float-rank", config={"r": 2.5}), "--name", "x", "--model", "tiny"],
         "adapter_config.json: r must be an integer, not 2.5"),
        ([*imp, variant("dora", config={"use_dora": True}), "--name", "x", "--model", "tiny"],
         "sets use_dora (true), which pg_llm's adapters do not have"),
        ([*imp, variant("ia3", config={"peft_type": "IA3"}), "--name", "x", "--model", "tiny"],
         "has peft_type 'IA3'; pg_llm's adapters are LoRA adapters"),
        ([*imp, not_json, "--name", "x", "--model", "tiny"], "adapter_config.json is not JSON"),
        # an unknown target: a block product pg_llm has not, and a product outside the blocks
        ([*imp, variant("attn-x", tensors={k.replace("c_attn", "c_x"): v for k, v in good_tensors.items()}),
          "--name", "x", "--model", "tiny"], 'Error: "attn.c_x" is not a product an adapter can target'),
        ([*imp, str(lm_head), "--name", "x", "--model", "tiny"],
         "that is not a LoRA matrix of a GPT-2 block's product (pg_llm's adapters adapt attn.c_attn, attn.c_proj, "
         "mlp.c_fc and mlp.c_proj only)"),
        ([*imp, variant("layers", tensors=one_layer), "--name", "x", "--model", "tiny"],
         "lacks 2 tensor(s) of an adapter of model 'tiny' with targets attn.c_attn, first 'h.1.attn.c_attn.lora_A'"),
        ([*imp, variant("extra", tensors={**good_tensors, key_a.replace("h.0", "h.2"): good_tensors[key_a]}),
          "--name", "x", "--model", "tiny"], "has 1 tensor(s) that an adapter of model 'tiny' has not, first "
         "'h.2.attn.c_attn.lora_A'"),
        ([*imp, variant("nan", tensors={**good_tensors, key_a: np.full_like(good_tensors[key_a], np.nan)}),
          "--name", "x", "--model", "tiny"],
         f"Error: tensor '{key_a}' of {tmp_path / 'nan' / 'adapter_model.safetensors'} holds values that are not "
         "finite (NaN or infinity)"),
        # create, drop, export
        (["adapter", "create", "x", "--model", "tiny", "--target", "lm_head"],
         'Error: "lm_head" is not a product an adapter can target'),
        (["adapter", "create", "x", "--model", "tiny", "--rank", "0"], "Error: rank must be between 1 and 1024, got 0"),
        (["adapter", "create", "kept", "--model", "tiny"], 'Error: adapter "kept" already exists'),
        (["adapter", "create", "x", "--model", "nope"], 'Error: model "nope" does not exist'),
        (["adapter", "export", "nope", "-o", str(tmp_path / "out")], 'Error: adapter "nope" does not exist'),
    ]:
        before = load_adapter(conn, "kept")
        line = one_error_line(cli("--dsn", db, *args))
        assert expected in line, (args, line)
        assert [r for r, in conn.execute("SELECT adapter FROM llm_adapter")] == ["kept"], args
        after = load_adapter(conn, "kept")
        assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in after)
    assert not (tmp_path / "out").exists()


def test_the_safetensors_reader_converts_half_precision_exactly(tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float16)
    save_file({"h": x}, tmp_path / "f16.safetensors")
    assert np.array_equal(safetensors_file.read(tmp_path / "f16.safetensors")["h"], x.astype(np.float32))
    from safetensors.torch import save_file as save_torch
    b = torch.randn(4, 2).to(torch.bfloat16)
    save_torch({"b": b}, tmp_path / "bf16.safetensors")
    got = safetensors_file.read(tmp_path / "bf16.safetensors")["b"]
    assert got.dtype == np.float32 and np.array_equal(got, b.float().numpy())


@pytest.mark.parametrize("header, why", [
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, "tensor 't' has no valid dtype"),
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, "tensor 't' has no valid dtype"),
    ({"t": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, "tensor 't' has 8 bytes for shape"),
    ({"t": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, "tensor 't' of"),
    ({"t": 5}, "tensor 't' has no valid dtype"),
    ([1, 2], "its header is not a JSON object"),
])
def test_the_safetensors_reader_refuses_a_malformed_file(tmp_path, header, why):
    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    with pytest.raises(PgllmError, match=re.escape(why)):
        safetensors_file.read(path)


def test_every_adapter_command_finds_pg_llm_whatever_the_search_path(decoyed, cli, tmp_path):
    """In a schema of its own behind decoys of every name (tests/test_cli.py's `decoyed`)."""
    def run(*args: str) -> str:
        result = cli("--dsn", decoyed, *args)
        assert result.exit_code == 0 and DECOY not in result.output, result.output
        return result.stdout

    run("init", "m", "--n-layer", "1", "--n-head", "2", "--d-model", "8", "--n-positions", "16", "--vocab", "50")
    assert "created adapter 'a'" in run("adapter", "create", "a", "--model", "m", "--rank", "2")
    assert "exported adapter 'a'" in run("adapter", "export", "a", "-o", str(tmp_path / "a"))
    assert "imported adapter 'b'" in run("adapter", "import", str(tmp_path / "a"), "--name", "b", "--model", "m")
    assert "imported adapter 'b'" in run("adapter", "import", str(tmp_path / "a"), "--name", "b", "--model", "m",
                                         "--replace")
    listed = run("adapter", "list", "m")
    assert " a " in listed and " b " in listed
    assert "deleted adapter 'a'" in run("adapter", "drop", "a")


def test_a_training_role_imports_and_exports_and_a_serving_role_only_reads(cli, db, conn, tmp_path):
    """Through pgllm grant's rights, with the caller's own (the commands are a few SQL calls)."""
    store_hf_model(conn, "tiny", make_hf_model(7, 2, 3, 48, 32, 97))
    conn.execute("SELECT llm_adapter_create('owned', 'tiny', rank => 2)")
    suffix = uuid.uuid4().hex[:8]
    trainer, server = f"r_train_{suffix}", f"r_serve_{suffix}"
    for role in (trainer, server):
        conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        assert cli("--dsn", db, "grant", trainer, "--train").exit_code == 0
        assert cli("--dsn", db, "grant", server).exit_code == 0

        def as_role(role: str, *args: str):
            return cli("--dsn", make_conninfo(db, user=role), *args)

        for args in (["adapter", "create", "t1", "--model", "tiny"],
                     ["adapter", "export", "t1", "-o", str(tmp_path / "t1")],
                     ["adapter", "import", str(tmp_path / "t1"), "--name", "t2", "--model", "tiny"],
                     ["adapter", "list"], ["adapter", "drop", "t1"]):
            result = as_role(trainer, *args)
            assert result.exit_code == 0, (args, result.output)
        assert "t2" in as_role(server, "adapter", "list").stdout
        assert as_role(server, "adapter", "export", "t2", "-o", str(tmp_path / "t2")).exit_code == 0
        for args in (["adapter", "create", "s1", "--model", "tiny"],
                     ["adapter", "import", str(tmp_path / "t2"), "--name", "s2", "--model", "tiny"],
                     ["adapter", "drop", "t2"]):
            assert "permission denied" in one_error_line(as_role(server, *args)), args
        assert sorted(r for r, in conn.execute("SELECT adapter FROM llm_adapter")) == ["owned", "t2"]
    finally:
        for role in (trainer, server):
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
