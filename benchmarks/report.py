"""Builds ``docs/benchmarks.md`` from ``benchmarks/results/*.json``.

Run: ``python -m benchmarks.report``. Every number in the page comes from a result file
that a benchmark command wrote; the page says which command.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PAGE = Path(__file__).parents[1] / "docs" / "benchmarks.md"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def synth_section(d: dict) -> list[str]:
    rows = [[p["preset"], p["subjects"], f"{p['median_seconds']:.1f}", f"{p['median_capture_bytes'] / 1e6:.1f}",
             f"{p['capture_files']:.0f}", f"{p['median_truth_bytes'] / 1e6:.1f}"] for p in d["presets"]]
    return ["## Synthetic subjects", "",
            "`python -m benchmarks.bench_synth --standard 1 --tiny 3`: seconds and disk bytes per subject "
            "(median over the subjects generated), on this machine "
            f"({d['machine']['cpus']} CPUs), one process per subject. Subjects are independent: "
            "`pgt synth --workers N` generates N at once. A `standard` subject is 60 prompts x 4 RGBD "
            "frames at 480 x 640 and ~66 s of 10-camera 400 x 400 HMC video (19,800 images); its sensor "
            "noise keeps PNGs near raw size.", "",
            *_table(["preset", "subjects", "s / subject", "capture MB / subject", "files / subject", "truth MB / subject"], rows)]


def landmarks_section(d: dict) -> list[str]:
    rows = [[r["subject"], r["frames"], r["found"], f"{r['mean_px']:.2f}", f"{r['median_px']:.2f}",
             f"{r['median_mm']:.2f}", f"{r['p90_mm']:.2f}", f"{r['seconds_per_frame']:.3f}"] for r in d["subjects"]]
    return ["## Landmark stage against ground truth", "",
            f"`python -m benchmarks.bench_landmarks {d['data']}`: the `landmarks` stage (MediaPipe face mesh) "
            "on `standard` phone frames, compared with the true 2D positions of the 478 embedded landmarks "
            "(visible ones). Millimetres convert each pixel error at the landmark's depth.", "",
            *_table(["subject", "frames", "faces found", "mean px", "median px", "median mm", "p90 mm", "s / frame"], rows)]


def face_model_section(d: dict) -> list[str]:
    rows = [[name, c["frames_desc"], f"{c['found']}/{c['frames']}", f"{c['mean_px']:.2f}", f"{c['median_px']:.2f}",
             f"{c['median_mm']:.2f}", f"{c['p90_mm']:.2f}"] for name, c in d["cases"].items()]
    return ["## Landmark embedding against MediaPipe", "",
            f"`{d['command']}`: MediaPipe's detections on synthetic phone renders (photo texture) against the "
            "projections of the 478 embedded landmarks (visible ones), pixels and millimetres on the face "
            "(each pixel error at the landmark's depth). Quoted by docs/face-model.md.", "",
            *_table(["case", "frames", "found", "mean px", "median px", "median mm", "p90 mm"], rows)]


def orchestration_section(d: dict) -> list[str]:
    cols = ["label", "units", "fingerprint_s", "plan_s", "execute_s", "total_s", "per_task_ms",
            "scheduler_rss_before_mb", "scheduler_rss_peak_mb"]
    rows = [[int(r[c]) if c == "units" else r.get(c) for c in cols] for r in d.get("medians", d["runs"])]
    return ["## Orchestration overhead", "",
            f"`python -m benchmarks.bench_orchestration --repeats {d.get('repeats', 1)}`: {d['subjects']:,} subjects through "
            "two trivial per-subject stages and one dataset barrier "
            f"({2 * d['subjects'] + 1:,} units), {d['workers']} worker processes on {d['cpus']} CPUs. "
            "`plan_s` is the graph build (content keys, cache checks, submission); `per_task_ms` is execution "
            "wall time per task, storage commits included; the cached row is a rerun over the same output, "
            "the baseline that shows what resuming costs. The scheduler runs in the driver process, so its "
            "memory includes the driver.", "",
            *_table(cols, rows)]


def scaling_section(d: dict) -> list[str]:
    rows = [[w, f"{r['median_seconds']:.1f}", f"{r['subjects_per_minute']:.1f}"] for w, r in d["workers"].items()]
    return ["## Scaling: 1 against 2 workers", "",
            f"`python -m benchmarks.bench_scaling --subjects {d['subjects']} --repeats {d['repeats']}`: the real chain "
            f"({' + '.join(d['stages'])}) on {d['subjects']} `tiny` subjects, a fresh output each repeat; "
            "medians of the repeats.", "",
            *_table(["workers", "median s", "subjects / min"], rows),
            f"Throughput ratio, 2 workers / 1 worker: **{d['throughput_ratio_2_over_1']:.2f}**. The machine has "
            "2 CPUs, which the two workers share with the driver (planning, Delta publishing and compaction) "
            "and the scheduler, and each `tiny` subject spends part of its time loading MediaPipe's models.", ""]


def label_table_section(d: dict) -> list[str]:
    c = d["config"]
    writes = [[k, f"{v['write_rows_per_s']:,.0f}", f"{v['write_commit_median_ms']:.1f}",
               f"{v['replace_rows_per_s']:,.0f}", f"{v['replace_commit_median_ms']:.1f}"] for k, v in d["writes"].items()]
    reads = [[k, f"{v['read_one_median_ms']:.1f}", f"{v['full_scan_median_ms']:,.0f}", f"{v['speedup_vs_scan']:.0f}x",
              v["data_files"], f"{v['bytes_on_disk'] / 1e6:,.0f}"] for k, v in d["reads"].items()]
    return ["## Label table", "",
            f"`python -m benchmarks.bench_label_table`: writes are one `write_subject_round` commit per subject of "
            f"{c['frames']} frames x {c['blendshapes']} blendshapes ({c['n_write']} subjects, then each relabelled); "
            f"reads fetch one subject from a {c['n_big']:,}-subject table (median of {c['repeats']}, table open "
            "included), against a full scan in the same run as the baseline. The product's table is unpartitioned "
            "and compacted after each run (docs/storage.md). Measured while other jobs loaded the machine "
            "(load average ~5), so absolute times are pessimistic; the ratios within each run hold.", "",
            *_table(["layout", "write rows/s", "write commit ms", "replace rows/s", "replace commit ms"], writes),
            *_table(["table", "read 1 subject ms", "full scan ms", "speed-up", "data files", "MB on disk"], reads)]


def main() -> None:
    lines = ["# Benchmarks", "",
             "Generated by `python -m benchmarks.report` from `benchmarks/results/*.json`; each section "
             "names the command that produced its numbers. Machine: the project's 2-CPU, 24 GiB "
             "development VM, no GPU.", ""]
    for name, section in (("synth", synth_section), ("landmarks", landmarks_section), ("face_model", face_model_section),
                          ("orchestration", orchestration_section), ("scaling", scaling_section),
                          ("label_table", label_table_section)):
        data = _load(name)
        lines += section(data) if data else [f"## {name}", "", "not measured yet", ""]
    PAGE.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
