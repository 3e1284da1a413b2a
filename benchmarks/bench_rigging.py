"""Example-based rigging speed (issue 8) at the C++ peer's problem sizes, on ICT sub-meshes.

The peer (kyle-gh/ExampleBasedFacialRigging, Eigen, 2 threads, 10 iterations) was timed on
this kind of machine on ICT-derived problems; the cases here are the same sizes, cut from
the embedded model:

* 13,294 vertices (the template's face + head/neck + mouth-socket parts), 28 shapes,
  10 poses: peer 133 s wall, 173 CPU-s, 1.2 GB;
* 9,409 vertices (the face part), 53 shapes, 60 poses: peer 969 s wall, 1,044 CPU-s, 1.8 GB.

Each problem: a random identity as the subject neutral; a true personal rig = the
transferred generic shapes with a per-shape gain and a smooth change of direction; poses
from known sparse weights (1-3 shapes each) plus a smooth perturbation of the mesh (0.3 mm);
priors = the known weights scaled by U(0.8, 1.2). All shapes are solved (none fixed, as the
peer). Each case runs twice, in a fresh child process each (peak memory = the child's
VmHWM): ``max_iterations=10, tolerance=0`` (the peer's schedule) and the default
tolerance stop. Wall and CPU seconds are both reported: the machine is shared.

Run::

    python -m benchmarks.bench_rigging                 # both cases, both stops
    python -m benchmarks.bench_rigging --cases large --stops known_weights   # ablation (merged)
    python -m benchmarks.bench_rigging --profile small  # cProfile of one run, top functions

Writes ``benchmarks/results/rigging_speed.json``; rerun ``python -m benchmarks.report``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "rigging_speed.json"
CASES = {
    "small": {"parts": ("face", "head_neck", "mouth_socket"), "shapes": 28, "poses": 10,
              "peer": {"wall_s": 133, "cpu_s": 173, "peak_gb": 1.2}, "target_wall_s": 27},
    "large": {"parts": ("face",), "shapes": 53, "poses": 60,
              "peer": {"wall_s": 969, "cpu_s": 1044, "peak_gb": 1.8}, "target_wall_s": 190},
}
STOPS = {"peer_10_iterations": {"max_iterations": 10, "tolerance": 0.0}, "tolerance": {},
         # Ablation: the true weights as the prior, trusted (gamma 100 mm^2): isolates the
         # weight/shape-scale ambiguity from the rest of the method.
         "known_weights": {"gamma": 100.0}}
TARGET_PEAK_GB = 1.0


def submesh(model, parts: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(vertex ids (v,), triangles (t, 3) renumbered into them) of a model's parts."""
    ids = model.part_vertices(*parts)
    inside = np.isin(model.triangles, ids).all(1)
    return ids, np.searchsorted(ids, model.triangles[inside])


def make_problem(case: str, seed: int = 0):
    """The case's :class:`~rigs.example_rig.RigProblem` and its truth (deltas, weights)."""
    from rigs.deformation_transfer import gradient_domain, transfer_arrays
    from rigs.example_rig import RigProblem
    from rigs.face_model import load_ict_face_model

    spec = CASES[case]
    model = load_ict_face_model()
    rng = np.random.default_rng(seed)
    ids, tris = submesh(model, spec["parts"])
    generic_neutral = model.neutral[ids].astype(np.float64)
    generic = model.expression_basis[: spec["shapes"]][:, ids].astype(np.float64)
    neutral = model.identity_shape(rng.normal(size=100))[ids]
    domain = gradient_domain(tris, np.zeros(0, np.int64), generic)
    transferred = transfer_arrays(generic_neutral, generic, neutral, domain)
    x = neutral - neutral.mean(0)
    true = np.empty_like(transferred)
    for k in range(len(true)):
        bump = np.exp(-np.sum((x - rng.normal(scale=0.03, size=3)) ** 2, 1) / (2 * 0.04**2))[:, None]
        true[k] = transferred[k] * rng.uniform(0.85, 1.15) + bump * (transferred[k] @ rng.normal(scale=0.3, size=(3, 3)).T)
    weights = np.zeros((spec["poses"], len(true)))
    for j in range(len(weights)):
        active = rng.choice(len(true), size=rng.integers(1, 4), replace=False)
        weights[j, active] = rng.uniform(0.3, 1.0, len(active))
    examples = neutral + np.einsum("jk,knc->jnc", weights, true)
    for j in range(len(examples)):  # smooth mesh error, as a fitted + refined scan has
        bump = np.exp(-np.sum((x - rng.normal(scale=0.04, size=3)) ** 2, 1) / (2 * 0.02**2))[:, None]
        examples[j] += 3e-4 * bump * rng.normal(size=3)
    prior = np.clip(weights * rng.uniform(0.8, 1.2, weights.shape), 0.0, 1.0)
    problem = RigProblem(neutral, generic_neutral, generic, examples, tuple(f"pose{j}" for j in range(len(weights))),
                         prior, domain, np.zeros(len(true), bool))
    return problem, true, weights, transferred, generic


