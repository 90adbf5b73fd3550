#!/usr/bin/env bash
# The main job end to end, as `make demo` runs it: the seed's workflow with pgllm commands.
# Every step is a plain pgllm command; copy any of them to do the same by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
PGLLM=${PGLLM:-.venv/bin/pgllm}
PY=${PY:-.venv/bin/python}
WORK=${DEMO_DIR:-build/demo}
MODEL=${PGLLM_MODEL:-demo-gpt2}
STEPS=${DEMO_STEPS:-200}
mkdir -p "$WORK"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. Start the embedded PostgreSQL server and install pg_llm"
$PGLLM server start
$PGLLM install

step "2. Get a model"
if $PY -c 'import huggingface_hub, sys; huggingface_hub.model_info("gpt2", timeout=5)' >/dev/null 2>&1; then
    echo "The Hugging Face Hub is reachable: converting the real GPT-2 (124M)."
    MODEL=gpt2-small
    STEPS=${DEMO_STEPS_GPT2:-20}
    $PGLLM convert gpt2 --output "$WORK/gpt2-small.npz"
    $PGLLM import "$WORK/gpt2-small.npz" --model "$MODEL" --replace
else
    echo "The Hugging Face Hub is out of reach: initialising a small GPT-2 to train from scratch."
    $PGLLM init "$MODEL" --n-layer 4 --n-head 4 --d-model 256 --n-positions 128 --vocab 50257 --seed 1 --replace
fi

step "3. Load the GPT-2 tokenizer into the database"
$PGLLM tokenizer --model "$MODEL" --truncate

step "4. Build a training set from public-domain text (Debian's fortunes)"
CORPUS=/usr/share/games/fortunes
$PGLLM dataset --model "$MODEL" --tokenizer gpt2 --block-size 64 --batch-size 512 --truncate --split-on % \
    --input "$CORPUS/computers" --input "$CORPUS/science" --input "$CORPUS/literature" \
    --input "$CORPUS/wisdom" --input "$CORPUS/education" --input "$CORPUS/work"

step "5. Train inside PostgreSQL ($STEPS steps, a transaction every 50)"
$PGLLM train --model "$MODEL" --steps "$STEPS" --batch-size 8 --lr-max 1e-3 --warmup 30 --commit-every 50

step "6. The loss curve"
$PGLLM log --model "$MODEL" --png "$WORK/loss.png"

step "7. Generate, streamed token by token from the server"
$PGLLM generate "The computer" --model "$MODEL" --max-tokens 40 --temperature 0.8 --seed 7 --stream

step "Done"
$PGLLM server status
echo "Loss curve: $WORK/loss.png"
