#!/usr/bin/env bash
# Training throughput and model FLOPs utilisation of a BERT-large-sized reward model in bf16
# on one GPU (target: MFU >= 40% on an H100). Needs a CUDA build of JAX in the environment
# (e.g. pip install -U "jax[cuda12]" matching the pinned jax version). Prints JSON lines;
# record them in the README with the device name they report.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -c "import jax; d = jax.devices()[0]; assert d.platform == 'gpu', d; print('device:', d.device_kind)"
# BERT-large shape (24 x 1024, 16 heads), 512 tokens, 32 pairs = 64 sequences per step.
"$PY" benchmarks/bench_train.py mfu --layers 24 --hidden 1024 --heads 16 --seq 512 --pairs-per-step 32 --steps 20
# Same with activation recomputation, which lets larger batches fit.
"$PY" benchmarks/bench_train.py mfu --layers 24 --hidden 1024 --heads 16 --seq 512 --pairs-per-step 64 --steps 20 --remat
