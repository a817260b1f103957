"""Where the benchmarks' data and results live, declared once.

Benchmark data sits beside the repository, in ../shared/data (never needed at run time); results
files are kept in the repository, in benchmarks/results/.
"""

from __future__ import annotations

from pathlib import Path

from dynrules.errors import DynrulesError

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SHARED_DATA = HERE.parents[1] / "shared" / "data"
# Anthropic HH-RLHF, harmless-base, test split: 2,312 human-labelled pairs (hh-rlhf-LICENSE).
HH_TEST = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"


def hh_test(path: str | Path | None = None) -> Path:
    """``path``, or the HH harmless-base test file beside the repository; an error that says how
    to pass it when the file is not there."""
    path = Path(path) if path else HH_TEST
    if not path.is_file():
        raise DynrulesError(
            f"{path}: the HH harmless-base test file is not there; pass --data PATH"
        )
    return path


def results_file(name: str) -> Path:
    """benchmarks/results/NAME, its folder made if missing."""
    RESULTS.mkdir(exist_ok=True)
    return RESULTS / name
