"""Reward-model benchmarks from the command line (the same code as `dynrules bench train|score`).

    python benchmarks/bench_train.py train [--backbone decoder] [--data HH]   # JAX vs PyTorch training (CPU)
    python benchmarks/bench_train.py score [--backbone decoder] [--data HH]   # JAX vs PyTorch scoring (CPU)
    python benchmarks/bench_train.py mfu [--preset llama-3.2-1b --seq 2048 ...]   # GPU/TPU
    python benchmarks/bench_train.py mfu --against-torch ...   # and PyTorch, same shape (CUDA)
    python benchmarks/bench_train.py numerics [--preset llama-3.2-1b --seq 512]   # bf16 vs f32

Each prints one JSON object.
"""

from __future__ import annotations

import argparse
import json

from dynrules.bench import rewardmodel as bench


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["train", "score", "mfu", "numerics"])
    parser.add_argument("--backbone", default="encoder", choices=["encoder", "decoder"])
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--pairs-per-step", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--param-dtype", default="float32", choices=["bfloat16", "float32"])
    parser.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    parser.add_argument("--against-torch", action="store_true")
    parser.add_argument("--data", default=None, help="HH harmless-base test pairs (train, score)")
    args = parser.parse_args()
    if args.mode == "train":
        result = bench.bench_train(backbone=args.backbone, data=args.data)
    elif args.mode == "score":
        result = bench.bench_score(backbone=args.backbone, data=args.data)
    elif args.mode == "numerics":
        result = bench.bench_bf16_numerics(
            preset=args.preset, seq=args.seq, pairs_per_step=args.pairs_per_step, steps=args.steps
        )
    else:
        result = bench.bench_train_mfu(
            preset=args.preset,
            seq=args.seq,
            pairs_per_step=args.pairs_per_step,
            steps=args.steps,
            dtype=args.dtype,
            param_dtype=args.param_dtype,
            remat=args.remat,
            against_torch=args.against_torch,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
