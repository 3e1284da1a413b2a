"""The ``pgt`` command line. Subcommands are registered by the modules that own them."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("pgt: not yet wired", file=sys.stderr)
    return 2
