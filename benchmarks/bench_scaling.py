"""Throughput of the real chain (validate + landmarks) on 1 against 2 workers.

Run: ``python -m benchmarks.bench_scaling [--subjects N] [--repeats R]``. The subjects are
copies of one ``tiny`` synthetic capture under distinct subject ids, so every run does the
same work. Each configuration runs R times into fresh output folders (no cache);
reported: median wall seconds, subjects per minute, and the 2-worker / 1-worker ratio.
Writes ``benchmarks/results/scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from stages.synthesis.generate import generate
from stages.synthesis.presets import get_preset
from workflows.config import RunConfig
from workflows.label import backfill

RESULTS = Path(__file__).parent / "results" / "scaling.json"


def make_subjects(root: Path, n: int) -> Path:
    src_root = root / "src"
    (sid,) = generate(get_preset("tiny"), 1, 77, src_root, progress=False)
    captures = root / "captures"
    for i in range(n):
        name = f"scale-{i:03d}"
        shutil.copytree(src_root / "captures" / sid, captures / name)
        manifest = captures / name / "capture.json"
        manifest.write_text(manifest.read_text().replace(sid, name))
    return captures


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pgt-scaling-"))
    captures = make_subjects(work, args.subjects)
    results = {}
    for workers in (1, 2):
        times = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            summary = backfill(captures, str(work / f"out-{workers}-{r}"), RunConfig(), workers=workers, progress=False, report=False)
            times.append(time.perf_counter() - t0)
            assert summary.ok, summary.failures
        med = statistics.median(times)
        results[workers] = {"seconds": times, "median_seconds": med, "subjects_per_minute": args.subjects / med * 60}
    ratio = results[2]["subjects_per_minute"] / results[1]["subjects_per_minute"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"subjects": args.subjects, "repeats": args.repeats, "stages": ["validate", "landmarks"],
                                   "workers": results, "throughput_ratio_2_over_1": ratio}, indent=2) + "\n")
    print("| workers | median s | subjects / min |")
    print("|---|---|---|")
    for w, r in results.items():
        print(f"| {w} | {r['median_seconds']:.1f} | {r['subjects_per_minute']:.1f} |")
    print(f"\nthroughput ratio 2 / 1 workers: {ratio:.2f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
