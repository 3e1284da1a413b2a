"""Rescores a run's round-0 labels with the stage's temporal smoothing at several widths.

Run::

    python -m benchmarks.smooth_labels --data SYNTH --run RUN --sigmas 0 0.7 1.0 1.5

``SYNTH`` is the ``pgt synth`` output the run labelled (captures/, ground_truth/), ``RUN``
the ``pgt label`` / ``pgt backfill`` output root. Each recording's blendshape columns are
smoothed with :func:`stages.selfsup.temporal.smooth_frames` (the function the selfsup stage
applies after inference, over the frames whose status is ok) and the result is scored by
the metrics job with the run's own rigs (docs/selfsup.md, "Temporal smoothing").
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KEYS = ("smoothness", "active_mae", "amplitude_ratio", "eye_closure", "semantic_accuracy", "neutralness",
        "blendshape_mae", "expression_mesh_error_active_mm")


def smoothed_table(rows: pa.Table, sigma: float) -> pa.Table:
    """The label rows with each (subject, recording)'s blendshapes smoothed over time."""
    from stages.selfsup.temporal import smooth_frames
    from storage.label_table import blendshape_names_of

    columns = [f"bs_{n}" for n in blendshape_names_of(rows.schema)]
    parts = []
    for subject in pc.unique(rows.column("subject_id")).to_pylist():
        of_subject = rows.filter(pc.equal(rows.column("subject_id"), subject))
        for recording in pc.unique(of_subject.column("recording_id")).to_pylist():
            t = of_subject.filter(pc.equal(of_subject.column("recording_id"), recording)).sort_by("frame_index")
            ok = np.asarray(t.column("status").to_pylist()) == "ok" if "status" in t.schema.names else np.ones(len(t), bool)
            b = smooth_frames(np.stack([t.column(c).to_numpy() for c in columns], 1), ok, sigma)
            for k, c in enumerate(columns):
                i = t.schema.get_field_index(c)
                t = t.set_column(i, t.schema.field(i), pa.array(b[:, k].astype(np.float32)))
            parts.append(t)
    return pa.concat_tables(parts)


def main() -> None:
    from storage import delta
    from storage.label_table import LabelTable
    from workflows.metrics import MetricsJob, run_metrics

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.7, 1.0, 1.5])
    a = p.parse_args()
    rows = delta.read_rows(str(a.run / "tables" / "labels"))
    print("| sigma | " + " | ".join(KEYS) + " |\n|---" * 1 + "|---" * len(KEYS) + "|")
    for sigma in a.sigmas:
        table = smoothed_table(rows, sigma)
        with tempfile.TemporaryDirectory() as tmp:
            labels = LabelTable(f"{tmp}/labels")
            for subject in pc.unique(table.column("subject_id")).to_pylist():
                labels.write_subject_round(table.filter(pc.equal(table.column("subject_id"), subject)))
            (summary,) = run_metrics(MetricsJob(labels=f"{tmp}/labels", captures=str(a.data / "captures"),
                                                truth=str(a.data / "ground_truth"), rig_run=str(a.run),
                                                out=f"{tmp}/metrics", trivial=False)).values()
        print(f"| {sigma:g} | " + " | ".join(f"{summary.dataset[k].value:.3f}" for k in KEYS) + " |", flush=True)


if __name__ == "__main__":
    main()
