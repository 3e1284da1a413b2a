"""Round 0 of finished ``pgt label`` runs on several subjects, scored as the product makes it.

Run::

    python -m benchmarks.bench_standard_labels --data STD [STD2 ...] --runs RUNS
        [--out benchmarks/results/selfsup_standard.json]

Each ``STD`` is a ``pgt synth`` output (``captures/``, ``ground_truth/``); ``RUNS/<subject>``
is the output root of ``pgt label STD/captures/<subject> --out RUNS/<subject>``. For every
subject with such a run, its label table is scored by the metrics job with the run's own
personal rig (``pgt metrics ... --run``), beside the two trivial labellers, the truth's own
scores (its true rig: the §5.1 ceiling) and the truth's labels through the chain's rig (what
the phone chain's rig alone costs). The round-0 timings and diagnostics come from the
``selfsup`` artifact. A run made before the stage smoothed its labels over time (its
recorded config has no ``temporal_sigma_frames``) is scored as it is and, beside it, with
the default smoothing applied to its blendshapes offline (benchmarks/smooth_labels.py).
The mean over subjects of every figure is the benchmark's headline.

``--merge`` keeps the subjects already in ``--out`` that this call does not score (each
entry names its own data, run, command and date), so that subjects labelled on different
days, or on different machines, add up to one result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run_config(run: Path) -> dict:
    """The ``selfsup`` section of the newest run record under ``run`` that has one."""
    from pipeline.status import latest_run

    record = latest_run(str(run)) or {}
    return dict((record.get("config") or {}).get("selfsup") or {})


def score(labels_uri: str, data: Path, work: Path, *, rig_run: str = "", rig_dir: str = "",
          trivial: bool = True) -> dict:
    """{group: {metric: value}} of a label table, per-basis metrics under
    ``{group: {"per_basis": {metric: {basis: value}}}}``."""
    from benchmarks.bench_selfsup import _summaries
    from workflows.metrics import MetricsJob, run_metrics

    metrics = run_metrics(MetricsJob(labels=labels_uri, captures=str(data / "captures"),
                                     truth=str(data / "ground_truth"), rig_run=rig_run, rig_dir=rig_dir,
                                     out=str(work / "metrics"), trivial=trivial))
    return {group: split_per_basis(values) for group, values in _summaries(metrics).items()}


def split_per_basis(values: dict) -> dict:
    """{metric: value, "per_basis": {metric: {basis: value}}} from flat ``metric/basis`` keys."""
    out: dict = {k: v for k, v in values.items() if "/" not in k}
    per_basis: dict = {}
    for key, v in values.items():
        if "/" in key:
            metric, basis = key.split("/", 1)
            per_basis.setdefault(metric, {})[basis] = v
    if per_basis:
        out["per_basis"] = per_basis
    return out


def truth_rows_table(data: Path, subject: str, uri: Path) -> str:
    """A label table of the subject's true labels alone (returns its URI)."""
    from storage.label_table import LabelTable

    rows = LabelTable(str(data / "ground_truth" / "labels")).read(subject_id=subject)
    LabelTable(str(uri)).write_subject_round(rows)
    return str(uri)


def score_subject(data: Path, run: Path, subject: str, work: Path) -> dict:
    """Every figure of one subject's run (see the module docstring)."""
    from benchmarks.bench_selfsup import rig_floor
    from benchmarks.smooth_labels import smoothed_table
    from pipeline.outputs import RunOutputs
    from stages.rigging import rig_from_run
    from stages.selfsup.stage import SelfSupConfig, SelfSupLabels
    from storage import delta
    from storage.label_table import LabelTable

    outputs = RunOutputs(str(run))
    labels = SelfSupLabels.from_output(outputs.load("selfsup", subject))
    config = run_config(run)
    entry = {"data": str(data), "run": str(run), "frames": int(len(labels.b)), "selfsup_config": config,
             "timings_s": labels.timings, "round0_s": float(sum(labels.timings.values())),
             "diagnostics": labels.diagnostics,
             "labels": score(str(run / "tables" / "labels"), data, work / "labels", rig_run=str(run))}
    truth_uri = truth_rows_table(data, subject, work / "truth_labels")
    entry["truth"] = score(truth_uri, data, work / "truth", trivial=False)
    floor = rig_floor(data / "captures" / subject, data, rig_from_run(outputs, subject), work / "floor")
    entry["truth_through_chain_rig"] = {"truth": {k: v for k, v in floor.items() if "/" not in k}}
    rigs = work / "floor" / "rigs"
    if "temporal_sigma_frames" not in config:
        sigma = SelfSupConfig().temporal_sigma_frames
        rows = delta.read_rows(str(run / "tables" / "labels"))
        smoothed = work / "smoothed_labels"
        LabelTable(str(smoothed)).write_subject_round(smoothed_table(rows, sigma))
        entry["smoothed_offline"] = {"sigma_frames": sigma, **score(str(smoothed), data, work / "smoothed",
                                                                      rig_dir=str(rigs), trivial=False)}
    return entry


