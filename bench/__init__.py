"""Side-by-side benchmarks behind `dynrules bench …` (application layer).

Each module measures its contenders in one process and returns one JSON-ready dict with the
ratios; `benchmarks/run_all.py` (`make bench`) runs them all and keeps the JSON.
"""
