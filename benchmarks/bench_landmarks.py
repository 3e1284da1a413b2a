"""The landmark stage's error against ground truth on synthetic subjects.

Run: ``python -m benchmarks.bench_landmarks DATA_ROOT`` where DATA_ROOT holds
``captures/`` and ``ground_truth/`` (e.g. ``pgt synth --preset standard``).
Writes ``benchmarks/results/landmarks.json`` and prints a markdown table: detection rate,
mean and median pixel error over visible landmarks, median in millimetres on the face,
and seconds per frame.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pipeline.stage import StageConfig
from stages.landmarks import detect_landmarks_for_capture
from stages.synthesis.generate import landmark_points
from stages.synthesis.truth import SubjectTruth
from storage.capture import Capture
from workflows.config import RunConfig

RESULTS = Path(__file__).parent / "results" / "landmarks.json"


def subject_errors(capture_dir: Path, truth_dir: Path) -> dict:
    config = StageConfig({k: getattr(RunConfig().landmarks, k.split(".")[1]) for k in (
        "landmarks.detector", "landmarks.weights", "landmarks.precomputed_dir", "landmarks.min_confidence")})
    t0 = time.perf_counter()
    out = detect_landmarks_for_capture(str(capture_dir), None, config)
    seconds = time.perf_counter() - t0
    capture, truth = Capture.open(capture_dir), SubjectTruth.open(truth_dir)
    expr = truth.expressions()
    px, mm, found, frames = [], [], 0, 0
    for i, prompt in enumerate(capture.phone_expressions):
        gt = truth.phone(prompt)
        points3d = landmark_points(truth, truth.rig.pose(expr["b"][i], expr["gaze"][i]))
        intr = capture.phone_intrinsics(prompt)
        detected = out.arrays[f"points_{prompt}"]
        for k in range(len(detected)):
            frames += 1
            if not np.isfinite(detected[k]).all():
                continue
            found += 1
            vis = gt["visible"][k][:478]
            err = np.linalg.norm(detected[k] - gt["landmarks_2d"][k][:478], axis=1)[vis]
            pose = gt["head_in_camera"][k]
            z = (points3d[:478] @ pose[:, :3].T + pose[:, 3])[:, 2][vis]
            px.append(err)
            mm.append(err * z / intr.fx * 1000)
    px_all, mm_all = np.concatenate(px), np.concatenate(mm)
    return {"subject": capture.subject_id, "frames": frames, "found": found,
            "mean_px": float(px_all.mean()), "median_px": float(np.median(px_all)),
            "median_mm": float(np.median(mm_all)), "p90_mm": float(np.percentile(mm_all, 90)),
            "seconds_per_frame": seconds / frames}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data", help="folder with captures/ and ground_truth/")
    args = p.parse_args()
    root = Path(args.data)
    rows = [subject_errors(c, root / "ground_truth" / c.name) for c in sorted((root / "captures").iterdir()) if c.is_dir()]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"data": str(root), "subjects": rows}, indent=2) + "\n")
    print("| subject | frames | found | mean px | median px | median mm | p90 mm | s / frame |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['subject']} | {r['frames']} | {r['found']} | {r['mean_px']:.2f} | {r['median_px']:.2f} | "
              f"{r['median_mm']:.2f} | {r['p90_mm']:.2f} | {r['seconds_per_frame']:.3f} |")


if __name__ == "__main__":
    main()
