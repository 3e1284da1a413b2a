"""Accuracy of example-based rigging against the true personal rig (issue 8's "Show" table).

Per subject, on its 60 phone prompts (in capture order; the neutral prompt is an example
too, as in the ``rig`` stage), with the ``rig`` stage's default :class:`ExampleRigConfig`:

1. **Per-basis error** against the true personal rig, per regressed basis: mean per-vertex
   mm over the vertices the true basis moves by >= 0.5 mm; then mean and median over the
   bases. For the generic deltas copied unchanged, deformation transfer alone (the
   solver's initial shapes), example-based rigging (tolerance stop), and a known-weights
   ablation (the true weights as a trusted prior, gamma = 100 mm^2, as
   ``bench_rigging --stops known_weights``): it separates the weight/shape-scale
   ambiguity from the rest of the method.
2. **Held-out reconstruction**: the examples at positions 5, 11, ..., 59 (every 6th, 10 of
   60; the neutral stays in) are held out, the rig is built from the other 50, and each
   held-out mesh is fitted with bounded [0, 1] least squares (``rigs.rig_weights``'
   solver, no prior, no constraints) over the rig stage's fitting vertices (the gradient
   domain's); the figure is the mean per-vertex residual, mm. Also for the transfer's
   rig, the copied generic rig and the true rig (which must give ~0: a check).
3. **Recovered weights** against the true performed weights: mean absolute difference over
   all examples x shapes, and over the (example, shape) pairs active in the art prior;
   the art prior's own MAD against the truth is the baseline.
4. Iterations, converged flag, CPU (``time.process_time``, all threads) and wall seconds of
   the full build.

Inputs: ``--source truth`` (default) reproduces subjects 0.. of ``pgt synth --seed SEED``
(the ``standard`` preset) and their true meshes in the head frame without rendering
(benchmarks/rig_truth.py). ``--source chain --run OUT --truth OUT_SYNTH/ground_truth``
uses a chain run's ``refine`` artifacts (neutral and refined meshes) against the truth.

Where the rig's prior-contradiction check rejects a subject's examples, the message is
recorded and the rig rebuilt with the check off (the figures are the rebuilt rig's).

Run: ``python -m benchmarks.bench_rig_accuracy [--subjects 3] [--seed 1000]``; writes
``benchmarks/results/rig_accuracy.json`` (``rig_accuracy_chain.json`` for the chain);
then ``python -m benchmarks.report``. ``--diagnose [--prior-scale 0.8] [--gamma G]``
runs one build per subject with the per-basis scale diagnosis
(``rig_accuracy_scale.json``; docs/rigging.md, "Accuracy on standard subjects").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.errors import StageError
from rigs.definition import load_default_rig_definition
from rigs.example_rig import ExampleRigConfig
from rigs.face_model import load_ict_face_model
from rigs.personal_rig import build_example_rig, rig_problem
from rigs.rig import BlendshapeRig
from rigs.rig_weights import solve_weights
from stages.synthesis.personal_rig import shape_differences

RESULTS = Path(__file__).parent / "results"
HOLD_OUT_EVERY, HOLD_OUT_FIRST = 6, 5
#: Prior weight of the held-out fit: negligible (mm^2), only keeps the problem strictly convex.
FIT_GAMMA = 1e-6
#: The known-weights ablation trusts its prior (as bench_rigging's known_weights stop).
KNOWN_WEIGHTS_GAMMA = 100.0
#: Config overrides that turn off the prior-contradiction check (diagnostic builds only).
NO_OUTLIER_CHECK = {"outlier_factor": 1e9, "max_prior_deviation": 1.0}


def held_out(j: int) -> np.ndarray:
    """(J,) bool: the held-out examples (every 6th from position 5: 10 of 60)."""
    return (np.arange(j) % HOLD_OUT_EVERY) == HOLD_OUT_FIRST


def fit_residual_mm(deltas: np.ndarray, neutral: np.ndarray, meshes: np.ndarray, fit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounded least-squares weights of meshes under a rig, and the residual.

    Args:
        deltas: (K, n, 3) the rig's deltas, metres.
        neutral: (n, 3) the rig's neutral.
        meshes: (H, n, 3) meshes to fit.
        fit: (f,) vertex ids fitted and measured.

    Returns:
        ((H,) mean per-vertex residual mm over ``fit``, (H, K) weights in [0, 1]).
    """
    d = np.asarray(deltas, np.float64)[:, fit].reshape(len(deltas), -1) * 1e3
    r = (np.asarray(meshes, np.float64)[:, fit] - neutral[fit]).reshape(len(meshes), -1) * 1e3
    f = len(fit)
    none = np.zeros((0, 2), np.int64)
    start = np.zeros((len(meshes), len(deltas)))
    w, _ = solve_weights(d @ d.T / f, r @ d.T / f, start, FIT_GAMMA, start, none, none, tol=1e-9, max_steps=20000)
    res = np.linalg.norm((w @ d - r).reshape(len(meshes), f, 3), axis=2).mean(1)
    return res, w


