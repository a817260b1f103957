#!/usr/bin/env bash
# What only an accelerator can measure, on one GPU: training tokens/s and model FLOPs utilisation
# of Llama-shaped decoder reward models in bf16 compute (float32 master weights), the same step
# in PyTorch (transformers' LlamaForSequenceClassification, eager, autocast) as the baseline, and
# bf16-vs-float32 numerics: `dynrules bench mfu` and `dynrules bench numerics`. Needs dynrules'
# dependencies with a CUDA build of JAX, and torch+transformers for the baseline. The repository
# is used in place (no install). JSON lines go to stdout and to $OUT/gpu.jsonl (default
# benchmarks/results/); record them in docs/performance.md with the device named.
# Target: >= 40% MFU on an H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
RESULTS=${OUT:-benchmarks/results}/gpu.jsonl
mkdir -p "$(dirname "$RESULTS")"
PACKAGE_PARENT=$(mktemp -d)  # the repository root is the package: import it as dynrules
ln -s "$PWD" "$PACKAGE_PARENT/dynrules"
export PYTHONPATH=$PACKAGE_PARENT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

bench() {  # one measurement, bounded in time, so that one failure leaves the others standing
  echo "== $*"
  timeout "${LIMIT:-180}" "$PY" -m dynrules bench "$@" --json | tee -a "$RESULTS"
}
# Smoke test: a 135M model, seconds; if the environment is wrong, say so before the long runs.
bench mfu --preset smollm2-135m --seq 256 --pairs-per-step 2 --steps 2 || exit 1
# Llama-3.2-1B shape (16 × 2048, 32 heads / 8 KV heads, 1.24B params), 2048 tokens, 4 pairs =
# 8 sequences (16k tokens) a step; full remat, then keeping matmul outputs, then none.
bench mfu --preset llama-3.2-1b --seq 2048 --pairs-per-step 4 --steps 10 --remat full --against-torch
bench mfu --preset llama-3.2-1b --seq 2048 --pairs-per-step 4 --steps 10 --remat dots
bench numerics --preset llama-3.2-1b --seq 512 --pairs-per-step 4 --steps 20
bench mfu --preset llama-3.2-1b --seq 2048 --pairs-per-step 4 --steps 10 --remat none --against-torch
# Llama-3.1-8B shape on one GPU: bf16 master weights and optimizer state so that it fits.
LIMIT=240 bench mfu --preset llama-3.1-8b --seq 2048 --pairs-per-step 1 --steps 5 --remat full --param-dtype bfloat16
