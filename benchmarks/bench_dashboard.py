"""QA report and dashboard: build time, size and served page load (docs/qa-report.md).

    python -m benchmarks.bench_dashboard --tiny SYNTH_TINY --run RUN_OUT --standard SYNTH_STANDARD \
        --replicas 200 --work /tmp/bench-dashboard

Cases (each label table holds the truth, the trivial labellers' metrics and the
stand-in labeller's two rounds of tests/dashboard_data.py, scored by the real metrics job):
- ``tiny x N``: the subjects of SYNTH_TINY (``pgt synth --preset tiny``), with the run
  output RUN_OUT of their backfill (coverage, phone pictures, personal rigs);
- ``tiny x REPLICAS``: the same tables with every subject's label and metrics rows
  replicated under new subject ids (``rep-0000``...; their captures are folders of hard
  links to the originals with the id rewritten, their truth folders links), subject and dataset
  metrics re-averaged; generating 200 tiny subjects would take hours on this machine;
- ``standard x N``: the subjects of SYNTH_STANDARD, no run output (``--phone-only``
  subjects: one minimal HMC recording each).

Per case: report build wall and CPU seconds, report bytes, and the served dashboard's
page load in headless chromium (until the dataset table is shown) and the time to open
the worst recording with its frame overlay (a click on the recordings table). Writes
``benchmarks/results/dashboard.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa

RESULT = Path(__file__).parent / "results" / "dashboard.json"


def replicate(sources, replicas: int, work: Path):
    """DashboardSources whose tables hold ``replicas`` subjects copied from ``sources``'s."""
    from storage import delta
    from storage.label_table import PARTITION_COLUMN, TABLE_PROPERTIES
    from workflows.dashboard.data import DashboardSources

    labels = delta.read_rows(sources.labels_uri)
    originals = sorted(set(labels.column("subject_id").to_pylist()))
    ids = [f"rep-{i:04d}" for i in range(replicas)]
    captures, truth = work / "captures", work / "ground_truth"
    for folder in (captures, truth):
        folder.mkdir(parents=True, exist_ok=True)
    frames = labels.to_pandas()
    parts = []
    for i, sid in enumerate(ids):
        src = originals[i % len(originals)]
        part = frames[frames["subject_id"] == src].copy()
        part["subject_id"] = part[PARTITION_COLUMN] = sid
        parts.append(part)
        _link_capture(Path(sources.captures) / src, captures / sid)
        if not (truth / sid).exists():
            os.symlink(Path(sources.truth) / src, truth / sid)
    out = DashboardSources(out=str(work / "run"), labels=str(work / "tables" / "labels"), captures=str(captures),
                           truth=str(truth))
    rows = pd.concat(parts, ignore_index=True)
    # One group at a time, a few commits each: as a backfill writes (one subject's group per
    # file) and with the statistics a real label table keeps.
    for _, group in rows.groupby(["label_source", "label_round"]):
        table = pa.Table.from_pandas(group, schema=labels.schema, preserve_index=False)
        for lo in range(0, table.num_rows, 50_000):
            delta.append_rows(out.labels_uri, table.slice(lo, 50_000), partition_by=[PARTITION_COLUMN],
                              configuration=TABLE_PROPERTIES)
    for src_uri, dst_uri in ((sources.metrics_uri, out.metrics_uri), (sources.trivial_metrics_uri, out.trivial_metrics_uri)):
        _replicate_metrics(src_uri, dst_uri, originals, ids)
    return out


def _link_capture(original: Path, folder: Path) -> None:
    """A capture folder of hard links to ``original``'s files, with its own subject id."""
    if folder.exists():
        return
    folder.mkdir()
    for child in original.iterdir():  # hard links: a capture refuses symlinks that leave it
        if child.is_dir():
            shutil.copytree(child, folder / child.name, copy_function=os.link)
        elif child.name != "capture.json":
            os.link(child, folder / child.name)
    manifest = json.loads((original / "capture.json").read_text())
    manifest["subject_id"] = folder.name
    (folder / "capture.json").write_text(json.dumps(manifest))


def _replicate_metrics(src_uri: str, dst_uri: str, originals: list[str], ids: list[str]) -> None:
    """Recording rows copied per new id; subject and dataset rows re-averaged (as the job does)."""
    from storage import delta

    rows = delta.read_rows(src_uri)
    schema, frame = rows.schema, rows.to_pandas()
    for _, group in frame.groupby(["label_source", "label_round"]):
        rec = group[group["level"] == "recording"]
        copies = []
        for i, sid in enumerate(ids):
            part = rec[rec["subject_id"] == originals[i % len(originals)]].copy()
            part["subject_id"] = sid
            copies.append(part)
        rec = pd.concat(copies, ignore_index=True)
        subj = rec.groupby(["subject_id", "metric"], sort=False).agg(
            value=("value", "mean"), n_items=("value", "count")).reset_index()
        data = subj.groupby("metric", sort=False).agg(value=("value", "mean"), n_items=("value", "count")).reset_index()
        const = {c: group[c].iloc[0] for c in ("label_source", "label_round", "run_id", "computed_at")}
        out = pd.concat([rec, subj.assign(level="subject", recording_id=None),
                         data.assign(level="dataset", subject_id=None, recording_id=None)], ignore_index=True)
        out = out.assign(**const)[schema.names]
        delta.append_rows(dst_uri, pa.Table.from_pandas(out, schema=schema, preserve_index=False))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _second_subject(sources) -> str | None:
    """The second subject of the worst-first table (the first one's recording is shown
    at load; rows far down a long table are not rendered until scrolled to); None with
    one subject."""
    from workflows.dashboard import pages
    from workflows.dashboard.data import DashboardData

    data = DashboardData(sources)
    subjects = pages.subject_tables(data, data.product())[0]["subject_id"]
    return str(subjects.iloc[1]) if len(subjects) > 1 else None