def basis_errors(true: np.ndarray, other: np.ndarray, regressed: np.ndarray) -> list[float]:
    """Per regressed basis, mean per-vertex mm over the vertices the true basis moves >= 0.5 mm."""
    return shape_differences(true[regressed], np.asarray(other)[regressed])[:, 0].tolist()


def weight_mad(weights: np.ndarray, truth: np.ndarray, prior: np.ndarray) -> dict[str, float]:
    """Mean |weights - truth| over all entries and over the entries active in the prior."""
    err = np.abs(np.asarray(weights, np.float64) - truth)
    return {"all": float(err.mean()), "prior_active": float(err[prior > 0].mean())}


def _timed_build(generic: BlendshapeRig, neutral: np.ndarray, examples: dict, config: ExampleRigConfig,
                 priors: dict | None = None):
    """The rig and its run record. Where the rig's prior-contradiction check rejects the
    examples, the message is recorded and the build repeats with that check off
    (:data:`NO_OUTLIER_CHECK`), so the figures still exist; the timing is the first build's."""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        result, rejected = build_example_rig(generic, neutral, examples, config, priors), ""
    except StageError as err:
        if "contradict" not in str(err):
            raise
        rejected = str(err)
        result = build_example_rig(generic, neutral, examples, dataclasses.replace(config, **NO_OUTLIER_CHECK), priors)
    return result, {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                    "iterations": len(result.history), "converged": result.converged, "rejected": rejected}


def measure_subject(generic: BlendshapeRig, true_deltas: np.ndarray, neutral: np.ndarray, prompts: tuple[str, ...],
                    meshes: np.ndarray, true_b: np.ndarray, config: ExampleRigConfig) -> dict:
    """Every figure of one subject (see the module docstring).

    Args:
        true_deltas: (K, n, 3) the true personal rig's deltas.
        neutral: (n, 3) the subject's neutral (true, or the chain's).
        prompts: (J,) example names; meshes (J, n, 3) their meshes; true_b (J, K) the
            performed weights.
    """
    d = generic.definition
    regressed = np.asarray(d.indices(d.regressed))
    neutral = np.asarray(neutral, np.float64)
    examples = dict(zip(prompts, meshes, strict=True))
    full, timing = _timed_build(generic, neutral, examples, config)
    known, known_timing = _timed_build(generic, neutral, examples, dataclasses.replace(config, gamma=KNOWN_WEIGHTS_GAMMA),
                                       priors=dict(zip(prompts, np.asarray(true_b, np.float64), strict=True)))
    out = held_out(len(prompts))
    train = {p: m for p, m, h in zip(prompts, meshes, out, strict=True) if not h}
    part, part_timing = _timed_build(generic, neutral, train, config)
    fit = np.unique(rig_problem(generic, neutral, {}).domain.triangles)
    rigs = {"generic": generic.deltas, "transfer": part.transferred, "example_based": part.rig.deltas,
            "true": true_deltas}
    held = {}
    for name, deltas in rigs.items():
        res, w = fit_residual_mm(deltas, neutral, meshes[out], fit)
        held[name] = {"residual_mean_mm": res.tolist(), "weights_mad": float(np.abs(w - true_b[out]).mean())}
    prior = np.asarray(full.prior, np.float64)
    return {
        "prompts": list(prompts), "held_out": [p for p, h in zip(prompts, out, strict=True) if h],
        "basis_error_mm": {"generic": basis_errors(true_deltas, generic.deltas, regressed),
                           "transfer": basis_errors(true_deltas, full.transferred, regressed),
                           "example_based": basis_errors(true_deltas, full.rig.deltas, regressed),
                           "known_weights": basis_errors(true_deltas, known.rig.deltas, regressed)},
        "held_out_fit": held,
        "weights_mad": {"prior": weight_mad(prior, true_b, prior),
                        "example_based": weight_mad(full.weights, true_b, prior),
                        "known_weights": weight_mad(known.weights, true_b, prior)},
        "residual_mean_mm": float(full.residual_mean_mm.mean()),
        "run": timing, "known_weights_run": known_timing, "held_out_run": part_timing,
        "history": [{k: v for k, v in h.items() if not k.endswith("_s")} for h in full.history],
    }


