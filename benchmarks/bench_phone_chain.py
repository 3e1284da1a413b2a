"""The phone-scan geometry chain (issue 7) on `standard` subjects, against their truth.

Data (phone-only subjects: the `standard` phone part, 60 prompts x 4 frames at 480 x 640,
and one minimal HMC recording; a few minutes per subject instead of ~23)::

    pgt synth --preset standard --phone-only --subjects 3 --seed 1000 --out DATA
    pgt synth --preset standard --phone-only --subjects 3 --seed 2000 \\
        --phone-yaw-deg 40 --phone-pitch-deg 20 --out TURNS        # ablation 1

Run::

    python -m benchmarks.bench_phone_chain --data DATA --turns TURNS --out WORK
    python -m benchmarks.bench_phone_chain --data DATA --out WORK --only fusion --subjects 1 --no-ablations

The chain runs in-process through the engine (:func:`pipeline.dag.run_chain`, the
product's `workflows.chain.default_chain()`, 2 worker processes) on all subjects at once;
seconds per stage come from the run's stage log (each unit's stage function plus commit),
medians over the subjects. Then every artifact is scored by :mod:`stages.geometry_eval`
on the face region, and the two ablations run (up to the fit stage only):

1. ``fit.landmark_init=false`` against the default, on bursts with large head turns;
2. with the face mask's depth-edge test off (``face_mask.edge_rel_threshold=1000``: flying
   pixels at the silhouette stay in the scans), ``fit.distance_loss="l2"`` against the
   default robust term.

Writes ``benchmarks/results/phone_chain.json`` (``--results`` to change); rerun
``python -m benchmarks.report`` for docs/benchmarks.md. Reruns over the same ``--out``
reuse the engine's cached artifacts (delete it for fresh timings).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results" / "phone_chain.json"
PHONE_STAGES = ("validate", "landmarks", "face_mask", "fusion", "fit", "refine", "texture")
#: The issue's targets: (key, figure, target text, predicate on the measured value).
TARGETS = (
    ("fused_scan_median_mm", "fused scan, scan-to-true-surface distance, median (mm)", "<= 0.5", lambda v: v <= 0.5),
    ("neutral_now_median_mm", "fitted + refined neutral, NoW protocol, median (mm)", "<= 0.5", lambda v: v <= 0.5),
    ("neutral_vertex_median_mm", "per-vertex error vs the true mesh, neutral, median (mm)", "<= 1.0", lambda v: v <= 1.0),
    ("expressions_vertex_mean_mm", "per-vertex error vs the true mesh, all expressions, mean (mm)", "<= 1.5", lambda v: v <= 1.5),
    ("refinement_gain", "Laplacian refinement: per-vertex error lower than the fit alone by", ">= 25 %", lambda v: v >= 0.25),
    ("wall_per_subject_s", "phone chain per standard subject, 2 cores, wall (s)", "<= 180", lambda v: v <= 180),
)
#: The face mask's depth-edge test off: no 3 x 3 window spans 1000 times its depth.
NO_EDGE_TEST = {"face_mask.edge_rel_threshold": "1000"}


def process_cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its finished children: the worker
    processes a stage starts (``fusion.workers``) are waited for before it returns."""
    import resource

    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + child.ru_utime + child.ru_stime


class CpuTimed:
    """A stage function that also appends its wall and CPU seconds to a JSONL file.

    The engine's stage log has wall seconds only; on a machine shared with other jobs the
    process CPU time (all threads of the worker process, which runs one unit at a time,
    and the processes it starts) is the steadier figure. The key of a unit does not depend on its function, so the timed
    chain shares the product chain's cached artifacts.
    """

    def __init__(self, fn, stage: str, log: str) -> None:
        self.fn, self.stage, self.log = fn, stage, log

    def __call__(self, *args, **kwargs):
        t0, c0 = time.perf_counter(), process_cpu_seconds()
        out = self.fn(*args, **kwargs)
        line = {"stage": self.stage, "subject": Path(str(args[0])).name if args else None,
                "wall_s": time.perf_counter() - t0, "cpu_s": process_cpu_seconds() - c0}
        with open(self.log, "a") as f:
            f.write(json.dumps(line) + "\n")
        return out


