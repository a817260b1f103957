"""`make bench`: every side-by-side benchmark in one go, results kept as JSON.

Each benchmark is a `dynrules bench …` command that measures its contenders in one process and
prints one JSON object; this runner only sequences them and writes benchmarks/results/NAME.json.
Pass names to run a subset: `python -m dynrules.benchmarks.run_all selection mi`.
"""

from __future__ import annotations

import json
import subprocess
import sys

from dynrules.benchmarks.paths import RESULTS

BENCHMARKS = {
    "selection": ["selection", "--pairs", "1000000", "--rules", "100", "--k", "5"],
    "mi": ["mi", "--pairs", "1000000"],
    "judge": ["judge"],
    "train": ["train"],
    "score": ["score"],
    "train_decoder": ["train", "--backbone", "decoder"],
    "score_decoder": ["score", "--backbone", "decoder"],
    "serve": ["serve"],
    "multihost": ["multihost"],
}


def main(names: list[str]) -> int:
    RESULTS.mkdir(exist_ok=True)
    failed = []
    for name in names or list(BENCHMARKS):
        # -P: the working directory (the repository root, which holds a `kernels` package of its
        # own) stays off sys.path, so transformers finds the `kernels` library or none.
        command = [sys.executable, "-P", "-m", "dynrules", "bench", *BENCHMARKS[name], "--json"]
        print(f"$ dynrules bench {' '.join(BENCHMARKS[name])} --json", flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr.strip()[-2000:], file=sys.stderr)
            failed.append(name)
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2), flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
