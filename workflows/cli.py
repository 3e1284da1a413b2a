"""The ``pgt`` command line.

Each subcommand is a thin wrapper over a job in ``workflows/`` or a library function;
its options are documented here once and in ``docs/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import storage_options
from pipeline.errors import PgtError, printable


def _cmd_synth(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from stages.synthesis.generate import generate
    from stages.synthesis.presets import get_preset
    from stages.synthesis.variants import get_variant

    config = get_preset(args.preset)
    options = {"phone_only": args.phone_only, "phone_yaw_deg": args.phone_yaw_deg, "phone_pitch_deg": args.phone_pitch_deg,
               "variant": args.variant}
    config = replace(config, **{k: v for k, v in options.items() if v is not None and v is not False})
    get_variant(config.variant)  # an unknown name fails here, before any subject is drawn
    ids = generate(config, args.subjects, args.seed, Path(args.out), progress=not args.quiet, workers=args.workers)
    print(f"wrote {len(ids)} subject(s) to {Path(args.out) / 'captures'} (truth in {Path(args.out) / 'ground_truth'})")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from rigs.definition import load_default_rig_definition, load_rig_definition
    from storage.validate import summarize_capture, validate_capture

    rig = load_rig_definition(args.rig_definition) if args.rig_definition else load_default_rig_definition()
    problems = validate_capture(Path(args.capture), deep=not args.shallow, prompts={p.name for p in rig.prompts})
    if problems:
        print(f"{printable(args.capture)}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(summarize_capture(Path(args.capture)))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from workflows.demo import run_demo

    return run_demo(Path(args.out), preset=args.preset, seed=args.seed, workers=args.workers)


def _run_config(args: argparse.Namespace):
    """The run config with the ``--set`` overrides, checked (a bad one is a usage error)."""
    from pipeline.config import validate_config, with_overrides
    from pipeline.errors import ConfigError
    from workflows.config import RunConfig

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects section.field=VALUE, got {item!r}")
        overrides[key] = value
    config = with_overrides(RunConfig(), overrides)
    validate_config(config)
    return config


def _run_options(args: argparse.Namespace) -> dict:
    return {"workers": args.workers, "scheduler_address": args.scheduler, "retries": args.retries,
            "progress": not args.quiet, "storage_options": storage_options.from_args(args)}


def _print_summary(summary) -> int:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items()))
    print(f"run {summary.run_id}: {counts}")
    for f in summary.failures:
        print(f"  failed: {f.subject} / {f.stage}: {f.error_type}: {f.message}")
    print(f"run folder: {summary.run_dir}")
    return 0 if summary.ok else 1


def _cmd_label(args: argparse.Namespace) -> int:
    from workflows.label import label_subject

    return _print_summary(label_subject(args.capture, args.out, args.config, **_run_options(args)))


def _cmd_backfill(args: argparse.Namespace) -> int:
    from workflows.label import backfill

    return _print_summary(backfill(args.captures, args.out, args.config, **_run_options(args)))


def _cmd_status(args: argparse.Namespace) -> int:
    from pipeline.status import status

    report = status(args.out, storage_options=storage_options.from_args(args),
                    rejections=args.rejections != "none")
    print(report.to_text(args.rejections))
    return 0


def _cmd_metrics(args: argparse.Namespace) -> int:
    from workflows.metrics import MetricsJob, format_summary, run_metrics

    job = MetricsJob(
        labels=args.labels, captures=args.captures, out=args.out or "", truth=args.truth or "",
        rig_dir=args.rigs or "", rig_run=args.run or "", label_source=args.source or "", label_round=args.round,
        storage_options=storage_options.from_args(args),
    )
    print(format_summary(run_metrics(job)))
    return 0


def _weights(text: str) -> dict[str, float]:
    """"lips=1,jaw=0.5" -> {"lips": 1.0, "jaw": 0.5}."""
    from pipeline.errors import ConfigError

    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value) if sep else 1.0
        except ValueError as exc:
            raise ConfigError(f"--weights expects REGION=NUMBER,..., got {item!r}") from exc
    return out


def _cmd_placement(args: argparse.Namespace) -> int:
    from stages.placement.population import PopulationConfig
    from stages.placement.scoring import ScoreConfig
    from stages.placement.search import SearchConfig
    from workflows.placement import PlacementJob, run_placement

    job = PlacementJob(
        rigs=args.rigs, out=args.out,
        population=PopulationConfig(
            identities=args.identities, expressions=args.expressions, max_expressions=args.max_expressions,
            donnings=args.donnings, donning_translation_mm=args.donning_mm, donning_rotation_deg=args.donning_deg,
            seed=args.seed),
        scoring=ScoreConfig(occlusion=not args.no_occlusion),
        samples_per_region=args.samples, pictures=not args.no_pictures,
        search_camera=args.search or "",
        search=SearchConfig(box_mm=args.search_box_mm, cone_deg=args.search_cone_deg,
                            max_evaluations=args.search_evaluations, weights=_weights(args.weights or "")),
        search_population=PopulationConfig(identities=args.search_identities, max_expressions=12, donnings=3, seed=1),
    )
    run_placement(job)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from workflows.dashboard.report import report_from_args

    return report_from_args(args)


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from workflows.dashboard.serve import dashboard_from_args

    return dashboard_from_args(args)


def _add_dashboard_sources(p: argparse.ArgumentParser) -> None:
    """The tables and folders the QA views read (docs/qa-report.md)."""
    p.add_argument("out", help="output root of label/backfill (runs, artifacts, tables)")
    p.add_argument("--labels", help="label table (default: OUT/tables/labels)")
    p.add_argument("--metrics", help="metrics table of `pgt metrics` (default: beside the label table)")
    p.add_argument("--trivial-metrics", help="the trivial labellers' metrics table (default: beside the metrics table)")
    p.add_argument("--captures", help="folder of capture folders (segments, HMC images; default: the paths the run recorded)")
    p.add_argument("--truth", help="synthetic ground_truth/ folder: true curves, true landmarks, phone pictures")
    storage_options.add_storage_option_argument(p)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    from pipeline.config import config_options
    from workflows.config import RunConfig

    p.add_argument("--out", required=True, help="output root (artifacts, tables, runs)")
    p.add_argument("--workers", type=int, help="embedded LocalCluster workers (default: fits the machine)")
    p.add_argument("--scheduler", help="address of an existing Dask scheduler to use instead")
    p.add_argument("--retries", type=int, default=1, help="extra attempts of a failing stage")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    storage_options.add_storage_option_argument(p)
    names = ", ".join(config_options(RunConfig))
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help=f"config override (checked before anything runs; a bad one exits with status 2); one of: {names}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgt", description="HMC pseudo-ground-truth labelling pipeline")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic subjects in the capture format, with ground truth")
    p.add_argument("--preset", default="tiny", help="tiny (tests, seconds) or standard (benchmarks)")
    p.add_argument("--subjects", type=int, default=1, help="number of subjects")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    p.add_argument("--out", required=True, help="output folder (captures/ and ground_truth/ inside)")
    p.add_argument("--workers", type=int, default=1, help="subjects generated in parallel processes")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--phone-only", action="store_true",
                   help="the phone part in full, and one minimal 64 x 64 HMC recording instead of the preset's (keeps the capture valid; minutes instead of tens of minutes)")
    p.add_argument("--phone-yaw-deg", type=float, metavar="DEG",
                   help="phone burst head turn: camera yaw uniform in +-DEG around the face (default 18)")
    p.add_argument("--phone-pitch-deg", type=float, metavar="DEG",
                   help="phone burst head turn: camera pitch uniform in +-DEG (default 10)")
    p.add_argument("--variant", metavar="NAME",
                   help="generator variant, 'default' or 'alt': 'alt' changes IR shading, sensor noise, headset slip, identity distribution and keypoint errors (docs/synthetic-data.md)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("validate", help="check a capture folder; exit status 1 lists the problems")
    p.add_argument("capture", help="a subject's capture folder")
    p.add_argument("--shallow", action="store_true", help="check structure and headers, do not decode images")
    p.add_argument("--rig-definition", help="rig definition JSON whose prompts peak segments may name (default: the embedded one)")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("demo", help="synthesize a subject and run the chain end to end on it")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--preset", default="tiny", help="synthetic preset")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--workers", type=int, help="embedded LocalCluster workers")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("label", help="run the chain on one subject's capture")
    p.add_argument("capture", help="the subject's capture folder")
    _add_run_options(p)
    p.set_defaults(func=_cmd_label)

    p = sub.add_parser("backfill", help="run the chain on every capture under a root (or in a listing file)")
    p.add_argument("captures", help="folder of capture folders, or a text file listing capture paths")
    _add_run_options(p)
    p.set_defaults(func=_cmd_backfill)

    p = sub.add_parser("status", help="done, failed and pending work of an output root")
    p.add_argument("out", help="output root of label/backfill")
    p.add_argument("--rejections", choices=("summary", "all", "none"), default="summary",
                   help="records that done stages left out (frames without a face, expressions "
                        "not fused...): counts per stage and reason (summary), every record (all), "
                        "or skip reading them (none: one small read less per done unit)")
    storage_options.add_storage_option_argument(p)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("metrics", help="print and write the SPEC §5 metrics of a label table")
    p.add_argument("labels", help="label table (Delta) path or URL")
    p.add_argument("--captures", required=True, help="folder of the subjects' capture folders (segments, fps)")
    p.add_argument("--truth", help="synthetic ground_truth/ folder: adds the SPEC §5.2 metrics")
    rigs = p.add_mutually_exclusive_group()
    rigs.add_argument("--rigs", help="folder of the labelled rigs <subject>.npz (Mouth Closure's lip gap, expression-mesh error); without it (and without --run) the truth folder's true rigs are used; never the generic rig")
    rigs.add_argument("--run", help="output root of the pgt label/backfill run that made the labels: each subject's personal rig is read from its rig stage (no export needed)")
    p.add_argument("--out", help="metrics table (default: next to the label table)")
    p.add_argument("--source", help="only this label_source")
    p.add_argument("--round", type=int, default=-1, help="only this label_round")
    storage_options.add_storage_option_argument(p)
    p.set_defaults(func=_cmd_metrics)
    p = sub.add_parser("placement", help="score headset camera rigs over a population of faces (REFA visibility and range of motion); compare rigs; search a camera's pose")
    p.add_argument("rigs", nargs="+", help="placement rig files: hmc rig.json plus an optional 'placement' object (rigs/data/placement/*.json; docs/camera-placement.md); the first is the comparison's reference")
    p.add_argument("--out", required=True, help="output folder (tables, comparison, pictures, placement.json)")
    p.add_argument("--identities", type=int, default=20, help="identities drawn from the face model's identity space (the first is the mean face)")
    p.add_argument("--expressions", choices=("prompts", "blendshapes"), default="prompts",
                   help="the prompts' art priors (59 expressions) or each blendshape alone at 1 (53)")
    p.add_argument("--max-expressions", type=int, default=0, help="keep only the first N expressions (0 = all)")
    p.add_argument("--donnings", type=int, default=5, help="donning offsets per face, the first nominal")
    p.add_argument("--donning-mm", type=float, default=3.0, help="std of each axis of a donning translation, mm")
    p.add_argument("--donning-deg", type=float, default=2.0, help="std of a donning's yaw, pitch and roll, degrees")
    p.add_argument("--seed", type=int, default=0, help="seed of the identity and donning draws")
    p.add_argument("--samples", type=int, default=64, help="sample points (keypoints) per region")
    p.add_argument("--no-occlusion", action="store_true", help="skip ray casting (V occ then only checks field of view and facing)")
    p.add_argument("--no-pictures", action="store_true", help="skip the heat-map pictures")
    p.add_argument("--search", metavar="CAMERA", help="also search a better pose for this camera of the first rig")
    p.add_argument("--search-box-mm", type=float, default=10.0, help="feasible box half-width per headset axis, mm")
    p.add_argument("--search-cone-deg", type=float, default=15.0, help="feasible cone half-angle around the start's axis, degrees")
    p.add_argument("--search-evaluations", type=int, default=60, help="most objective evaluations of the search")
    p.add_argument("--search-identities", type=int, default=6,
                   help="identities the search optimises over (x the first 12 expressions x 3 donnings, seed 1); the result is rescored on the main population")
    p.add_argument("--weights", metavar="REGION=W,...", help="search weights over regions (default: the camera's target regions, equally)")
    p.set_defaults(func=_cmd_placement)

    p = sub.add_parser("report", help="write the QA report: one self-contained offline HTML file")
    _add_dashboard_sources(p)
    p.add_argument("--html", help="the HTML file to write (default: OUT/qa/report.html)")
    p.add_argument("--max-recordings", type=int, default=12,
                   help="recordings (worst first) whose curves and frame pictures are embedded")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("dashboard", help="serve the QA views on localhost; they refresh as the tables gain versions")
    _add_dashboard_sources(p)
    p.add_argument("--port", type=int, default=5006, help="port on 127.0.0.1")
    p.add_argument("--refresh", type=float, default=5.0, help="seconds between checks of the tables' versions")
    p.set_defaults(func=_cmd_dashboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "set"):  # a bad config is a usage error: exit 2 before anything runs
        try:
            args.config = _run_config(args)
        except PgtError as exc:
            print(f"pgt {args.command}: error: {exc}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except PgtError as exc:
        print(f"pgt {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