def chain_until(last: str | None, cpu_log: Path | None = None):
    """The product chain, cut after stage ``last`` (all of it when None); with ``cpu_log``,
    each stage function wrapped in :class:`CpuTimed`."""
    from dataclasses import replace

    from pipeline.errors import ConfigError
    from pipeline.stage import Chain
    from workflows.chain import default_chain

    stages = list(default_chain())
    names = [s.name for s in stages]
    if last is not None:
        if last not in names:
            raise ConfigError(f"--only {last}: the chain has no such stage (it has {', '.join(names)})")
        stages = stages[: names.index(last) + 1]
    if cpu_log is not None:
        stages = [replace(s, fn=CpuTimed(s.fn, s.name, str(cpu_log))) for s in stages]
    return Chain(tuple(stages))


def cpu_seconds(cpu_log: Path) -> dict[str, dict[str, float]]:
    """``{stage: {subject: cpu seconds}}`` from a :class:`CpuTimed` log, the latest line of
    each (stage, subject): runs into one output root with one config add to one log."""
    out: dict[str, dict[str, float]] = {}
    if cpu_log.is_file():
        with open(cpu_log) as f:
            for line in f:
                d = json.loads(line)
                out.setdefault(d["stage"], {})[d["subject"]] = d["cpu_s"]
    return out


def stage_seconds(out: str, keys: dict[str, str]) -> dict[str, dict[str, float]]:
    """``{stage: {subject: seconds}}`` of the units ``keys`` names (``"stage/subject"`` ->
    key), from every run's stage log in ``out``: a unit cached now reports the seconds of
    the run that made it (the latest ``finish`` of that key)."""
    from pipeline.runlog import read_stage_log

    seconds: dict[str, dict[str, float]] = {}
    for e in read_stage_log(out):
        if e.get("event") == "finish" and keys.get(f"{e['stage']}/{e['subject']}") == e.get("key"):
            seconds.setdefault(e["stage"], {})[e["subject"]] = float(e["seconds"])
    return seconds


def run_variant(captures: list[Path], out: Path, overrides: dict[str, str], chain, workers: int) -> dict[str, Any]:
    """One engine run; returns the summary's essentials, the per-unit seconds and keys."""
    from pipeline.config import with_overrides
    from pipeline.dag import run_chain
    from workflows.config import RunConfig

    config = with_overrides(RunConfig(), overrides)
    t0 = time.perf_counter()
    summary = run_chain(captures, str(out), config, chain=chain, workers=workers, progress=False, report=False)
    wall = time.perf_counter() - t0
    keys = {f"{stage}/{subject}": key for (stage, subject), key in summary.keys.items()}
    return {
        "overrides": overrides, "wall_s": wall, "counts": summary.counts,
        "failures": [f"{f.subject}/{f.stage}: {f.error_type}: {f.message}"[:500] for f in summary.failures],
        "seconds": stage_seconds(str(out), keys), "keys": keys,
    }


def load_outputs(out: Path, run: dict, subject: str, stages: tuple[str, ...]) -> dict[str, Any]:
    """The committed artifacts of ``stages`` for one subject (absent ones skipped)."""
    from pipeline.artifacts import ArtifactStore
    from pipeline.runlog import OutputLayout

    store = ArtifactStore(OutputLayout(str(out)).artifacts)
    found = {}
    for stage in stages:
        key = run["keys"].get(f"{stage}/{subject}")
        if key and store.is_committed(stage, key):
            found[stage] = store.load(stage, key)
    return found


def evaluate(out: Path, run: dict, subject: str, truth_root: Path) -> dict[str, Any]:
    """geometry_eval's records for one subject, plus the stages' own rejection records."""
    from stages.fusion import FusedScans
    from stages.geometry_eval import evaluate_subject
    from stages.synthesis.truth import SubjectTruth

    outputs = load_outputs(out, run, subject, ("fusion", "fit", "refine", "texture"))
    if "fusion" not in outputs:
        return {"error": "no fusion artifact"}
    fused = FusedScans.from_output(outputs["fusion"])
    result = evaluate_subject(SubjectTruth.open(truth_root / subject), fused, outputs.get("fit"), outputs.get("refine"))
    result["fusion_rejected"] = {e: f.reason for e, f in fused.expressions.items() if not f.ok}
    for stage in ("fit", "refine"):
        if stage in outputs:
            result[f"{stage}_rejected"] = dict(outputs[stage].meta.get("rejected", {}))
            rows = outputs[stage].tables.get("rows")
            result[f"{stage}_rows"] = rows.to_pylist() if rows is not None else []
    if "texture" in outputs:
        result["texture_meta"] = {k: v for k, v in outputs["texture"].meta.items() if np.isscalar(v)}
    return result


