"""Benchmark of the label table (storage.label_table) on the local filesystem.

Measures, for both layouts (partitioned by ``subject_id`` and unpartitioned):

- write throughput of :meth:`LabelTable.write_subject_round` (one commit per subject of
  ``frames`` x 53 blendshapes) into a fresh table, and of relabelling (replace) them;
- latency of reading one subject (fresh ``LabelTable``, so table open included) from a
  ``n_big``-subject table, median of ``repeats`` different subjects; baseline = a full
  table scan in the same run.

Run: ``.venv/bin/python -m benchmarks.bench_label_table [--quick] [--workdir DIR]``.
Writes ``benchmarks/results/label_table.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from storage import delta
from storage.label_table import LabelTable, labels_to_arrow, writer_properties

#: The default rig's 53 names (docs/contracts.md); copied so the benchmark does not depend
#: on rigs/ being importable.
NAMES = [
    "browDown_L",
    "browDown_R",
    "browInnerUp_L",
    "browInnerUp_R",
    "browOuterUp_L",
    "browOuterUp_R",
    "cheekPuff_L",
    "cheekPuff_R",
    "cheekSquint_L",
    "cheekSquint_R",
    "eyeBlink_L",
    "eyeBlink_R",
    "eyeLookDown_L",
    "eyeLookDown_R",
    "eyeLookIn_L",
    "eyeLookIn_R",
    "eyeLookOut_L",
    "eyeLookOut_R",
    "eyeLookUp_L",
    "eyeLookUp_R",
    "eyeSquint_L",
    "eyeSquint_R",
    "eyeWide_L",
    "eyeWide_R",
    "jawForward",
    "jawLeft",
    "jawOpen",
    "jawRight",
    "mouthClose",
    "mouthDimple_L",
    "mouthDimple_R",
    "mouthFrown_L",
    "mouthFrown_R",
    "mouthFunnel",
    "mouthLeft",
    "mouthLowerDown_L",
    "mouthLowerDown_R",
    "mouthPress_L",
    "mouthPress_R",
    "mouthPucker",
    "mouthRight",
    "mouthRollLower",
    "mouthRollUpper",
    "mouthShrugLower",
    "mouthShrugUpper",
    "mouthSmile_L",
    "mouthSmile_R",
    "mouthStretch_L",
    "mouthStretch_R",
    "mouthUpperUp_L",
    "mouthUpperUp_R",
    "noseSneer_L",
    "noseSneer_R",
]

RESULTS = Path(__file__).parent / "results" / "label_table.json"
#: Write benchmark: the two partitioning choices.
LAYOUTS = {"partitioned": ["subject_id"], "unpartitioned": None}
#: Read benchmark tables: (partition_by, how it is filled).
READ_TABLES = {
    "partitioned, backfill": (["subject_id"], "batch"),
    "unpartitioned, backfill": (None, "batch"),
    "unpartitioned, 1 commit/subject": (None, "per_subject"),
}


def synth_subject(subject_id: str, frames: int, rng: np.random.Generator, run_id: str) -> pa.Table:
    """Random but schema-valid labels of one subject (one recording of ``frames`` steps)."""
    q = rng.normal(size=(frames, 4))
    q[:, 0] = np.abs(q[:, 0]) + 1.0
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return labels_to_arrow(
        subject_id,
        "rec000",
        np.arange(frames),
        np.arange(frames, dtype=np.int64) * 33_333_333,
        rng.random((frames, len(NAMES)), dtype=np.float32),
        rng.normal(scale=0.2, size=(frames, 4)),
        q,
        rng.normal(scale=0.01, size=(frames, 3)),
        blendshape_names=NAMES,
        confidence=rng.random(frames),
        residual_keypoint_px=rng.random(frames),
        residual_photometric=rng.random(frames),
        label_source="self_supervision",
        label_round=0,
        pipeline_version="bench",
        rig_version="ict-53",
        run_id=run_id,
    )


def bench_writes(uri: str, n: int, frames: int, partition_by: list[str] | None) -> dict:
    """Write n subjects one commit each, then relabel them all; rows/s of both."""
    rng = np.random.default_rng(0)
    tables = [synth_subject(f"w{i:05d}", frames, rng, "r0") for i in range(n)]
    relabels = [synth_subject(f"w{i:05d}", frames, rng, "r1") for i in range(n)]
    lt = LabelTable(uri, partition_by=partition_by)
    out = {}
    for phase, batch in (("write", tables), ("replace", relabels)):
        lat = []
        t0 = time.perf_counter()
        for t in batch:
            s = time.perf_counter()
            lt.write_subject_round(t)
            lat.append(time.perf_counter() - s)
        dt = time.perf_counter() - t0
        out[f"{phase}_rows_per_s"] = n * frames / dt
        out[f"{phase}_commit_median_ms"] = 1e3 * statistics.median(lat)
    assert lt.read().num_rows == n * frames
    return out


def build_big(uri: str, n: int, frames: int, batch: int, partition_by, how: str) -> dict:
    """Fill a table with n subjects: ``batch`` subjects per append commit (a backfill) or
    one write_subject_round commit per subject (what labelling runs do)."""
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    if how == "batch":
        for start in range(0, n, batch):
            stop = min(n, start + batch)
            part = [synth_subject(f"s{i:05d}", frames, rng, "big") for i in range(start, stop)]
            delta.append_rows(
                uri, pa.concat_tables(part), partition_by=partition_by,
                writer_properties=writer_properties(),
            )  # fmt: skip
    else:
        lt = LabelTable(uri, partition_by=partition_by)
        for i in range(n):
            lt.write_subject_round(synth_subject(f"s{i:05d}", frames, rng, "big"))
    return {
        "build_s": time.perf_counter() - t0,
        "build_commits": delta.table_version(uri) + 1,
        **disk(uri),
    }


def disk(uri: str) -> dict:
    """Data files referenced by the current version and their size."""
    from deltalake import DeltaTable

    files = DeltaTable(uri).file_uris()
    return {"data_files": len(files), "bytes_on_disk": sum(Path(f).stat().st_size for f in files)}


def bench_reads(uri: str, n: int, frames: int, repeats: int) -> dict:
    """Median latency of reading one subject (fresh handle each time) vs a full scan."""
    rng = np.random.default_rng(2)
    picks = rng.choice(n, size=repeats, replace=False)
    lat = []
    for i in picks:
        s = time.perf_counter()
        t = LabelTable(uri).read(subject_id=f"s{i:05d}")
        lat.append(time.perf_counter() - s)
        assert t.num_rows == frames, (t.num_rows, frames)
    scans = []
    for _ in range(3):
        s = time.perf_counter()
        t = LabelTable(uri).read()
        scans.append(time.perf_counter() - s)
        assert t.num_rows == n * frames
        del t
    return {
        "read_one_median_ms": 1e3 * statistics.median(lat),
        "read_one_min_ms": 1e3 * min(lat),
        "full_scan_median_ms": 1e3 * statistics.median(scans),
        "speedup_vs_scan": statistics.median(scans) / statistics.median(lat),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run, ~seconds)")
    ap.add_argument("--workdir", default=None, help="where to build tables (default: a temp dir)")
    ap.add_argument("--out", default=str(RESULTS), help="JSON output path")
    args = ap.parse_args(argv)

    cfg = (
        {"frames": 90, "n_write": 5, "n_big": 300, "batch": 100, "repeats": 5}
        if args.quick
        else {"frames": 900, "n_write": 40, "n_big": 5000, "batch": 250, "repeats": 9}
    )
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_label_table_"))
    root.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "config": {**cfg, "blendshapes": len(NAMES), "quick": args.quick},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "writes": {},
        "reads": {},
    }
    try:
        for layout, pb in LAYOUTS.items():
            uri = str(root / f"w_{layout}")
            results["writes"][layout] = bench_writes(uri, cfg["n_write"], cfg["frames"], pb)
        for i, (name, (pb, how)) in enumerate(READ_TABLES.items()):
            uri = str(root / f"big_{i}")
            res = build_big(uri, cfg["n_big"], cfg["frames"], cfg["batch"], pb, how)
            res.update(bench_reads(uri, cfg["n_big"], cfg["frames"], cfg["repeats"]))
            results["reads"][name] = res
            if how == "per_subject":
                t0 = time.perf_counter()
                LabelTable(uri).optimize()
                res = {"optimize_s": time.perf_counter() - t0, **disk(uri)}
                res.update(bench_reads(uri, cfg["n_big"], cfg["frames"], cfg["repeats"]))
                results["reads"][name + " + optimize (z-order)"] = res
            print(name, json.dumps(results["reads"][name]), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return results


def markdown(results: dict) -> str:
    """Render the results as two markdown tables (writes, reads)."""
    c = results["config"]
    lines = [
        f"Writes: one `write_subject_round` commit per subject of {c['frames']} frames x "
        f"{c['blendshapes']} blendshapes, {c['n_write']} subjects into a fresh table, "
        "then each relabelled (replace).",
        "",
        "| layout | write rows/s | write commit ms (median) | replace rows/s "
        "| replace commit ms (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results["writes"].items():
        lines.append(
            f"| {name} | {r['write_rows_per_s']:,.0f} | {r['write_commit_median_ms']:.1f} "
            f"| {r['replace_rows_per_s']:,.0f} | {r['replace_commit_median_ms']:.1f} |"
        )
    lines += [
        "",
        f"Reads: one subject from a {c['n_big']}-subject table "
        f"({c['n_big'] * c['frames']:,} rows), fresh `LabelTable(...).read(subject_id=...)` "
        f"(table open included), median of {c['repeats']}; baseline = full-table read, "
        "median of 3, same run.",
        "",
        "| table | read 1 subject ms | full scan ms (baseline) | speed-up | data files "
        "| MB on disk |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["reads"].items():
        lines.append(
            f"| {name} | {r['read_one_median_ms']:.1f} | {r['full_scan_median_ms']:,.0f} "
            f"| {r['speedup_vs_scan']:.0f}x | {r['data_files']} | {r['bytes_on_disk'] / 1e6:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
