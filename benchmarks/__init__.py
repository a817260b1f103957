"""Side-by-side benchmarks, every one a `dynrules bench …` command (above the application layer:
they measure it and what lies below it; only the CLI imports them).

Each benchmark measures its contenders in one process and returns one JSON-ready dict with the
ratios. Also here: `run_all` (`make bench`: runs them and keeps the JSON in benchmarks/results/),
`llama_server` and `openrlhf_remote_rm` (`make integration`: real components outside the test
suite), `gpu.sh` (what only an accelerator can measure), and `paths` (where the benchmark data
and the results files live, declared once).
"""