def probe_poisson_depth(out: Path, run: dict, capture: Path, truth_root: Path, n: int,
                        depths: tuple[int, ...] = (8, 9)) -> list[dict]:
    """Fusion's cost and accuracy against its Poisson octree depth, in the driver process:
    the first ``n`` expressions of one subject fused again from the run's landmark and
    mask artifacts at each depth (CPU seconds, vertices, scan-to-true-surface distance)."""
    from dataclasses import replace

    from stages.face_mask import RefinedMasks
    from stages.fusion import FusionConfig, fuse_expression
    from stages.geometry_eval import face_region, face_region_triangles, fused_scan_error
    from stages.synthesis.truth import SubjectTruth
    from storage.capture import Capture

    outputs = load_outputs(out, run, capture.name, ("landmarks", "face_mask"))
    if len(outputs) < 2:
        return []
    cap, truth = Capture.open(capture), SubjectTruth.open(truth_root / capture.name)
    masks = RefinedMasks.from_output(outputs["face_mask"])
    model = truth.rig.model
    region_tri = face_region_triangles(model.triangles, face_region(model))
    ex = truth.expressions()
    prompts = [str(p) for p in ex["prompts"]]
    rows = []
    for e in cap.phone_expressions[:n]:
        frames = range(cap.phone_frame_count(e))
        depth = [cap.read_phone_frame(e, i).depth_mm for i in frames]
        m = masks.expressions[e]
        for d in depths:
            t0, c0 = time.perf_counter(), time.process_time()
            f = fuse_expression(depth, [m.mask(i) for i in frames], [outputs["landmarks"].arrays[f"points_{e}"][i] for i in frames],
                                cap.phone_intrinsics(e), replace(FusionConfig(), poisson_depth=d), expression=e)
            row = {"expression": e, "poisson_depth": d, "wall_s": time.perf_counter() - t0,
                   "cpu_s": time.process_time() - c0, "vertices": len(f.vertices)}
            if f.ok:
                s = fused_scan_error(f.vertices, ex["vertices"][prompts.index(e)],
                                     truth.phone(e)["head_in_camera"][f.reference], model.triangles, region_tri)
                row.update(median_mm=s.median_mm, p90_mm=s.p90_mm)
            rows.append(row)
            print(f"[poisson probe] {row}", flush=True)
    return rows


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def headline(evals: dict[str, dict], wall_per_subject: float | None) -> dict[str, float | None]:
    """The issue's figures over subjects (see the module docstring of stages/geometry_eval).

    fused scan: median over every fused expression of every subject of its median distance;
    neutral figures: median over subjects; expressions: mean over every refined expression
    of every subject of its mean per-vertex error (rigid); refinement gain: 1 - that mean for
    refine / the same mean for fit, over the expressions both have.
    """
    ok = [e for e in evals.values() if "error" not in e]
    fused = [r["median_mm"] for e in ok for r in e["fusion"]]
    now = [e["neutral"]["refine"]["now_median_mm"] for e in ok if "refine" in e["neutral"]]
    vert = [e["neutral"]["refine"]["rigid_median_mm"] for e in ok if "refine" in e["neutral"]]
    refined = [r for e in ok for r in e["refine"]]
    fit_by = {(sid, r["expression"]): r["rigid_mean_mm"] for sid, e in evals.items() if "error" not in e for r in e["fit"]}
    pairs = [(r["rigid_mean_mm"], fit_by[(sid, r["expression"])]) for sid, e in evals.items() if "error" not in e
             for r in e["refine"] if (sid, r["expression"]) in fit_by]
    from stages.geometry_eval import refinement_gain

    return {
        "fused_scan_median_mm": float(np.median(fused)) if fused else None,
        "neutral_now_median_mm": float(np.median(now)) if now else None,
        "neutral_vertex_median_mm": float(np.median(vert)) if vert else None,
        "expressions_vertex_mean_mm": _mean(refined, "rigid_mean_mm"),
        "refinement_gain": refinement_gain(np.mean([p[0] for p in pairs]), np.mean([p[1] for p in pairs])) if pairs else None,
        "wall_per_subject_s": wall_per_subject,
        "floor_neutral_median_mm": float(np.median([e["floor"]["neutral"]["median_mm"] for e in ok])) if ok else None,
        "floor_expressions_mean_mm": float(np.mean([r["mean_mm"] for e in ok for r in e["floor"]["expressions"]])) if ok else None,
        "expressions_refined": len(refined),
        "expressions_fused": len(fused),
    }


