"""Where the phone chain's time goes, on one subject, in one process (issue 7 timing).

Runs the product chain's stage functions directly (no engine, no cache keys) on one
capture, keeping each stage's output in ``--cache`` so that a later call re-runs only the
stages asked for; prints wall and CPU seconds per stage (CPU: all threads of this process
and of the worker processes it started) and, inside fusion, per step (the module's step functions timed
in place). With ``--truth`` it scores the fused scans against the true meshes
(:func:`stages.geometry_eval.fused_scan_error`, face region). ``--expressions N`` runs
fusion and the stages after it on the first N expressions (the neutral always included)::

    python -m benchmarks.profile_phone_chain --capture DATA/captures/S --truth DATA/ground_truth/S \\
        --cache WORK --expressions 6 --run fusion fit --set fusion.workers=1

Not a timed test: a tool to iterate on speed. The benchmark is bench_phone_chain.py.
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

STAGES = ("validate", "landmarks", "face_mask", "fusion", "fit", "refine", "texture")
#: The fusion module's step functions, timed where fuse_expression calls them.
FUSION_STEPS = ("backproject", "lift_landmarks", "point_cloud", "ransac_rigid", "icp_refine",
                "overlap", "poisson_mesh")


class StepTimer:
    """Wraps module functions so that each call adds its wall and CPU seconds to a total."""

    def __init__(self, module: Any, names: tuple[str, ...]) -> None:
        self.module, self.names = module, names
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self.saved = {n: getattr(module, n) for n in names if hasattr(module, n)}

    def __enter__(self) -> StepTimer:
        for name, fn in self.saved.items():
            setattr(self.module, name, self._timed(name, fn))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self.saved.items():
            setattr(self.module, name, fn)

    def _timed(self, name: str, fn):
        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[name] += time.perf_counter() - t0
                self.cpu[name] += time.process_time() - c0
        return timed


def subset_capture(path: Path, n: int | None) -> Any:
    """The capture, restricted to its first ``n`` expressions (plus the neutral)."""
    from storage.capture import Capture

    cap = Capture.open(path)
    if not n:
        return cap
    names = list(cap.phone_expressions[:n])
    if "neutral" in cap.phone_expressions and "neutral" not in names:
        names.append("neutral")
    sub = SubsetCapture.__new__(SubsetCapture)
    sub.__dict__.update(cap.__dict__)
    sub.names = tuple(names)
    return sub


def _subset_class():
    from storage.capture import Capture

    class SubsetCapture(Capture):
        """A capture that lists only some of its expressions (picklable: module level)."""

        names: tuple[str, ...] = ()

        @property
        def phone_expressions(self) -> tuple[str, ...]:
            return self.names

    SubsetCapture.__module__, SubsetCapture.__qualname__ = __name__, "SubsetCapture"
    return SubsetCapture


SubsetCapture = _subset_class()


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (worker processes)."""
    import resource

    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + child.ru_utime + child.ru_stime


def stage_config(name: str, overrides: list[str]) -> Any:
    """The engine's config view of one stage (the run config with ``--set`` overrides)."""
    from pipeline.config import with_overrides
    from pipeline.stage import StageConfig, config_values
    from workflows.chain import default_chain
    from workflows.config import RunConfig

    config = with_overrides(RunConfig(), dict(o.split("=", 1) for o in overrides))
    stage = next(s for s in default_chain() if s.name == name)
    return StageConfig(config_values(stage, config))


def run_stage(name: str, capture: Any, outputs: dict[str, Any], overrides: list[str]) -> Any:
    from workflows.chain import default_chain

    stage = next(s for s in default_chain() if s.name == name)
    args = [str(capture.root) if name in ("validate", "landmarks") else capture]
    if name == "face_mask":  # on every expression: cached once for any --expressions
        from storage.capture import Capture

        args = [Capture.open(capture.root)]
    args += [outputs[i] for i in stage.inputs if i != "capture"]
    return stage.fn(*args, config=stage_config(name, overrides))


def score_fusion(fusion: Any, truth_root: Path) -> dict[str, float]:
    """Median over expressions of the fused scans' median and p90 distance to the truth, mm."""
    from stages.fusion import FusedScans
    from stages.geometry_eval import face_region, face_region_triangles, fused_scan_error
    from stages.synthesis.truth import SubjectTruth

    truth = SubjectTruth.open(truth_root)
    model = truth.rig.model
    region_tri = face_region_triangles(model.triangles, face_region(model))
    ex = truth.expressions()
    prompts = [str(p) for p in ex["prompts"]]
    med, p90 = [], []
    for e, f in FusedScans.from_output(fusion).expressions.items():
        if f.ok:
            s = fused_scan_error(f.vertices, ex["vertices"][prompts.index(e)],
                                 truth.phone(e)["head_in_camera"][f.reference], model.triangles, region_tri)
            med.append(s.median_mm)
            p90.append(s.p90_mm)
    return {"median_mm": float(np.median(med)), "p90_mm": float(np.median(p90)), "expressions": len(med)}


def main(argv: list[str] | None = None) -> int:
    import stages.fusion as fusion_module

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--capture", required=True, type=Path)
    p.add_argument("--truth", type=Path, help="the subject's ground_truth folder (scores the fused scans)")
    p.add_argument("--cache", required=True, type=Path, help="folder for the stages' outputs")
    p.add_argument("--expressions", type=int, default=0, help="first N expressions only (0 = all)")
    p.add_argument("--run", nargs="*", default=[], choices=STAGES, help="stages to re-run even when cached")
    p.add_argument("--until", choices=STAGES, default="texture", help="last stage")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--json", type=Path, help="write the timings here")
    args = p.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    capture = subset_capture(args.capture, args.expressions)
    outputs: dict[str, Any] = {}
    report: dict[str, Any] = {"capture": str(args.capture), "expressions": len(capture.phone_expressions),
                              "set": args.set, "stages": {}}
    for name in STAGES[: STAGES.index(args.until) + 1]:
        suffix = "" if name in ("validate", "landmarks", "face_mask") else f"-{args.expressions}"
        path = args.cache / f"{name}{suffix}.pkl"
        if path.exists() and name not in args.run:
            outputs[name] = pickle.loads(path.read_bytes())
            continue
        with StepTimer(fusion_module, FUSION_STEPS) as steps:
            t0, c0 = time.perf_counter(), cpu_seconds()
            outputs[name] = run_stage(name, capture, outputs, args.set)
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        path.write_bytes(pickle.dumps(outputs[name]))
        entry: dict[str, Any] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
        if name == "fusion":
            entry["steps_cpu_s"] = {k: round(v, 2) for k, v in steps.cpu.items()}
            entry["steps_wall_s"] = {k: round(v, 2) for k, v in steps.wall.items()}
            if args.truth:
                entry["accuracy"] = score_fusion(outputs[name], args.truth)
        report["stages"][name] = entry
        print(f"{name:10s} {json.dumps(entry)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
