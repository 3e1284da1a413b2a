"""Subprocess entry of the crash tests: ``python -m tests.dag_runner OUT CAPTURE...``."""

from __future__ import annotations

import argparse
import sys

from pipeline.dag import run_chain
from tests.dag_stages import DagTestConfig, build_chain


def main(argv: list[str] | None = None) -> int:
    """Runs the test chain once; exit code 0 when every unit succeeded."""
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("captures", nargs="+")
    ap.add_argument("--processes", action="store_true", help="worker processes, not threads")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    summary = run_chain(args.captures, args.out, DagTestConfig(), chain=build_chain(),
                        workers=args.workers, processes=args.processes, progress=False,
                        report=False)
    print(summary.counts)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