#: Figures with a floor: the error the best fit inside the model's linear spaces leaves.
FLOORS = {"neutral_vertex_median_mm": "floor_neutral_median_mm", "expressions_vertex_mean_mm": "floor_expressions_mean_mm"}


def figures_table(values: dict[str, float | None]) -> list[dict]:
    return [{"key": k, "figure": f, "target": t, "measured": values.get(k), "floor": values.get(FLOORS.get(k, "")),
             "met": None if values.get(k) is None else bool(ok(values[k]))} for k, f, t, ok in TARGETS]


def fit_summary(evals: dict[str, dict]) -> dict[str, float | int | None]:
    """A fit variant's scores: mean per-vertex error (rigid, as estimated), NoW of the neutral."""
    ok = [e for e in evals.values() if "error" not in e]
    rows = [r for e in ok for r in e["fit"]]
    now = [e["neutral"]["fit"]["now_median_mm"] for e in ok if "fit" in e["neutral"]]
    worst = max((r["rigid_mean_mm"] for r in rows), default=None)
    return {"expressions_fitted": len(rows), "rejected": sum(len(e.get("fit_rejected", {})) for e in ok),
            "rigid_mean_mm": _mean(rows, "rigid_mean_mm"), "estimated_mean_mm": _mean(rows, "estimated_mean_mm"),
            "worst_expression_rigid_mean_mm": worst,
            "expressions_over_3mm": sum(r["rigid_mean_mm"] > 3.0 for r in rows),
            "neutral_fit_now_median_mm": float(np.median(now)) if now else None}


def ablation(name: str, data: Path, out: Path, variants: dict[str, dict[str, str]], n: int, workers: int,
             common: dict[str, str], last: str = "fit") -> dict:
    """Runs each variant (chain up to ``last``, normally ``fit``) on ``n`` subjects of
    ``data`` into one output root (so unchanged upstream stages are shared), and scores
    each variant's fit. With ``last`` before ``fit`` only the shared upstream stages run
    (to fill the cache ahead of a later full run)."""
    from pipeline.errors import PgtError

    captures = sorted(p for p in (data / "captures").iterdir() if p.is_dir())[:n]
    result: dict[str, Any] = {"data": str(data), "subjects": [c.name for c in captures], "common": common, "variants": {}}
    try:
        chain = chain_until(last)
    except PgtError as exc:
        return {**result, "skipped": str(exc)}
    if "fit" not in [s.name for s in chain]:
        run = run_variant(captures, out / name, common, chain, workers)
        return {**result, "skipped": f"upstream stages only ({' -> '.join(s.name for s in chain)}): {run['counts']}"}
    for label, overrides in variants.items():
        try:
            run = run_variant(captures, out / name, {**common, **overrides}, chain, workers)
        except PgtError as exc:
            result["variants"][label] = {"overrides": overrides, "skipped": str(exc)}
            continue
        evals = {c.name: evaluate(out / name, run, c.name, data / "ground_truth") for c in captures}
        result["variants"][label] = {"overrides": overrides, "failures": run["failures"],
                                     "fit_seconds": run["seconds"].get("fit", {}), **fit_summary(evals)}
        print(f"[{name}] {label}: {result['variants'][label]}", flush=True)
    return result