def measure(name: str, sources, work: Path) -> dict:
    """Report build and served page timings of one case."""
    from playwright.sync_api import sync_playwright

    from workflows.dashboard.report import build_report
    from workflows.dashboard.serve import ServeConfig, serve

    cpu = time.process_time()
    info = build_report(sources, work / f"{name}.html")
    result = {"case": name, "report_seconds": info.seconds, "report_cpu_seconds": time.process_time() - cpu,
              "report_bytes": info.size_bytes, "recordings_embedded": len(info.recordings), "frames_embedded": info.frames}
    port = _free_port()
    server = serve(sources, ServeConfig(port=port, refresh_s=60), block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            cpu, start = time.process_time(), time.perf_counter()
            page.goto(f"http://127.0.0.1:{port}/", timeout=900_000)
            page.wait_for_selector("table.pgt-metrics", timeout=300_000)
            result["served_load_seconds"] = time.perf_counter() - start
            result["served_load_server_cpu_seconds"] = time.process_time() - cpu
            best = _second_subject(sources)  # not the one shown first: its recording opens now
            result["served_open_recording_seconds"] = None  # one subject: its recording is open at load
            if best is not None:
                page.locator(".bk-tab", has_text="Subjects").click()
                start = time.perf_counter()
                page.locator(".slick-cell:visible", has_text=best).first.click()
                page.wait_for_selector(f".pgt-overlay figcaption:has-text('{best} / ')", timeout=300_000)
                result["served_open_recording_seconds"] = time.perf_counter() - start
            browser.close()
    finally:
        server.stop()
    print(json.dumps(result))
    return result


def main() -> None:
    from tests.dashboard_data import dashboard_sources

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", type=Path, help="pgt synth --preset tiny output (needed but with --update and no --replicas)")
    parser.add_argument("--run", type=Path, help="output root of the tiny subjects' backfill")
    parser.add_argument("--standard", type=Path, help="pgt synth --preset standard output")
    parser.add_argument("--standard-run", type=Path, help="output root of the standard subjects' label/backfill run")
    parser.add_argument("--replicas", type=int, nargs="*", default=[200],
                        help="replicated tiny cases, e.g. 200 5000 (none: --replicas alone)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-dashboard"))
    parser.add_argument("--update", action="store_true",
                        help="measure only the replicated and standard cases and merge them into the existing results")
    args = parser.parse_args()
    if args.tiny is None and (args.replicas or not args.update):
        parser.error("--tiny is needed unless --update is given with no --replicas")
    shutil.rmtree(args.work, ignore_errors=True)
    cases = []
    if args.tiny is not None:
        tiny = dashboard_sources(args.tiny, args.work / "tiny")
        if args.run:
            from dataclasses import replace

            tiny = replace(tiny, out=str(args.run))
        n_tiny = len(list((args.tiny / "captures").iterdir()))
        if not args.update:
            cases.append(measure(f"tiny x{n_tiny}", tiny, args.work))
    for replicas in args.replicas:
        start = time.perf_counter()
        sources = replicate(tiny, replicas, args.work / f"rep{replicas}")
        made = time.perf_counter() - start
        cases.append({**measure(f"tiny x{replicas} (replicated)", sources, args.work), "replicate_seconds": made})
    if args.standard:
        standard = dashboard_sources(args.standard, args.work / "standard")
        n = len(list((args.standard / "captures").iterdir()))
        kind = "phone-only"
        if args.standard_run:
            from dataclasses import replace

            standard, kind = replace(standard, out=str(args.standard_run)), "full, with its run"
        cases.append(measure(f"standard x{n} ({kind})", standard, args.work))
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.bench_dashboard " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else " " + (" ".join(map(str, v)) if isinstance(v, list) else str(v)))
        for k, v in vars(args).items() if v not in (None, False))
    if args.update and RESULT.is_file():
        old = json.loads(RESULT.read_text())
        new = {c["case"] for c in cases}
        cases = [c for c in old["cases"] if c["case"] not in new] + cases
        command = old["command"] + "; then " + command
    RESULT.write_text(json.dumps({"command": command, "machine": {"cpus": os.cpu_count()},
                                  "cases": cases}, indent=1) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
