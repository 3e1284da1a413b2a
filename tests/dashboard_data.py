"""Tables for the dashboard's tests, screenshots and benchmark (not product code).

The chain does not label HMC frames yet, so the "product" labels here are a stand-in
labeller: each subject's true labels degraded by a known, per-subject amount (muted
amplitude, noise, a few frames rejected with a reason), written as source
``self_supervision`` round 0, and optionally round 1 of ``distillation`` with half the
degradation. Their metrics are scored by the real metrics job against the truth, so the
dashboard's numbers are checkable against the metrics table, and the worst subject is
known: the one with the largest ``severity``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.label_table import BS_PREFIX, LabelTable

#: The stand-in's source and round (a non-reference group: the dashboard's "product").
STAND_IN = ("self_supervision", 0)
DISTILLED = ("distillation", 1)


def degrade(rows: pa.Table, severity: float, seed: int, source: str, rnd: int) -> pa.Table:
    """The truth rows of one subject degraded by ``severity`` in [0, 1]: blendshapes
    scaled by (1 - 0.5 severity) plus N(0, 0.05 severity) noise, confidence 1 - the
    frame's mean change, and every 40th frame from 7 on ``rejected`` when severity > 0.5."""
    rng = np.random.default_rng(seed)
    cols = {name: rows.column(name) for name in rows.column_names}
    bs = [c for c in rows.column_names if c.startswith(BS_PREFIX)]
    b = np.column_stack([rows.column(c).to_numpy().astype(np.float64) for c in bs])
    noisy = np.clip(b * (1 - 0.5 * severity) + rng.normal(0, 0.05 * severity, b.shape), 0, 1)
    for k, c in enumerate(bs):
        cols[c] = pa.array(noisy[:, k].astype(np.float32))
    frames = rows.column("frame_index").to_numpy()
    status = np.where((severity > 0.5) & (frames % 40 == 7), "rejected", "ok")
    cols["status"] = pa.array(status)
    cols["failure_reason"] = pa.array([None if s == "ok" else "stand-in: keypoints lost" for s in status], pa.string())
    cols["confidence"] = pa.array((1 - np.abs(noisy - b).mean(axis=1) * 5).clip(0, 1).astype(np.float32))
    cols["label_source"] = pa.array([source] * rows.num_rows)
    cols["label_round"] = pa.array([rnd] * rows.num_rows, pa.int16())
    cols["run_id"] = pa.array([f"stand-in-{source}-{rnd}"] * rows.num_rows)
    return pa.table([cols[n] for n in rows.column_names], schema=rows.schema)


def write_stand_in_labels(truth_labels: str, out_labels: str, severities: dict[str, float],
                          groups: Sequence[tuple[str, int]] = (STAND_IN,)) -> None:
    """Writes the truth's rows and the stand-in's groups into a new label table."""
    truth = LabelTable(truth_labels).read()
    table = LabelTable(out_labels)
    for i, subject in enumerate(sorted(severities)):
        rows = truth.filter(pc.equal(truth["subject_id"], subject))
        table.write_subject_round(rows)
        for j, (source, rnd) in enumerate(groups):
            scale = severities[subject] / (1 + j)
            table.write_subject_round(degrade(rows, scale, 100 * i + j, source, rnd))


def build_dashboard_tables(synth: Path, out: Path, severities: dict[str, float] | None = None,
                           groups: Sequence[tuple[str, int]] = (STAND_IN,)) -> dict[str, str]:
    """Label and metrics tables of ``synth`` (``pgt synth`` output) under ``out``:
    {"labels", "metrics", "captures", "truth"} paths for DashboardSources."""
    from workflows.metrics import MetricsJob, run_metrics

    subjects = sorted(p.name for p in (synth / "captures").iterdir())
    severities = severities or {s: (i + 1) / len(subjects) for i, s in enumerate(subjects)}
    labels = str(out / "tables" / "labels")
    write_stand_in_labels(str(synth / "ground_truth" / "labels"), labels, severities, groups)
    run_metrics(MetricsJob(labels=labels, captures=str(synth / "captures"), truth=str(synth / "ground_truth"),
                           run_id="dashboard-test"))
    return {"labels": labels, "metrics": str(out / "tables" / "metrics"), "captures": str(synth / "captures"),
            "truth": str(synth / "ground_truth")}


def run_validation(captures: Sequence[Path], out: Path) -> None:
    """A real run of the chain's first stage (``validate``, shallow) in one thread: it
    writes the run, plan and failure records the coverage and failure views read; a
    capture folder without ``capture.json`` becomes a failure record."""
    from dataclasses import replace

    from pipeline.dag import run_chain
    from pipeline.stage import Chain
    from workflows.chain import STAGES
    from workflows.config import RunConfig

    config = RunConfig()
    config = replace(config, validate=replace(config.validate, deep=False))
    run_chain(list(captures), str(out), config, chain=Chain((STAGES[0],)), workers=1, processes=False,
              progress=False, report=False)


def dashboard_sources(synth: Path, out: Path, groups: Sequence[tuple[str, int]] = (STAND_IN, DISTILLED)) -> Any:
    """DashboardSources of ``synth``: a validation run over its captures plus one broken
    capture, and the stand-in's label and metrics tables."""
    from workflows.dashboard.data import DashboardSources

    broken = out / "broken-captures" / "synth-broken"
    broken.mkdir(parents=True, exist_ok=True)
    run_validation([*sorted((synth / "captures").iterdir()), broken], out)
    paths = build_dashboard_tables(synth, out, groups=groups)
    return DashboardSources(out=str(out), **paths)
