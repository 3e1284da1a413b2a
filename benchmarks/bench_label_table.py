"""Benchmark of the label table's layouts (storage.label_table) on the local filesystem.

Every layout is measured the same way, on a table that has been COMPACTED by that
layout's maintenance (what a table looks like after a labelling run):

- build: ``n`` subjects, each ``frames`` HMC time steps x 53 blendshapes in 4 recordings,
  appended ``batch`` subjects per commit in two commits (recordings 0-1, then 2-3), so a
  subject starts in two files, as after two writes; then the maintenance (timed);
- replace one subject: one relabel of one subject (fresh table handle, so table open
  included), median over ``repeats`` different subjects, with the files the commit
  removed/added and the rows of OTHER subjects it had to copy;
- two concurrent writers: two spawned processes, released by a barrier, each relabelling
  ``concurrent`` different subjects; conflicts = commits that lost a race and were
  retried by storage.delta (its "lost a race" log records), plus delta-rs's own
  version-collision retries (``num_retries``), and the wall time;
- read one subject: fresh ``read(subject_id=...)``, median over 9 subjects;
- full scan: read every row, median of ``scans``.

The layouts (``LAYOUTS``) are the old one (label schema v1, unpartitioned, Z-ordered by
``subject_id``), plain compaction of the unpartitioned table, hash buckets
(``subject_bucket = crc32(subject_id) % buckets``), and the product's v2 layout
(partitioned by ``subject_partition``, one file per subject, written through
:class:`LabelTable`). The option comparison runs at ``--options-subjects``; the headline
compares the old and the product layout on ``--subjects`` subjects in the same run.
``deletion_vectors`` records whether deltalake writes deletion vectors for a replace.

Run: ``python -m benchmarks.bench_label_table [--quick]``; writes
``benchmarks/results/label_table.json`` (then ``python -m benchmarks.report``).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from deltalake import WriterProperties

from storage import delta
from storage.label_table import (
    COMPRESSION,
    PARTITION_COLUMN,
    ROW_GROUP_ROWS,
    TABLE_PROPERTIES,
    LabelTable,
    labels_to_arrow,
)

#: The default rig's 53 names (docs/contracts.md); copied so the benchmark does not depend
#: on rigs/ being importable.
NAMES = """browDown_L browDown_R browInnerUp_L browInnerUp_R browOuterUp_L browOuterUp_R
cheekPuff_L cheekPuff_R cheekSquint_L cheekSquint_R eyeBlink_L eyeBlink_R eyeLookDown_L
eyeLookDown_R eyeLookIn_L eyeLookIn_R eyeLookOut_L eyeLookOut_R eyeLookUp_L eyeLookUp_R
eyeSquint_L eyeSquint_R eyeWide_L eyeWide_R jawForward jawLeft jawOpen jawRight mouthClose
mouthDimple_L mouthDimple_R mouthFrown_L mouthFrown_R mouthFunnel mouthLeft mouthLowerDown_L
mouthLowerDown_R mouthPress_L mouthPress_R mouthPucker mouthRight mouthRollLower
mouthRollUpper mouthShrugLower mouthShrugUpper mouthSmile_L mouthSmile_R mouthStretch_L
mouthStretch_R mouthUpperUp_L mouthUpperUp_R noseSneer_L noseSneer_R""".split()  # noqa: SIM905

RESULTS = Path(__file__).parent / "results" / "label_table.json"
RECORDINGS = 4  # the standard preset: 4 HMC recordings of 16.5 s at 30 fps = 495 frames each
KEY = {"label_round": 0, "label_source": "self_supervision"}


@dataclass(frozen=True)
class Layout:
    """One way of storing the label table.

    Attributes:
        name: label in the results.
        rows: ``"v1"`` (label schema v1: no partition column), ``"v2"`` (current schema)
            or ``"bucket"`` (v1 columns plus an int16 ``subject_bucket``).
        partition_by: Delta partition columns.
        maintenance: ``"zorder"`` (optimize Z-ordered by subject_id) or ``"compact"``
            (optimize's bin-packing, which never merges partitions).
        product: written, compacted and read through :class:`LabelTable` (the v2 code).
        buckets: number of hash buckets (``rows="bucket"`` only).
        compression: Parquet codec of the files (the old layout used ZSTD).
    """

    name: str
    rows: str
    partition_by: tuple[str, ...] | None
    maintenance: str
    product: bool = False
    buckets: int = 0
    compression: str = COMPRESSION

    def writer_properties(self) -> WriterProperties:
        return WriterProperties(max_row_group_size=ROW_GROUP_ROWS, compression=self.compression)


OLD = Layout("old: v1, unpartitioned, z-order (ZSTD)", "v1", None, "zorder", compression="ZSTD")
PRODUCT = Layout(
    "v2: partitioned by subject, compact", "v2", (PARTITION_COLUMN,), "compact", product=True
)
LAYOUTS = {
    "old": OLD,
    "compact": Layout("v1, unpartitioned, plain compact", "v1", None, "compact"),
    "bucket": Layout(
        "hash buckets (64), compact", "bucket", ("subject_bucket",), "compact", buckets=64
    ),
    "product": PRODUCT,
}


def subject_id(i: int) -> str:
    return f"s{i:05d}"


def bucket_of(sid: str, buckets: int) -> int:
    """Stable across processes and Python versions (unlike hash())."""
    return zlib.crc32(sid.encode()) % buckets


def synth_recording(sid: str, rec: int, frames: int, rng: np.random.Generator, run_id: str):
    """Random but schema-valid v2 labels of one recording."""
    q = rng.normal(size=(frames, 4))
    q[:, 0] = np.abs(q[:, 0]) + 1.0
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return labels_to_arrow(
        sid,
        f"rec{rec:03d}",
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
        pipeline_version="bench",
        rig_version="ict-53",
        run_id=run_id,
        **KEY,
    )


def shape_rows(layout: Layout, t: pa.Table) -> pa.Table:
    """v2 rows -> the layout's rows."""
    if layout.rows == "v2":
        return t
    t = t.drop_columns([PARTITION_COLUMN])
    if layout.rows == "bucket":
        b = [bucket_of(s, layout.buckets) for s in t.column("subject_id").to_pylist()]
        t = t.append_column("subject_bucket", pa.array(b, pa.int16()))
    return t


def subject_rows(layout: Layout, sid: str, frames: int, seed: int, run_id: str) -> pa.Table:
    rng = np.random.default_rng([seed, int(sid[1:])])
    per = frames // RECORDINGS
    recs = [synth_recording(sid, r, per, rng, run_id) for r in range(RECORDINGS)]
    return shape_rows(layout, pa.concat_tables(recs))


def replace(layout: Layout, uri: str, rows: pa.Table) -> int:
    """Relabel one subject the way the layout's code does."""
    if layout.product:
        return LabelTable(uri).write_subject_round(rows)
    sid = rows.column("subject_id")[0].as_py()
    pred: dict[str, Any] = {"subject_id": sid, **KEY}
    if layout.rows == "bucket":
        pred = {"subject_bucket": bucket_of(sid, layout.buckets), **pred}
    return delta.replace_rows(uri, rows, pred, writer_properties=layout.writer_properties())


def read_one(layout: Layout, uri: str, sid: str) -> pa.Table:
    if layout.rows == "bucket":
        filters = {"subject_bucket": bucket_of(sid, layout.buckets), "subject_id": sid}
        return delta.read_rows(uri, filters=filters)
    return LabelTable(uri).read(subject_id=sid)  # v1 tables are read (and upgraded) too


def full_scan(layout: Layout, uri: str) -> pa.Table:
    return delta.read_rows(uri) if layout.rows == "bucket" else LabelTable(uri).read()


def build(layout: Layout, uri: str, n: int, frames: int, batch: int) -> dict:
    """n subjects, batch per commit, recordings 0-1 then 2-3 (two files per subject)."""
    t0 = time.perf_counter()
    pb = list(layout.partition_by) if layout.partition_by else None
    for start in range(0, n, batch):
        tables = [
            subject_rows(layout, subject_id(i), frames, 1, "build")
            for i in range(start, min(n, start + batch))
        ]
        recs = pa.concat_tables(tables)
        half = pa.compute.is_in(recs.column("recording_id"), pa.array(["rec000", "rec001"]))
        for part in (recs.filter(half), recs.filter(pa.compute.invert(half))):
            delta.append_rows(
                uri,
                part,
                partition_by=pb,
                writer_properties=layout.writer_properties(),
                configuration=TABLE_PROPERTIES if layout.product else None,
            )
    out = {
        "build_s": time.perf_counter() - t0,
        "files_before_maintenance": len(delta.data_files(uri)),
    }
    t0 = time.perf_counter()
    if layout.product:
        LabelTable(uri).optimize()
    else:
        zorder = ["subject_id"] if layout.maintenance == "zorder" else None
        delta.optimize(uri, zorder_by=zorder, writer_properties=layout.writer_properties())
    out["maintenance_s"] = time.perf_counter() - t0
    files = delta.data_files(uri)
    out["data_files"] = len(files)
    out["bytes_on_disk"] = sum(Path(f).stat().st_size for f in files)
    return out


def commit_metrics(uri: str, version: int) -> dict:
    entry = next(e for e in delta.history(uri) if int(e["version"]) == version)
    m = entry.get("operationMetrics", {})
    return {k: m.get(k) for k in ("num_removed_files", "num_added_files", "num_copied_rows")}


def bench_replace(layout: Layout, uri: str, picks: list[int], frames: int) -> dict:
    lat, touched = [], []
    for i in picks:
        rows = subject_rows(layout, subject_id(i), frames, 2, "relabel")
        t0 = time.perf_counter()
        v = replace(layout, uri, rows)
        lat.append(time.perf_counter() - t0)
        touched.append(commit_metrics(uri, v))
    return {
        "replace_median_ms": 1e3 * statistics.median(lat),
        "replace_min_ms": 1e3 * min(lat),
        "replace_max_ms": 1e3 * max(lat),
        "replace_commits": touched,
    }


class _RaceCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.races = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "lost a race" in record.getMessage():
            self.races += 1


def _writer(
    layout_key: str, uri: str, ids: list[int], frames: int, tag: str, barrier, queue
) -> None:
    """Child process: relabel the given subjects; report conflicts and timings."""
    layout = LAYOUTS[layout_key]
    counter = _RaceCounter()
    log = logging.getLogger("storage.delta")
    log.setLevel(logging.INFO)
    log.addHandler(counter)
    rows = [subject_rows(layout, subject_id(i), frames, 3, tag) for i in ids]
    barrier.wait()
    t0 = time.perf_counter()
    lat, versions = [], []
    for r in rows:
        s = time.perf_counter()
        versions.append(replace(layout, uri, r))
        lat.append(time.perf_counter() - s)
    queue.put(
        {
            "conflicts": counter.races,
            "wall_s": time.perf_counter() - t0,
            "commit_ms": [1e3 * x for x in lat],
            "versions": versions,
        }
    )


def bench_concurrent(layout_key: str, uri: str, pairs: list[tuple[int, int]], frames: int) -> dict:
    """Two processes; writer A relabels pairs[k][0], writer B pairs[k][1], k = 0, 1, ..."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    ids = [[a for a, _ in pairs], [b for _, b in pairs]]
    procs = [
        ctx.Process(
            target=_writer, args=(layout_key, uri, ids[w], frames, f"writer{w}", barrier, queue)
        )
        for w in range(2)
    ]
    for p in procs:
        p.start()
    res = [queue.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    versions = [v for r in res for v in r["versions"]]
    internal = sum(
        int((e.get("operationMetrics") or {}).get("num_retries") or 0)
        for e in delta.history(uri)
        if int(e["version"]) in versions
    )
    layout = LAYOUTS[layout_key]
    for w, group in enumerate(ids):  # each writer's rows are there, once
        for i in group:
            got = read_one(layout, uri, subject_id(i))
            assert got.num_rows == frames, (i, got.num_rows)
            assert set(got.column("run_id").to_pylist()) == {f"writer{w}"}, i
    return {
        "writers": 2,
        "subjects_per_writer": len(pairs),
        "conflicts": sum(r["conflicts"] for r in res),
        "delta_rs_version_retries": internal,
        "wall_s": max(r["wall_s"] for r in res),
        "commit_median_ms": statistics.median([x for r in res for x in r["commit_ms"]]),
    }


def bench_reads(layout: Layout, uri: str, n: int, frames: int, repeats: int, scans: int) -> dict:
    rng = np.random.default_rng(7)
    lat = []
    for i in rng.choice(n, size=repeats, replace=False):
        t0 = time.perf_counter()
        t = read_one(layout, uri, subject_id(int(i)))
        lat.append(time.perf_counter() - t0)
        assert t.num_rows == frames, (t.num_rows, frames)
    full = []
    for _ in range(scans):
        t0 = time.perf_counter()
        t = full_scan(layout, uri)
        full.append(time.perf_counter() - t0)
        assert t.num_rows == n * frames
        del t
    return {
        "read_one_median_ms": 1e3 * statistics.median(lat),
        "full_scan_median_s": statistics.median(full),
        "full_scans": [round(x, 3) for x in full],
    }


def same_bucket_pairs(n: int, buckets: int, k: int, avoid: set[int]) -> list[tuple[int, int]]:
    """k pairs of different subjects that share a hash bucket (the bucket layout's worst
    case; for the other layouts any pair of different subjects is the same case)."""
    by_bucket: dict[int, list[int]] = {}
    for i in range(n):
        if i not in avoid:
            by_bucket.setdefault(bucket_of(subject_id(i), buckets), []).append(i)
    groups = [g for g in by_bucket.values() if len(g) >= 2]
    return [(groups[j][0], groups[j][1]) for j in range(k)]


def run_layout(key: str, root: Path, n: int, frames: int, cfg: dict) -> dict:
    layout = LAYOUTS[key]
    uri = str(root / key)
    t0 = time.perf_counter()
    try:
        res: dict[str, Any] = {"layout": asdict(layout), "subjects": n, "frames": frames}
        res.update(build(layout, uri, n, frames, cfg["batch"]))
        res.update(bench_reads(layout, uri, n, frames, cfg["read_repeats"], cfg["scans"]))
        rng = np.random.default_rng(11)
        picks = [int(i) for i in rng.choice(n, size=cfg["replace_repeats"], replace=False)]
        res.update(bench_replace(layout, uri, picks, frames))
        pairs = same_bucket_pairs(n, LAYOUTS["bucket"].buckets, cfg["concurrent"], set(picks))
        res["concurrent"] = bench_concurrent(key, uri, pairs, frames)
        res["files_after_relabels"] = len(delta.data_files(uri))
    finally:
        shutil.rmtree(uri, ignore_errors=True)
    res["bench_s"] = time.perf_counter() - t0
    print(key, n, json.dumps({k: v for k, v in res.items() if k != "replace_commits"}), flush=True)
    return res


def deletion_vectors_check(root: Path) -> dict:
    """Does deltalake write deletion vectors for a delete or a predicate replace?"""
    from deltalake import DeltaTable, write_deltalake

    uri = str(root / "dv")
    t = pa.table({"s": [f"s{i % 10}" for i in range(1000)], "x": np.arange(1000)})
    write_deltalake(uri, t, configuration={"delta.enableDeletionVectors": "true"})
    delete = DeltaTable(uri).delete("s = 's1'")
    one = t.filter(pa.compute.equal(t.column("s"), "s2"))
    write_deltalake(uri, one, mode="overwrite", predicate="s = 's2'")
    dt = DeltaTable(uri)
    out = {
        "deltalake": __import__("deltalake").__version__,
        "protocol": str(dt.protocol()),
        "delete_metrics": delete,
        "replace_metrics": dt.history(1)[0]["operationMetrics"],
        "deletion_vectors_in_table": dt.deletion_vectors().read_all().num_rows,
    }
    shutil.rmtree(uri, ignore_errors=True)
    return out


def bench_scan_paths(root: Path, n: int, frames: int, repeats: int = 3) -> dict:
    """Full scan of an n-subject, one-file-per-subject table: pyarrow's dataset reader
    against delta-rs's engine (what read_rows uses), for ZSTD and LZ4_RAW files."""
    out: dict[str, Any] = {"subjects": n, "frames": frames}
    for codec in ("ZSTD", "LZ4_RAW"):
        layout = Layout("scan", "v2", (PARTITION_COLUMN,), "compact", compression=codec)
        uri = str(root / f"scan_{codec}")
        for start in range(0, n, 50):
            t = pa.concat_tables(
                [
                    subject_rows(layout, subject_id(i), frames, 1, "x")
                    for i in range(start, start + 50)
                ]
            )
            delta.append_rows(
                uri,
                t,
                partition_by=[PARTITION_COLUMN],
                writer_properties=layout.writer_properties(),
            )
        files = delta.data_files(uri)
        paths = {
            "pyarrow_dataset": lambda u=uri: delta.read_dataset(u).to_table(),
            "delta_rs_engine": lambda u=uri: delta.read_rows(u),
        }
        for name, read in paths.items():
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                assert read().num_rows == n * frames
                times.append(time.perf_counter() - t0)
            out[f"{codec}/{name}_median_s"] = statistics.median(times)
        out[f"{codec}/bytes_on_disk"] = sum(Path(f).stat().st_size for f in files)
        shutil.rmtree(uri, ignore_errors=True)
    print("scan paths", json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--subjects", type=int, default=5000, help="headline table size")
    ap.add_argument("--options-subjects", type=int, default=1000, help="option comparison")
    ap.add_argument("--frames", type=int, default=1980, help="time steps per subject")
    ap.add_argument("--skip-options", action="store_true")
    ap.add_argument(
        "--skip-headline",
        action="store_true",
        help="measure only the options; headline and scan paths are kept from --out",
    )
    ap.add_argument(
        "--options-only",
        default=None,
        help="comma-separated option layouts to (re)measure; the others are kept from --out",
    )
    ap.add_argument(
        "--only-scan-paths",
        action="store_true",
        help="measure only the full-scan reader/codec comparison, into the existing --out",
    )
    ap.add_argument("--workdir", default=None, help="where to build tables (default: temp)")
    ap.add_argument("--out", default=str(RESULTS), help="JSON output path")
    args = ap.parse_args(argv)
    cfg = {"batch": 250, "replace_repeats": 7, "read_repeats": 9, "scans": 3, "concurrent": 3}
    if args.quick:
        args.subjects, args.options_subjects, args.frames = 200, 100, 200
        cfg.update(batch=50, replace_repeats=3, read_repeats=3, scans=1, concurrent=2)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_label_table_"))
    root.mkdir(parents=True, exist_ok=True)
    scan_n = 50 if args.quick else 200
    if args.only_scan_paths:
        out = Path(args.out)
        results = json.loads(out.read_text())
        results["scan_paths"] = bench_scan_paths(root, scan_n, args.frames)
        out.write_text(json.dumps(results, indent=2) + "\n")
        return results
    results: dict[str, Any] = {
        "config": {
            **cfg,
            "subjects": args.subjects,
            "options_subjects": args.options_subjects,
            "frames": args.frames,
            "recordings": RECORDINGS,
            "blendshapes": len(NAMES),
            "quick": args.quick,
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_start": os.getloadavg(),
        },
        "deletion_vectors": deletion_vectors_check(root),
        "options": {},
        "headline": {},
    }
    try:
        if args.options_only:
            results["options"] = json.loads(Path(args.out).read_text())["options"]
        if not args.skip_options:
            keys = args.options_only.split(",") if args.options_only else list(LAYOUTS)
            for key in keys:
                results["options"][key] = run_layout(
                    key, root, args.options_subjects, args.frames, cfg
                )
        if args.skip_headline:
            kept = json.loads(Path(args.out).read_text())
            results["headline"], results["scan_paths"] = kept["headline"], kept["scan_paths"]
            results["config"]["subjects"] = kept["config"]["subjects"]
            results["machine"]["headline_load_avg"] = kept["machine"]["load_avg_start"]
        else:
            for key in ("old", "product"):
                results["headline"][key] = run_layout(key, root, args.subjects, args.frames, cfg)
            results["scan_paths"] = bench_scan_paths(root, scan_n, args.frames)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    old, new = results["headline"]["old"], results["headline"]["product"]
    results["headline_ratios_old_over_new"] = {
        k: old[k] / new[k]
        for k in ("replace_median_ms", "read_one_median_ms", "full_scan_median_s")
    } | {"concurrent_wall_s": old["concurrent"]["wall_s"] / new["concurrent"]["wall_s"]}
    results["machine"]["load_avg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