def product(entry: dict) -> dict:
    """The subject's round-0 figures as the current defaults give them (offline smoothing
    applied to a run made before it was the default)."""
    labels = entry["labels"]["self_supervision/0"]
    smoothed = entry.get("smoothed_offline", {}).get("self_supervision/0")
    return smoothed or labels


def mean_over_subjects(subjects: dict) -> dict:
    """{column: {metric: mean over subjects}} for round 0 (as defaults), the trivial
    labellers, the truth and the truth through the chain rig; plus round-0 seconds."""
    columns = {
        "round0": [product(e) for e in subjects.values()],
        "trivial_zeros": [e["labels"]["trivial_zeros"] for e in subjects.values()],
        "trivial_prior": [e["labels"]["trivial_prior"] for e in subjects.values()],
        "truth": [next(iter(e["truth"].values())) for e in subjects.values()],
        "truth_through_chain_rig": [next(iter(e["truth_through_chain_rig"].values())) for e in subjects.values()],
    }
    out = {name: {m: float(np.mean([v[m] for v in values if v.get(m) is not None]))
                  for m in values[0] if m != "per_basis"} for name, values in columns.items() if values}
    out["round0_per_basis"] = mean_per_basis([product(e) for e in subjects.values()])
    out["round0_s"] = float(np.mean([e["round0_s"] for e in subjects.values()]))
    return out


def mean_per_basis(groups: list[dict]) -> dict:
    """{metric: {basis: mean over the groups that rate the basis}} of their ``per_basis``."""
    values: dict = {}
    for group in groups:
        for metric, per_basis in group.get("per_basis", {}).items():
            for basis, v in per_basis.items():
                if v is not None:
                    values.setdefault(metric, {}).setdefault(basis, []).append(v)
    return {metric: {basis: float(np.mean(v)) for basis, v in sorted(bases.items())}
            for metric, bases in values.items()}


def kept_subjects(out: Path) -> dict:
    """The per-subject entries of an earlier result, each tagged with the command that scored it."""
    if not out.exists():
        return {}
    earlier = json.loads(out.read_text())
    return {name: {**entry, "scored": entry.get("scored") or {"command": earlier.get("command", "")}}
            for name, entry in earlier.get("subjects", {}).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, nargs="+", required=True)
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "selfsup_standard.json")
    p.add_argument("--merge", action="store_true",
                   help="keep the subjects already in --out that this call does not score")
    a = p.parse_args()
    command = "python -m benchmarks.bench_standard_labels " + " ".join(sys.argv[1:])
    result = {"command": command, "machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()[0]},
              "subjects": {}}
    kept = kept_subjects(a.out) if a.merge else {}
    for data in a.data:
        for capture in sorted(d for d in (data / "captures").iterdir() if d.is_dir()):
            run = a.runs / capture.name
            if not (run / "tables" / "labels").exists():
                print(f"{capture.name}: no finished pgt label run in {run}; skipped")
                continue
            with tempfile.TemporaryDirectory() as tmp:
                entry = score_subject(data, run, capture.name, Path(tmp))
            entry["scored"] = {"command": command, "date": time.strftime("%Y-%m-%d")}
            result["subjects"][capture.name] = entry
            print(capture.name, json.dumps(product(entry))[:400])
    for name, entry in kept.items():
        result["subjects"].setdefault(name, entry)
    if not result["subjects"]:
        raise SystemExit(f"no subject of {[str(d) for d in a.data]} has a finished run under {a.runs}")
    result["mean"] = mean_over_subjects(result["subjects"])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1, default=float))
    print(a.out)


if __name__ == "__main__":
    main()