def _stage_medians(seconds: dict[str, dict[str, float]]) -> dict[str, dict]:
    return {st: {"median_s": statistics.median(v.values()), "per_subject_s": v} for st, v in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="folder with captures/ and ground_truth/ (phone-only standard subjects)")
    p.add_argument("--turns", type=Path, help="the same, made with large head turns (ablation 1); default: --data")
    p.add_argument("--out", required=True, type=Path, help="work folder for the engine's outputs")
    p.add_argument("--subjects", type=int, default=3, help="subjects of --data to run")
    p.add_argument("--only", choices=PHONE_STAGES, help="run the chain up to this stage only")
    p.add_argument("--workers", type=int, default=2, help="engine worker processes")
    p.add_argument("--ablation-subjects", type=int, default=3, help="subjects per ablation")
    p.add_argument("--no-ablations", action="store_true", help="skip the two ablations")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config override for every run (default: the product's config)")
    p.add_argument("--ablation-set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config override for the ablation runs only (both variants of each)")
    p.add_argument("--results", type=Path, default=RESULTS, help="result JSON to write")
    p.add_argument("--probe-expressions", type=int, default=3,
                   help="expressions of the first subject re-fused at Poisson depth 8 and 9 (cost vs accuracy); 0 = skip")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # the driver only scores; the workers run the stages
    captures = sorted(c for c in (args.data / "captures").iterdir() if c.is_dir())[: args.subjects]
    (args.out / "main").mkdir(parents=True, exist_ok=True)
    cpu_log = (args.out / "main" / "cpu-times.jsonl").resolve()
    chain = chain_until(args.only, cpu_log)
    stages = tuple(s.name for s in chain)
    print(f"chain: {' -> '.join(stages)} on {len(captures)} subject(s)", flush=True)
    common = _overrides(args.set)
    load0 = os.getloadavg()
    run = run_variant(captures, args.out / "main", common, chain, args.workers)
    print(f"ran in {run['wall_s']:.0f} s: {run['counts']} {run['failures']}", flush=True)
    evals = {c.name: evaluate(args.out / "main", run, c.name, args.data / "ground_truth") for c in captures}
    # Per subject: its stages run one after the other in one worker process (the other
    # worker takes another subject), so its wall time is the sum of its stages' (cached
    # stages count with the seconds of the run that made them).
    chain_s = {c.name: sum(v.get(c.name, 0.0) for v in run["seconds"].values()) for c in captures}
    complete = all(len(run["seconds"].get(st, {})) == len(captures) for st in stages)
    values = headline(evals, statistics.median(chain_s.values()) if complete else None)
    result: dict[str, Any] = {
        "command": "python -m benchmarks.bench_phone_chain " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "load_avg_start": load0, "load_avg_end": os.getloadavg()},
        "data": str(args.data), "subjects": [c.name for c in captures], "stages": list(stages),
        "workers": args.workers, "overrides": common, "wall_s": run["wall_s"], "counts": run["counts"], "failures": run["failures"],
        "seconds_per_stage": _stage_medians(run["seconds"]), "chain_seconds_per_subject": chain_s,
        "cpu_seconds_per_stage": _stage_medians({st: {c.name: v[c.name] for c in captures if c.name in v}
                                                 for st, v in cpu_seconds(cpu_log).items() if st in stages}),
        "headline": values, "figures": figures_table(values), "per_subject": evals,
    }
    if args.probe_expressions and "fusion" in stages:
        result["poisson_probe"] = probe_poisson_depth(args.out / "main", run, captures[0], args.data / "ground_truth",
                                                      args.probe_expressions)
    if not args.no_ablations:
        n, last = args.ablation_subjects, "fit" if args.only in (None, "fit", "refine", "texture") else args.only
        ab_common = {**common, **_overrides(args.ablation_set)}
        result["ablations"] = {
            "landmark_init": ablation("turns", args.turns or args.data, args.out, {
                "default (landmark init)": {}, "no landmark init": {"fit.landmark_init": "false"}},
                n, args.workers, ab_common, last),
            "l2_flying_pixels": ablation("flying", args.data, args.out, {
                "robust, flying pixels": {}, "L2, flying pixels": {"fit.distance_loss": "l2"}},
                n, args.workers, {**ab_common, **NO_EDGE_TEST}, last),
        }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(_rounded(result), indent=1, default=_jsonable) + "\n")
    from benchmarks.report import phone_chain_section

    print("\n".join(phone_chain_section(result)))
    return 0 if not run["failures"] else 1


def _overrides(items: list[str]) -> dict[str, str]:
    from pipeline.errors import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects section.field=VALUE, got {item!r}")
        out[key] = value
    return out


def _rounded(x: Any, digits: int = 4) -> Any:
    """Floats rounded (mm to 0.1 um, seconds to 0.1 ms): the result file stays readable."""
    if isinstance(x, float | np.floating):
        return round(float(x), digits)
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_rounded(v, digits) for v in x]
    return x


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