def basis_error_mm(deltas: np.ndarray, true: np.ndarray) -> float:
    """Mean over bases of the mean per-vertex error over the vertices the truth moves >= 0.5 mm."""
    errs = []
    for k in range(len(true)):
        moved = np.linalg.norm(true[k], axis=1) >= 5e-4
        if moved.any():
            errs.append(1000 * np.linalg.norm(deltas[k, moved] - true[k, moved], axis=1).mean())
    return float(np.mean(errs))


def run_child(case: str, stop: str) -> dict:
    """One timed solve in this process (problem construction not timed)."""
    from rigs.example_rig import ExampleRigConfig, solve_example_rig

    problem, true, weights, transferred, generic = make_problem(case)
    if stop == "known_weights":
        problem = dataclasses.replace(problem, prior=weights)
    config = ExampleRigConfig(**STOPS[stop])
    wall, cpu = time.perf_counter(), time.process_time()
    sol = solve_example_rig(problem, config)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    steps = ("gradient_step", "vertex_step", "weight_step")
    return {
        "case": case, "stop": stop, "vertices": len(problem.neutral), "triangles": len(problem.domain.triangles),
        "shapes": len(true), "poses": len(weights), "iterations": sol.iterations, "converged": sol.converged,
        "wall_s": wall, "cpu_s": cpu, "peak_mb": _peak_mb(),
        "setup": sol.setup_seconds,
        "step_cpu_s": {s: sum(h[f"{s}_cpu_s"] for h in sol.history) for s in steps},
        "step_wall_s": {s: sum(h[f"{s}_wall_s"] for h in sol.history) for s in steps},
        "basis_error_mm": {"generic": basis_error_mm(generic, true), "transfer": basis_error_mm(transferred, true),
                           "example_based": basis_error_mm(sol.deltas, true)},
        "weights_mae": {"prior": float(np.abs(problem.prior - weights).mean()),
                        "example_based": float(np.abs(sol.weights - weights).mean())},
        "residual_mean_mm": float(sol.residual_mean_mm.mean()),
        "history": [{k: v for k, v in h.items() if not k.endswith("_s")} for h in sol.history],
        "load_avg": os.getloadavg(),
    }


def _peak_mb() -> float:
    """This process's peak resident memory (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def profile(case: str) -> None:
    import cProfile
    import pstats

    cProfile.runctx("run_child(case, 'peer_10_iterations')", globals(), {"case": case, "run_child": run_child},
                    "/tmp/rigging.prof")
    pstats.Stats("/tmp/rigging.prof").sort_stats("tottime").print_stats(15)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("CASE", "STOP"), help=argparse.SUPPRESS)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--stops", nargs="*", default=["peer_10_iterations", "tolerance"], choices=list(STOPS))
    ap.add_argument("--profile", choices=list(CASES))
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(*args.child)))
        return
    if args.profile:
        profile(args.profile)
        return
    old = json.loads(args.results.read_text())["runs"] if args.results.is_file() else []
    runs = [r for r in old if (r["case"], r["stop"]) not in {(c, s) for c in args.cases for s in args.stops}]
    for case in args.cases:
        for stop in args.stops:
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_rigging", "--child", case, stop],
                                 check=True, capture_output=True, text=True)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(run)
            print(f"{case} {stop}: {run['iterations']} it, wall {run['wall_s']:.1f} s, CPU {run['cpu_s']:.1f} s, "
                  f"peak {run['peak_mb']:.0f} MiB, basis error {run['basis_error_mm']}", flush=True)
    result = {"command": "python -m benchmarks.bench_rigging", "cases": CASES, "target_peak_gb": TARGET_PEAK_GB,
              "cpus": os.cpu_count(), "runs": runs}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
