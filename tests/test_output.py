"""The output policy (output.py): results on stdout from the CLI only, diagnostics through
logging, progress through tqdm on a terminal, metrics in metrics.jsonl and TensorBoard.

Every module of the package is read with ``ast``: a ``print``, ``click.echo``/``click.secho`` or
write to ``sys.stdout``/``sys.stderr`` outside the modules allowed below fails here.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dynrules import output
from dynrules.train.metrics import MetricsLog, scalars

from .conftest import tensorboard_scalars

ROOT = Path(__file__).resolve().parents[1]
NOT_PACKAGE = {"tests", ".venv", "build", "out", ".typecheck"}

# Modules that may write to stdout/stderr themselves, and why. Everything else logs or returns.
ALLOWED = {
    "cli.py": "the CLI: results on stdout, one-line errors on stderr",
    "output.py": "the policy's own log handler: writes log records to stderr",
    "launch.py": "forwards its processes' stdout and stderr, each line prefixed, under one header",
    "engine/judges/loopback.py": "a child process: prints its port on stdout for its parent",
    "benchmarks/run_all.py": "`make bench`: a script; prints each benchmark's JSON",
    "benchmarks/llama_server.py": "`make integration`: a script; prints its check's JSON",
    "benchmarks/openrlhf_remote_rm.py": "`make integration`: a script; prints its result's JSON",
}


def _modules() -> list[Path]:
    return sorted(
        path for path in ROOT.rglob("*.py") if not NOT_PACKAGE & set(path.relative_to(ROOT).parts)
    )


def _writes(path: Path) -> list[str]:
    """``print``, ``click.echo``/``secho`` and ``sys.stdout``/``sys.stderr`` calls in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("print", "echo", "secho"):
            found.append(f"{func.id}() at line {node.lineno}")
        elif isinstance(func, ast.Attribute):
            owner = ast.unparse(func.value)
            if (owner == "click" and func.attr in ("echo", "secho")) or owner in (
                "sys.stdout",
                "sys.stderr",
            ):
                found.append(f"{owner}.{func.attr}() at line {node.lineno}")
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_cli_and_scripts_write_to_stdout_or_stderr(path):
    name = str(path.relative_to(ROOT))
    if name in ALLOWED:
        return
    assert not _writes(path), (
        f"{name}: log (logging.getLogger(__name__)) or return: {_writes(path)}"
    )


def test_the_checker_sees_writes_and_the_allowed_modules_exist(tmp_path):
    module = tmp_path / "x.py"
    module.write_text(
        "import click, sys\n"
        "def f():\n    print(1)\n    click.echo(2)\n    sys.stderr.write('3')\n"
        "    log.info('fine')\n"
    )
    assert len(_writes(module)) == 3
    assert all((ROOT / name).is_file() for name in ALLOWED)
    assert all(_writes(ROOT / name) for name in ALLOWED), "an allowance no longer needed"


@pytest.fixture
def clean_logging():
    """Leaves the root and ``dynrules`` loggers as they were."""
    root, ours = logging.getLogger(), logging.getLogger("dynrules")
    handlers, levels = list(root.handlers), (root.level, ours.level)
    configured = dict(output._configured)
    yield
    root.handlers[:] = handlers
    root.setLevel(levels[0])
    ours.setLevel(levels[1])
    output._configured.clear()
    output._configured.update(configured)


def test_the_cli_configures_logging_once_dynrules_at_its_level_others_at_warning(
    clean_logging, monkeypatch
):
    from dynrules.cli import main

    monkeypatch.delenv(output.LEVEL_ENV, raising=False)
    runner = CliRunner()
    assert runner.invoke(main, ["config"]).exit_code == 0
    assert logging.getLogger("dynrules").level == logging.INFO
    assert logging.getLogger().level == logging.WARNING
    assert runner.invoke(main, ["--log-level", "debug", "config"]).exit_code == 0
    assert logging.getLogger("dynrules").level == logging.DEBUG
    monkeypatch.setenv(output.LEVEL_ENV, "error")
    assert runner.invoke(main, ["config"]).exit_code == 0
    assert logging.getLogger("dynrules").level == logging.ERROR and output.log_level() == "ERROR"
    ours = [h for h in logging.getLogger().handlers if isinstance(h, output._StderrHandler)]
    assert len(ours) == 1  # three invocations, one handler
    bad = runner.invoke(main, ["--log-level", "loud", "config"])
    assert bad.exit_code == 2 and "loud" in bad.output


