"""Reward-model benchmarks from the command line (the same code as `dynrules bench train|score`).

    python benchmarks/bench_train.py train          # JAX vs PyTorch training pairs/s (CPU)
    python benchmarks/bench_train.py score          # JAX vs PyTorch scoring pairs/s (CPU)
    python benchmarks/bench_train.py mfu [--layers 24 --hidden 1024 --seq 512 ...]   # GPU/TPU

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
    parser.add_argument("mode", choices=["train", "score", "mfu"])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--pairs-per-step", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--remat", action="store_true")
    args = parser.parse_args()
    if args.mode == "train":
        result = bench.bench_train()
    elif args.mode == "score":
        result = bench.bench_score()
    else:
        result = bench.bench_train_mfu(layers=args.layers, hidden=args.hidden, heads=args.heads, seq=args.seq,
                                       pairs_per_step=args.pairs_per_step, steps=args.steps, dtype=args.dtype,
                                       remat=args.remat)  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
