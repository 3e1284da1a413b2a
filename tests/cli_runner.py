"""Running the ``pgt`` CLI in the test process."""

from __future__ import annotations

import contextlib
import io

from tests.conftest import QUICK_SETTINGS
from workflows.cli import main

#: ``pgt`` flags of a quick run (see ``QUICK_SETTINGS``).
QUICK_RUN = tuple(flag for key, value in QUICK_SETTINGS.items() for flag in ("--set", f"{key}={value}"))


def run_pgt(*args: str) -> str:
    """Runs ``pgt ARGS`` in this process; returns its standard output (exit status 0)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    assert code == 0, out.getvalue()
    return out.getvalue()
