"""The output policy: where every kind of output goes, stated once.

Results: stdout, from ``cli.py`` only (``click.echo``; ``--json`` prints one JSON object).
    Library code returns results and never prints: no bare ``print`` and no ``click.echo``
    outside ``cli.py`` (``tests/test_output.py`` reads every module with ``ast`` and keeps it
    so). The exceptions are standalone scripts with their own ``__main__`` (``make bench``,
    ``make integration``, the loopback judge's child process), listed with their reasons in
    that test.
Diagnostics: ``logging``, one ``log = logging.getLogger(__name__)`` per module (so every
    logger is under ``dynrules``). ``dynrules.*`` INFO messages say what a long job is doing
    (a pipeline stage starting, a server ready); WARNING and above, that something needs a
    look. The library never configures logging; the CLI does, once, in :func:`configure_logging`:
    one handler on stderr, ``dynrules.*`` at ``--log-level`` (or ``$DYNRULES_LOG_LEVEL``;
    default INFO), every other library's logger at WARNING. ``dynrules serve`` hands the same
    level to uvicorn's logging.
Progress: tqdm bars on stderr through :func:`progress_bar`, shown only when the caller asks
    (``progress=True``: the CLI without ``--json``; process 0 of a multi-process job) and
    stderr is a terminal — never in logs, pipes or CI output.
Metrics: training writes every record to ``RUN/metrics.jsonl`` and to TensorBoard event files
    in ``RUN/tensorboard/`` (train.metrics; process 0 only); the server exports Prometheus
    metrics at ``/metrics`` (serve.py) — see docs/training.md and docs/serving.md.
"""

from __future__ import annotations

import logging
import os
import sys

LEVEL_ENV = "DYNRULES_LOG_LEVEL"
DEFAULT_LEVEL = "INFO"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
OTHERS_LEVEL = logging.WARNING  # every logger not under ``dynrules``
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_configured: dict[str, str] = {}


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (as ``logging.lastResort``
    does), so a swapped stderr (click's test runner, pytest's capture) is honoured and a closed
    one is never written to."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def log_level(level: str | None = None) -> str:
    """The ``dynrules`` log level's name: ``level``, else the one :func:`configure_logging` set
    (the CLI's ``--log-level``, which already took ``$DYNRULES_LOG_LEVEL`` into account), else
    ``$DYNRULES_LOG_LEVEL``, else INFO."""
    return _checked(level or _configured.get("level") or _from_env())


def _from_env() -> str:
    return os.environ.get(LEVEL_ENV) or DEFAULT_LEVEL


def _checked(name: str) -> str:
    name = name.upper()
    if name not in LEVELS:
        raise ValueError(f"log level {name!r}: one of {', '.join(LEVELS)}")
    return name


def configure_logging(level: str | None = None) -> str:
    """The CLI's logging (once per process; a later call only changes the level): one stderr
    handler on the root logger, ``dynrules.*`` at ``level`` (see :func:`log_level`), others at
    WARNING. ``level`` None: ``$DYNRULES_LOG_LEVEL``, else INFO (not an earlier call's level).
    Returns the level's name."""
    name = _checked(level or _from_env())
    root = logging.getLogger()
    if not any(isinstance(handler, _StderrHandler) for handler in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(OTHERS_LEVEL)
    logging.getLogger("dynrules").setLevel(name)
    _configured["level"] = name
    return name


def progress_bar(*, progress: bool, **kwargs):
    """A tqdm bar on stderr; disabled unless ``progress`` and stderr is a terminal (tqdm's
    ``disable=None``). ``kwargs`` go to tqdm (total, desc, unit, initial, …)."""
    from tqdm import tqdm

    return tqdm(file=sys.stderr, disable=None if progress else True, **kwargs)
