"""Running the ``pgt`` CLI in the test process."""

from __future__ import annotations

import contextlib
import io

from tests.conftest import QUICK_RIG_ITERATIONS
from workflows.cli import main

#: ``pgt`` flags of a run whose ``rig`` stage stops early (see ``QUICK_RIG_ITERATIONS``).
QUICK_RIG = ("--set", f"rig.max_iterations={QUICK_RIG_ITERATIONS}")


def run_pgt(*args: str) -> str:
    """Runs ``pgt ARGS`` in this process; returns its standard output (exit status 0)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    assert code == 0, out.getvalue()
    return out.getvalue()