def scale_diagnosis(true_deltas: np.ndarray, deltas: dict[str, np.ndarray], regressed: np.ndarray,
                    weights: np.ndarray, prior: np.ndarray, true_b: np.ndarray) -> dict:
    """How much of each rig's basis error is a per-shape scale (the weight/shape-scale ambiguity).

    Per regressed basis and rig: the least-squares scale ``s`` of its deltas onto the true
    ones over the vertices the true basis moves >= 0.5 mm, and the basis error after that
    rescaling; plus the signed bias of the recovered weights and of the art prior against
    the truth, over the (example, shape) pairs active in the prior.
    """
    out: dict = {}
    for name, d in deltas.items():
        scales, errors = [], []
        for k in regressed:
            t = np.asarray(true_deltas[k], np.float64)
            moving = np.linalg.norm(t, axis=1) >= 5e-4
            if not moving.any():
                continue
            e = np.asarray(d[k], np.float64)[moving]
            s = float(np.sum(e * t[moving]) / max(np.sum(e * e), 1e-30))
            scales.append(s)
            errors.append(1e3 * float(np.linalg.norm(s * e - t[moving], axis=1).mean()))
        out[name] = {"scale_median": float(np.median(scales)), "scale_mean": float(np.mean(scales)),
                     "rescaled_error_mm": float(np.mean(errors)), "scales": scales}
    active = prior > 0
    out["weight_bias"] = {"prior": float((prior - true_b)[active].mean()),
                          "example_based": float((weights - true_b)[active].mean()),
                          "true_over_prior_median": float(np.median(true_b[active] / prior[active]))}
    return out


def diagnose(generic: BlendshapeRig, subjects, config: ExampleRigConfig, results: Path, prior_scale: float = 1.0) -> None:
    """One build per subject (the default config unless overridden), with
    :func:`scale_diagnosis` (``--diagnose``); ``prior_scale`` multiplies the art priors."""
    d = generic.definition
    regressed = np.asarray(d.indices(d.regressed))
    rows = []
    for sid, true_deltas, neutral, prompts, meshes, b in subjects:
        priors = {p: d.art_prior_vector(p) * prior_scale for p in prompts}
        full, timing = _timed_build(generic, np.asarray(neutral, np.float64), dict(zip(prompts, meshes, strict=True)),
                                    config, priors)
        timing["basis_error_mm"] = float(np.nanmean(basis_errors(true_deltas, full.rig.deltas, regressed)))
        rigs = {"generic": generic.deltas, "transfer": full.transferred, "example_based": full.rig.deltas}
        w, prior = np.asarray(full.weights, np.float64), np.asarray(full.prior, np.float64)
        far = [{"prompt": prompts[j], "shape": d.blendshape_names[k], "prior": round(float(prior[j, k]), 3),
                "true": round(float(b[j, k]), 3), "fitted": round(float(w[j, k]), 3)}
               for j, k in zip(*np.nonzero(np.abs(w - b) > 0.3), strict=True)]
        rows.append({"subject": sid, "run": timing, "weights_off_by_0_3": far, **scale_diagnosis(true_deltas, rigs, regressed,
                                                                      np.asarray(full.weights, np.float64),
                                                                      np.asarray(full.prior, np.float64), b)})
        print(sid, {k: v for k, v in rows[-1].items() if k not in rigs}, {k: {m: x for m, x in rows[-1][k].items() if m != "scales"} for k in rigs}, flush=True)
        results.write_text(json.dumps({"command": " ".join(["python -m benchmarks.bench_rig_accuracy", *sys.argv[1:]]),
                                       "config": dataclasses.asdict(config), "prior_scale": prior_scale,
                                       "subjects": rows}, indent=1) + "\n")


def truth_subjects(indices: list[int], seed: int):
    """(subject id, true deltas, neutral, prompts, meshes, b) of ``pgt synth --seed`` subjects."""
    from benchmarks.rig_truth import true_expressions
    from stages.synthesis.presets import get_preset

    model, definition = load_ict_face_model(), load_default_rig_definition()
    for index in indices:
        t = true_expressions(get_preset("standard"), seed, index, model, definition)
        neutral = t.vertices[t.prompts.index("neutral")]
        yield t.subject.subject_id, t.subject.rig.deltas, neutral, t.prompts, t.vertices, t.b


