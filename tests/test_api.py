"""The public API resolves, and the NumPy-side modules never import JAX at import time."""

import subprocess
import sys

import dynrules


def test_every_export_resolves():
    for name in dynrules.__all__:
        assert getattr(dynrules, name) is not None


def test_cli_and_engine_do_not_import_jax():
    modules = [
        "dynrules.cli",
        "dynrules.engine.store",
        "dynrules.engine.select",
        "dynrules.engine.ingest",
        "dynrules.engine.mi",
        "dynrules.engine.ablate",
        "dynrules.engine.judges.runner",
        "dynrules.engine.judges.embedded",
        "dynrules.kernels.selection",
        "dynrules.kernels.attention",
    ]
    code = (
        "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('jax' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
