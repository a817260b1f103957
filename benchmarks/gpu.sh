#!/usr/bin/env bash
# Training throughput and model FLOPs utilisation of a Llama-3.2-1B-shaped decoder reward model
# in bf16 compute on one GPU (target: MFU >= 40% on an H100). Needs a CUDA build of JAX in the
# environment (e.g. pip install -U "jax[cuda12]" matching the pinned jax version). Prints JSON
# lines; record them in the README with the device name they report.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -c "import jax; d = jax.devices()[0]; assert d.platform == 'gpu', d; print('device:', d.device_kind)"
# Llama-3.2-1B shape (16 x 2048, 32 heads / 8 KV heads, 1.24B params), 2048 tokens, 4 pairs =
# 8 sequences (16k tokens) per step; float32 master weights and AdamW state, bf16 compute.
"$PY" benchmarks/bench_train.py mfu --preset llama-3.2-1b --seq 2048 --pairs-per-step 4 --steps 10 --remat full
# Keeping the matmul outputs (remat=dots) trades memory for less recomputation.
"$PY" benchmarks/bench_train.py mfu --preset llama-3.2-1b --seq 2048 --pairs-per-step 4 --steps 10 --remat dots