def chain_subjects(run_out: Path, truth_root: Path, subjects: list[str]):
    """The same from a chain run's ``refine`` artifacts (latest run in ``run_out``, or in
    ``run_out/<subject>`` where each subject has its own output root, as ``pgt label``
    writes), against the truth folders under ``truth_root`` (``OUT_SYNTH/ground_truth``)."""
    from pipeline.artifacts import ArtifactStore
    from pipeline.runlog import OutputLayout, read_json
    from pipeline.status import latest_run
    from stages.refine import RefinedSubject
    from stages.synthesis.truth import SubjectTruth

    for sid in subjects:
        root = run_out / sid if (run_out / sid / "runs").is_dir() else run_out
        layout = OutputLayout(str(root))
        plan = read_json(f"{layout.run_dir(latest_run(str(root))['run_id'])}/plan.json")
        keys = {p["subject"]: p["key"] for p in plan if p["stage"] == "refine"}
        refined = RefinedSubject.from_output(ArtifactStore(layout.artifacts).load("refine", keys[sid]))
        truth = SubjectTruth.open(truth_root / sid)
        expr = truth.expressions()
        names = [str(p) for p in expr["prompts"]]
        prompts = tuple(p for p in names if p in refined.refined)
        meshes = np.stack([refined.refined[p].vertices for p in prompts])
        b = expr["b"][[names.index(p) for p in prompts]]
        yield sid, truth.rig.deltas, refined.neutral, prompts, meshes, b


def summarise(subjects: list[dict]) -> dict:
    """Means and medians over bases (per subject and pooled), held-out and weight means."""
    methods = ("generic", "transfer", "example_based", "known_weights")
    pooled = {m: np.concatenate([s["basis_error_mm"][m] for s in subjects]) for m in methods}
    held = {m: float(np.mean([np.mean(s["held_out_fit"][m]["residual_mean_mm"]) for s in subjects]))
            for m in subjects[0]["held_out_fit"]}
    basis = {m: {"mean": float(np.nanmean(v)), "median": float(np.nanmedian(v))} for m, v in pooled.items()}
    better = min(basis["generic"]["mean"], basis["transfer"]["mean"])
    return {"basis_error_mm": basis, "basis_ratio_to_better": basis["example_based"]["mean"] / better,
            "held_out_mm": held, "held_out_ratio_to_transfer": held["example_based"] / held["transfer"],
            "weights_mad": {m: {k: float(np.mean([s["weights_mad"][m][k] for s in subjects])) for k in ("all", "prior_active")}
                            for m in subjects[0]["weights_mad"]}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--source", choices=("truth", "chain"), default="truth")
    ap.add_argument("--run", type=Path, help="chain: the run's output folder")
    ap.add_argument("--truth", type=Path, help="chain: OUT_SYNTH/ground_truth")
    ap.add_argument("--results", type=Path)
    ap.add_argument("--diagnose", action="store_true",
                    help="default builds only, with the per-basis scale diagnosis (rig_accuracy_scale.json)")
    ap.add_argument("--gamma", type=float, help="diagnose: the weight step's prior weight (default: the stage's)")
    ap.add_argument("--prior-scale", type=float, default=1.0, help="diagnose: multiply the art priors by this")
    ap.add_argument("--first", type=int, default=0, help="first subject index")
    ap.add_argument("--max-iterations", type=int, help="smoke runs only (default: the rig stage's)")
    a = ap.parse_args(argv)
    overrides = {"max_iterations": a.max_iterations, "gamma": a.gamma}
    config = ExampleRigConfig(**{k: v for k, v in overrides.items() if v is not None})
    generic = BlendshapeRig.generic(load_ict_face_model(), load_default_rig_definition())
    if a.source == "truth":
        source = truth_subjects(list(range(a.first, a.first + a.subjects)), a.seed)
    else:
        source = chain_subjects(a.run, a.truth, [f"synth-{a.seed}-{i:04d}" for i in range(a.first, a.first + a.subjects)])
    results = a.results or RESULTS / ("rig_accuracy.json" if a.source == "truth" else "rig_accuracy_chain.json")
    if a.diagnose:
        diagnose(generic, source, config, a.results or RESULTS / "rig_accuracy_scale.json", a.prior_scale)
        return
    rows = []
    for sid, true_deltas, neutral, prompts, meshes, b in source:
        row = {"subject": sid, **measure_subject(generic, true_deltas, neutral, prompts, meshes, b, config)}
        rows.append(row)
        s = summarise([row])
        print(f"{sid}: basis {s['basis_error_mm']}, held-out {s['held_out_mm']}, weights {s['weights_mad']}, "
              f"run {row['run']}", flush=True)
        result = {"command": " ".join(["python -m benchmarks.bench_rig_accuracy", *(sys.argv[1:] if argv is None else argv)]),
                  "source": a.source, "seed": a.seed, "config": dataclasses.asdict(config),
                  "hold_out": f"positions {HOLD_OUT_FIRST}::{HOLD_OUT_EVERY}", "cpus": os.cpu_count(),
                  "load_avg": os.getloadavg(), "subjects": rows, "summary": summarise(rows)}
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(result, indent=1) + "\n")  # after each subject


if __name__ == "__main__":
    main()