def test_the_cli_level_beats_the_environment_for_what_log_level_reports(clean_logging, monkeypatch):
    """``DYNRULES_LOG_LEVEL=DEBUG dynrules --log-level WARNING serve``: uvicorn gets WARNING.
    Order: an explicit level, the CLI's, the environment's, INFO."""
    from dynrules.cli import main

    monkeypatch.setenv(output.LEVEL_ENV, "debug")
    output._configured.clear()
    assert output.log_level() == "DEBUG"  # nothing configured: the environment
    assert CliRunner().invoke(main, ["--log-level", "warning", "config"]).exit_code == 0
    assert logging.getLogger("dynrules").level == logging.WARNING
    assert output.log_level() == "WARNING"
    assert output.log_level("error") == "ERROR"
    monkeypatch.delenv(output.LEVEL_ENV)
    output._configured.clear()
    assert output.log_level() == "INFO"


def test_log_records_go_to_the_current_stderr_and_never_to_stdout(clean_logging, monkeypatch):
    output.configure_logging("INFO")
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    logging.getLogger("dynrules.pipeline").info("stage %s …", "rate")
    logging.getLogger("dynrules.pipeline").debug("hidden")
    logging.getLogger("httpx").info("a third party's chatter: hidden")
    logging.getLogger("httpx").warning("a third party's warning")
    assert out.getvalue() == ""
    lines = err.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("INFO dynrules.pipeline: stage rate …")
    assert lines[1].endswith("WARNING httpx: a third party's warning")


def test_progress_bars_only_when_asked_and_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, progress, shown in (
        (Terminal(), True, True),
        (Terminal(), False, False),
        (io.StringIO(), True, False),  # a pipe, a log file, CI
    ):
        monkeypatch.setattr(sys, "stderr", stream)
        with output.progress_bar(total=3, desc="x", progress=progress) as bar:
            bar.update(3)
        assert bool(stream.getvalue()) == shown


# --------------------------------------------------------------------------- TensorBoard


def _jsonl_points(run_dir: Path) -> list[tuple[str, int, float]]:
    """metrics.jsonl as TensorBoard scalars: (tag, step, value as float32)."""
    import numpy as np

    points = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        split, step = record.pop("split"), record.pop("step")
        points += [(tag, step, float(np.float32(v))) for tag, v in scalars(split, record)]
    return points


def test_metrics_log_writes_every_number_of_a_record_as_a_scalar(tmp_path):
    metrics = MetricsLog(tmp_path, is_writer=True)
    metrics.record("train", 3, {"loss": 0.5, "accuracy": 0.25, "note": "text", "n": 7})
    metrics.record(
        "eval",
        3,
        {
            "accuracy": 0.75,
            "sections": {"safety": {"accuracy": 1.0, "pairs": 4}},
            "subsets": {"a b?": {"accuracy": 0.5}},
            "absent": None,
            "flag": True,
        },
    )
    metrics.close()
    points = tensorboard_scalars(tmp_path / "tensorboard")
    assert sorted(points) == sorted(_jsonl_points(tmp_path))
    assert sorted(points) == sorted(
        [
            ("train/loss", 3, 0.5),
            ("train/accuracy", 3, 0.25),
            ("train/n", 3, 7.0),
            ("eval/accuracy", 3, 0.75),
            ("eval/sections/safety/accuracy", 3, 1.0),
            ("eval/sections/safety/pairs", 3, 4.0),
            ("eval/subsets/a_b_/accuracy", 3, 0.5),
        ]
    )


def test_only_the_writer_process_writes(tmp_path):
    MetricsLog(tmp_path, is_writer=False).record("train", 1, {"loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()


def test_a_resumed_run_replaces_what_the_killed_one_logged_past_its_checkpoint(tmp_path):
    killed = MetricsLog(tmp_path, is_writer=True)
    for step in (2, 4, 6):  # killed after step 6, checkpoint at 4
        killed.record("train", step, {"loss": 1.0 / step})
    killed.close()  # (a kill -9 leaves the same file: every record is flushed)
    resumed = MetricsLog(tmp_path, is_writer=True, resumed_from=4)
    for step in (6, 8):
        resumed.record("train", step, {"loss": 2.0 / step})
    resumed.close()
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2  # one event file per start
    assert tensorboard_scalars(tmp_path / "tensorboard") == [
        ("train/loss", 2, 0.5),
        ("train/loss", 4, 0.25),
        ("train/loss", 6, pytest.approx(2 / 6)),
        ("train/loss", 8, 0.25),
    ]


def test_a_tensorboard_failure_is_logged_and_never_stops_the_records(tmp_path, caplog):
    (tmp_path / "tensorboard").write_text("a file where the directory goes")
    metrics = MetricsLog(tmp_path, is_writer=True)
    with caplog.at_level(logging.WARNING, logger="dynrules.train.metrics"):
        metrics.record("train", 1, {"loss": 1.0})
        metrics.record("train", 2, {"loss": 0.5})
    metrics.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    (warning,) = caplog.records
    assert "TensorBoard output" in warning.getMessage()


def test_tensorboardx_is_imported_without_pytorch():
    import subprocess

    code = (
        "import sys; from dynrules.train.metrics import _summary_writer; _summary_writer(); "
        "assert 'torch' not in sys.modules and 'tensorboardX' in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
