"""Round-0 labels (the ``selfsup`` stage) against the truth and the trivial labellers.

Run::

    python -m benchmarks.bench_selfsup --data ROOT [--runs RUNS_ROOT] [--variants cnn,no_keypoints,embedded,without:eye_left,seed:1]
        [--baseline-frames 60] [--set selfsup.FIELD=VALUE ...] [--out benchmarks/results/selfsup.json]

``ROOT`` is a ``pgt synth`` output (``captures/``, ``ground_truth/``). Each subject is
labelled with the chain's personal rig and texture when ``RUNS_ROOT/<subject>`` holds a
finished chain run (``pgt label``), else with its true rig and no texture (the result
says which). Every variant's labels go through ``pgt metrics`` (SPEC §5.1 and §5.2, the
trivial labellers beside them), and the ground-truth table is scored for the truth's own
§5.1 ceiling. With ``--baseline-frames N`` the per-frame baseline also fits N consecutive
frames around each recording's first peak, and both are compared on those frames.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: Variants: SelfSupConfig fields changed from the base config.
VARIANTS = {
    "cnn": {},
    "no_keypoints": {"keypoints": False},
    "embedded": {"cameras": "embedded"},
}


def variant_fields(name: str) -> dict:
    """The SelfSupConfig changes of a variant: one of :data:`VARIANTS`, ``without:CAMERA``
    (every camera but that one: the leave-one-camera-out study of docs/camera-placement.md)
    or ``seed:N`` (the default with another seed: the run-to-run spread)."""
    if name.startswith("without:"):
        return {"exclude_cameras": name.split(":", 1)[1]}
    if name.startswith("seed:"):
        return {"seed": int(name.split(":", 1)[1])}
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}: one of {', '.join(VARIANTS)} or without:CAMERA")
    return VARIANTS[name]


def _summaries(metrics) -> dict:
    """{source: {metric: value}} of a MetricsSummaries (result groups and trivial labellers)."""
    def values(summary) -> dict:
        return {metric: agg.value for metric, agg in summary.dataset.items()}

    out = {f"{src}/{rnd}": values(s) for (src, rnd), s in metrics.items()}
    out.update({src: values(s) for src, s in metrics.trivial.items()})
    return out


def _personal(runs: Path | None, subject: str, truth) -> tuple[object, object, str]:
    """(rig, texture, where from) of a subject: the chain's when a run exists, else the truth's rig."""
    if runs is not None and (runs / subject).is_dir():
        from pipeline.outputs import RunOutputs
        from stages.rigging import rig_from_run
        from stages.texture import UvTexture

        outputs = RunOutputs(str(runs / subject))  # only the two artifacts needed are read
        if outputs.has("rig", subject) and outputs.has("texture", subject):
            return (rig_from_run(outputs, subject), UvTexture.from_output(outputs.load("texture", subject)), "chain")
    return truth.rig, None, "truth rig, flat albedo seed"


def label_and_score(capture_dir: Path, data: Path, cfg, rig, texture, work: Path) -> dict:
    """Labels one subject with ``cfg`` and scores it; returns labels' figures and timings."""
    from stages.selfsup.label import label_subject
    from storage.capture import Capture
    from storage.label_table import LabelTable
    from workflows.metrics import MetricsJob, run_metrics

    w0, c0 = time.perf_counter(), time.process_time()
    labels = label_subject(Capture.open(capture_dir), rig, texture, cfg, verbose=True)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    rigs = work / "rigs"
    rigs.mkdir(parents=True, exist_ok=True)
    rig.save(rigs / f"{capture_dir.name}.npz")
    LabelTable(str(work / "labels")).write_subject_round(labels.label_table(run_id="bench", pipeline_version="bench"))
    metrics = run_metrics(MetricsJob(labels=str(work / "labels"), captures=str(data / "captures"),
                                     truth=str(data / "ground_truth"), rig_dir=str(rigs), out=str(work / "metrics")))
    return {"wall_s": wall, "cpu_s": cpu, "frames": int(len(labels.b)), "timings": labels.timings,
            "diagnostics": labels.diagnostics,
            "metrics": _summaries(metrics), "labels": labels,
            "median_pixel_rms": float(np.median(labels.residual_photometric)),
            "median_keypoint_px": float(np.nanmedian(labels.residual_keypoint_px))
            if np.isfinite(labels.residual_keypoint_px).any() else None}


def truth_ceiling(data: Path, subjects: list[str], work: Path) -> dict:
    """The ground-truth table's own metrics (the §5.1 ceiling)."""
    from workflows.metrics import MetricsJob, run_metrics

    m = run_metrics(MetricsJob(labels=str(data / "ground_truth" / "labels"), captures=str(data / "captures"),
                               truth=str(data / "ground_truth"), out=str(work / "truth_metrics"), trivial=False))
    return _summaries(m)


def rig_floor(capture_dir: Path, data: Path, rig, work: Path) -> dict:
    """The true labels scored through the labelling rig: what the rig's own error costs.

    With the chain's personal rig, even perfect labels leave this expression-mesh error
    (and, where its neutral mouth is open, a failed mouth closure); pose and gaze are exact.
    """
    from storage.label_table import LabelTable
    from workflows.metrics import MetricsJob, run_metrics

    subject = capture_dir.name
    rows = LabelTable(str(data / "ground_truth" / "labels")).read(subject_id=subject)
    (work / "rigs").mkdir(parents=True, exist_ok=True)
    rig.save(work / "rigs" / f"{subject}.npz")
    LabelTable(str(work / "labels")).write_subject_round(rows)
    m = run_metrics(MetricsJob(labels=str(work / "labels"), captures=str(data / "captures"), truth=str(data / "ground_truth"),
                               rig_dir=str(work / "rigs"), out=str(work / "metrics"), trivial=False))
    return next(iter(_summaries(m).values()))


