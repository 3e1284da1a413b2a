"""Seconds and disk bytes per synthetic subject (``standard`` and ``tiny`` presets).

Run: ``python -m benchmarks.bench_synth [--standard N] [--tiny N] [--out DIR]``.
Writes ``benchmarks/results/synth.json`` and prints a markdown table. Timings are medians
over the subjects generated; bytes are what the capture and ground-truth folders hold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

from stages.synthesis.generate import generate_subject
from stages.synthesis.presets import get_preset

RESULTS = Path(__file__).parent / "results" / "synth.json"


def folder_stats(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def bench(preset: str, subjects: int, out: Path, keep: bool) -> dict:
    rows = []
    for index in range(subjects):
        root = out / preset
        t0 = time.perf_counter()
        sid = generate_subject(get_preset(preset), 1000, index, root, progress=False)
        seconds = time.perf_counter() - t0
        cap_bytes, cap_files = folder_stats(root / "captures" / sid)
        gt_bytes, _ = folder_stats(root / "ground_truth" / sid)
        rows.append({"seconds": seconds, "capture_bytes": cap_bytes, "capture_files": cap_files, "truth_bytes": gt_bytes})
        if not keep:
            shutil.rmtree(root)
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    return {"preset": preset, "subjects": subjects, "median_seconds": med("seconds"),
            "median_capture_bytes": med("capture_bytes"), "median_truth_bytes": med("truth_bytes"),
            "capture_files": med("capture_files"), "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--standard", type=int, default=2, help="standard subjects to generate")
    parser.add_argument("--tiny", type=int, default=3, help="tiny subjects to generate")
    parser.add_argument("--out", default="/tmp/pgt-bench-synth", help="scratch folder")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    args = parser.parse_args()
    out = Path(args.out)
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "presets": [bench("tiny", args.tiny, out, args.keep), bench("standard", args.standard, out, args.keep)],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print("| preset | subjects | median s / subject | capture MB / subject | files / subject | truth MB / subject |")
    print("|---|---|---|---|---|---|")
    for r in results["presets"]:
        print(f"| {r['preset']} | {r['subjects']} | {r['median_seconds']:.1f} | {r['median_capture_bytes'] / 1e6:.1f} | "
              f"{r['capture_files']:.0f} | {r['median_truth_bytes'] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
