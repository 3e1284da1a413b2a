"""The ``pgt`` command line.

Each subcommand is a thin wrapper over a job in ``workflows/`` or a library function;
its options are documented here once and in ``docs/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import PgtError


def _cmd_synth(args: argparse.Namespace) -> int:
    from stages.synthesis.generate import generate
    from stages.synthesis.presets import get_preset

    ids = generate(get_preset(args.preset), args.subjects, args.seed, Path(args.out), progress=not args.quiet)
    print(f"wrote {len(ids)} subject(s) to {Path(args.out) / 'captures'} (truth in {Path(args.out) / 'ground_truth'})")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from storage.validate import summarize_capture, validate_capture

    problems = validate_capture(Path(args.capture), deep=not args.shallow)
    if problems:
        print(f"{args.capture}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(summarize_capture(Path(args.capture)))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from workflows.demo import run_demo

    return run_demo(Path(args.out), preset=args.preset, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgt", description="HMC pseudo-ground-truth labelling pipeline")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic subjects in the capture format, with ground truth")
    p.add_argument("--preset", default="tiny", help="tiny (tests, seconds) or standard (benchmarks)")
    p.add_argument("--subjects", type=int, default=1, help="number of subjects")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    p.add_argument("--out", required=True, help="output folder (captures/ and ground_truth/ inside)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("validate", help="check a capture folder; exit status 1 lists the problems")
    p.add_argument("capture", help="a subject's capture folder")
    p.add_argument("--shallow", action="store_true", help="check structure and headers, do not decode images")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("demo", help="synthesize a subject and run the chain end to end on it")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--preset", default="tiny", help="synthetic preset")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PgtError as exc:
        print(f"pgt {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