def baseline_comparison(capture_dir: Path, truth, rig, texture, cfg, cnn_labels, frames: int) -> dict:
    """The per-frame baseline on ``frames`` consecutive frames around the first peak of the
    first recording, against the network's labels of the same frames."""

    from stages.metrics_active import active_mae
    from stages.selfsup.baseline import BaselineConfig, track
    from stages.selfsup.label import build_energy, estimate_donning, fit_initial_appearance
    from stages.selfsup.stage import load_pool, neutral_frames
    from storage.capture import Capture

    cap = Capture.open(capture_dir)
    names, pool = load_pool(cap, cfg)
    energy = build_energy(cap, rig, texture, names, cfg)
    donning = estimate_donning(energy, pool, neutral_frames(pool, cfg.appearance_frames))
    fit_initial_appearance(energy, pool, cfg, flat_seed=texture is None, donning=donning)
    rec = cap.recording(cap.recordings[0])
    peak = next((s for s in rec.segments if s.kind == "peak"), None)
    centre = (peak.start + peak.end) // 2 if peak else rec.frame_count // 2
    start = int(np.clip(centre - frames // 2, 0, max(0, rec.frame_count - frames)))
    rows = np.arange(start, min(start + frames, rec.frame_count))
    w0, c0 = time.perf_counter(), time.process_time()
    fitted = track(energy, pool, BaselineConfig(use_keypoints=cfg.keypoints), rows, donning)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    definition = rig.definition
    regressed = definition.indices(list(definition.regressed))
    names_reg = tuple(definition.regressed)
    true_b = truth.hmc(rec.name)["b"][rows][:, regressed]
    cnn_b = cnn_labels.b[cnn_labels.rows(rec.name)][rows][:, regressed]
    t = cnn_labels.timings
    infer_s = t.get("infer_s", float("nan")) / max(1, len(cnn_labels.b))
    total_s = sum(t.get(k, 0.0) for k in ("donning_s", "appearance_s", "train_s", "infer_s")) / max(1, len(cnn_labels.b))

    true_t = truth.hmc(rec.name)["head_t"][rows]
    cnn_t = cnn_labels.head_t[cnn_labels.rows(rec.name)][rows]

    def figures(b: np.ndarray, t: np.ndarray) -> dict:
        return {"blendshape_mae": float(np.abs(b - true_b).mean()),
                "active_mae": active_mae(b, true_b, names_reg).mae,
                "head_translation_error_mm": float(np.linalg.norm(t - true_t, axis=1).mean() * 1000)}

    return {"frames": len(rows), "baseline_wall_s": wall, "baseline_cpu_s": cpu,
            "baseline_fps": len(rows) / wall, "cnn_inference_fps": 1.0 / infer_s if infer_s > 0 else None,
            "cnn_fps_with_training": 1.0 / total_s if total_s > 0 else None,
            "baseline": figures(fitted.b, fitted.translation), "cnn": figures(cnn_b, cnn_t)}


def main() -> None:
    from pipeline.config import with_overrides
    from stages.selfsup.stage import SelfSupConfig
    from stages.synthesis.truth import SubjectTruth

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--runs", type=Path)
    p.add_argument("--subjects", type=int, default=3)
    p.add_argument("--variants", default="cnn,no_keypoints,embedded")
    p.add_argument("--baseline-frames", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="selfsup.FIELD=VALUE for every variant")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "selfsup.json")
    a = p.parse_args()

    @dataclasses.dataclass(frozen=True)
    class _Section:
        selfsup: SelfSupConfig = SelfSupConfig()

    base = with_overrides(_Section(), dict(s.split("=", 1) for s in a.set)).selfsup
    captures = sorted(d for d in (a.data / "captures").iterdir() if d.is_dir())[: a.subjects]
    result = {"command": "python -m benchmarks.bench_selfsup " + " ".join(sys.argv[1:]),
              "data": str(a.data), "machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()[0]},
              "config": dataclasses.asdict(base), "subjects": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result["truth"] = truth_ceiling(a.data, [c.name for c in captures], work)
        for capture_dir in captures:
            truth = SubjectTruth.open(a.data / "ground_truth" / capture_dir.name)
            rig, texture, source = _personal(a.runs, capture_dir.name, truth)
            entry = {"rig": source, "variants": {}}
            if source == "chain":
                entry["rig_floor"] = rig_floor(capture_dir, a.data, rig, work / capture_dir.name / "rig_floor")
            for name in a.variants.split(","):
                cfg = dataclasses.replace(base, **variant_fields(name))
                scored = label_and_score(capture_dir, a.data, cfg, rig, texture, work / capture_dir.name / name)
                labels = scored.pop("labels")
                entry["variants"][name] = scored
                print(capture_dir.name, name, json.dumps(scored["metrics"].get("self_supervision/0", {}))[:600])
                if name == "cnn" and a.baseline_frames:
                    entry["baseline"] = baseline_comparison(capture_dir, truth, rig, texture, cfg, labels,
                                                            a.baseline_frames)
                a.out.parent.mkdir(parents=True, exist_ok=True)
                result["subjects"][capture_dir.name] = entry
                a.out.write_text(json.dumps(result, indent=1, default=float))
    result["machine"]["load_after"] = os.getloadavg()[0]
    a.out.write_text(json.dumps(result, indent=1, default=float))
    print(a.out)


if __name__ == "__main__":
    main()
