"""Seconds and disk bytes per synthetic subject (``standard`` and ``tiny`` presets).

Run: ``python -m benchmarks.bench_synth [--standard N] [--tiny N] [--out DIR]``.
Writes ``benchmarks/results/synth.json`` and prints a markdown table. Timings are medians
over the subjects generated; bytes are what the capture and ground-truth folders hold.

``python -m benchmarks.bench_synth --hmc-frames N [--variant alt]`` times only a slice: the
first N frames of a ``standard`` HMC recording (IR rendering of the 10 cameras, landmark
projection, PNG writing), in CPU seconds and wall seconds per frame, extrapolated to the
1,980 HMC frames of a ``standard`` subject. It prints one JSON line and writes nothing
else: a slice is cheap enough to run on a loaded machine.
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


def bench_hmc_slice(frames: int, out: Path, variant: str = "default") -> dict:
    """Seconds per HMC frame of a ``standard`` recording, over its first ``frames`` frames.

    The mesh is the generic rig's (the cost does not depend on the identity), so no
    subject needs drawing; the timeline, cameras and writer are the generator's.
    """
    from dataclasses import replace

    import numpy as np

    from pipeline.progress import progress_bar
    from rigs.camera import rig_cameras
    from rigs.definition import load_default_rig_definition
    from rigs.face_model import load_ict_face_model
    from rigs.rig import BlendshapeRig
    from stages.synthesis.generate import SimulatedDetector, _write_recording
    from stages.synthesis.hmc import default_hmc_rig
    from stages.synthesis.ir import IrRenderer
    from stages.synthesis.performance import hmc_timeline
    from stages.synthesis.subject import SyntheticSubject
    from stages.synthesis.texture import load_default_texture
    from stages.synthesis.variants import get_variant
    from storage.capture_writer import CaptureWriter

    config, v = get_preset("standard"), get_variant(variant)
    model, definition = load_ict_face_model(), load_default_rig_definition()
    rig = BlendshapeRig.generic(model, definition)
    subject = SyntheticSubject("bench", np.zeros(len(model.identity_basis)), np.zeros((model.n_vertices, 3), np.float32),
                               rig, np.ones(3), np.ones(definition.size))
    rng = np.random.default_rng(0)
    timeline = hmc_timeline(definition, rng, ["jaw_drop_max", "smile_closed", "brows_raise", "wink_left"], config.script, slip=v.slip)
    total = len(timeline.b) * config.hmc_recordings
    timeline = replace(timeline, b=timeline.b[:frames], gaze=timeline.gaze[:frames], head_rotvec=timeline.head_rotvec[:frames],
                       head_t=timeline.head_t[:frames], segments=(), timestamps_ns=timeline.timestamps_ns[:frames])
    shutil.rmtree(out, ignore_errors=True)
    writer = CaptureWriter(out / "bench", "bench")
    hmc_rig = default_hmc_rig(config.hmc_size, config.fps)
    writer.write_rig(hmc_rig)
    cameras = rig_cameras(hmc_rig)
    renderer = IrRenderer(cameras, load_default_texture(), model.triangles, v.shading, v.noise, np.random.default_rng(1))
    detector = SimulatedDetector.for_subject(v.keypoints, cameras, np.random.default_rng(2))
    bar = progress_bar(frames, "bench", enabled=False)
    wall, cpu = time.perf_counter(), time.process_time()
    _write_recording(writer, out / "truth", "rec000", subject, timeline, renderer, rng, bar, detector)
    wall, cpu = (time.perf_counter() - wall) / frames, (time.process_time() - cpu) / frames
    shutil.rmtree(out, ignore_errors=True)
    return {"frames": frames, "variant": variant, "cpu_s_per_frame": round(cpu, 4), "wall_s_per_frame": round(wall, 4),
            "standard_hmc_frames": total, "standard_hmc_cpu_s": round(cpu * total, 1), "standard_hmc_wall_s": round(wall * total, 1),
            "load_average": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--standard", type=int, default=2, help="standard subjects to generate")
    parser.add_argument("--tiny", type=int, default=3, help="tiny subjects to generate")
    parser.add_argument("--out", default="/tmp/pgt-bench-synth", help="scratch folder")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--hmc-frames", type=int, help="time only this many HMC frames of a standard recording")
    parser.add_argument("--variant", default="default", help="generator variant of the HMC slice")
    args = parser.parse_args()
    out = Path(args.out)
    if args.hmc_frames:
        print(json.dumps(bench_hmc_slice(args.hmc_frames, out / "hmc-slice", args.variant)))
        return
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
