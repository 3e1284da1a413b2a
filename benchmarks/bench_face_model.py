"""MediaPipe's detections against the landmark embedding on synthetic renders.

Run: ``python -m benchmarks.bench_face_model [--standard-seed 5]``. Writes
``benchmarks/results/face_model.json`` (rendered into docs/benchmarks.md by
``benchmarks.report``; the accuracy table of docs/face-model.md quotes it).

Three cases, each a set of phone frames rendered by the generator with the photo texture:
- ``neutral``: one 480 x 640 frontal frame of the neutral mean-identity (generic) rig;
- ``tiny``: the ``tiny`` preset's phone frames (5 prompts x 2, 240 x 320) of one subject;
- ``standard``: the ``standard`` preset's (60 prompts x 4, 480 x 640) of one subject, the
  subject of ``tests/test_synthesis.py::test_mediapipe_finds_standard_faces``.
Errors are over the visible landmarks of the 478 embedded ones, in pixels and in mm on
the face (each pixel error times the landmark's depth over the focal length).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "face_model.json"


@dataclass(frozen=True, eq=False)
class PhoneFrame:
    """A rendered phone frame and the truth the detection is scored against.

    Attributes:
        rgb: (H, W, 3) uint8.
        landmarks_2d: (546, 2) true pixels (478 MediaPipe, then 68 Multi-PIE).
        visible: (546,) bool.
        depth_m: (546,) camera-z depth of each landmark, metres.
        focal: focal length, pixels.
    """

    rgb: np.ndarray
    landmarks_2d: np.ndarray
    visible: np.ndarray
    depth_m: np.ndarray
    focal: float


def preset_frames(preset: str, seed: int) -> list[PhoneFrame]:
    """The phone frames of every prompt of ``preset`` for subject ``make_subject(seed)``."""
    from rigs.face_model import load_ict_face_model
    from rigs.rig import BlendshapeRig
    from stages.synthesis.generate import landmark_points, prompt_pose, render_phone_burst
    from stages.synthesis.presets import get_preset
    from stages.synthesis.subject import make_subject
    from stages.synthesis.texture import load_default_texture

    config = get_preset(preset)
    model, texture = load_ict_face_model(), load_default_texture()
    definition = BlendshapeRig.generic(model).definition
    rng = np.random.default_rng([seed, 0])
    subject = make_subject(f"bench-{seed}", rng, model, definition)
    frames = []
    for prompt in config.prompts or [p.name for p in definition.prompts]:
        verts = subject.rig.pose(*prompt_pose(definition, prompt, rng))
        points = landmark_points(subject, verts)
        for f in render_phone_burst(config, subject, verts, texture, rng):
            depth = f.shot.camera.to_camera(points)[:, 2]
            frames.append(PhoneFrame(f.shot.rgb, f.landmarks_2d, f.visible, depth, f.shot.camera.fx))
    return frames


def neutral_frame(width: int = 480, distance_m: float = 0.34) -> list[PhoneFrame]:
    """One frontal frame of the neutral mean-identity rig (no identity, no expression)."""
    from types import SimpleNamespace

    from rigs.camera import Camera
    from rigs.face_model import load_ict_face_model
    from rigs.raycast import Scene
    from rigs.rig import BlendshapeRig
    from stages.synthesis.generate import landmark_points, project_visible
    from stages.synthesis.phone import FACE_CENTRE, render_phone
    from stages.synthesis.texture import load_default_texture

    rig = BlendshapeRig.generic(load_ict_face_model())
    verts = rig.neutral
    focal = (width / 2) / np.tan(np.deg2rad(60.0) / 2)
    cam = Camera.look_at(FACE_CENTRE + np.array([0.0, 0.0, distance_m]), FACE_CENTRE, np.array([0.0, 1.0, 0.0]),
                         width=width, height=width * 4 // 3, focal=focal)
    shot = render_phone(verts, rig.model.triangles, cam, load_default_texture(), np.array([1.0, 0.93, 0.88]),
                        np.random.default_rng(0))
    points = landmark_points(SimpleNamespace(rig=rig), verts)
    pix, visible = project_visible(Scene(verts, rig.model.triangles), cam, points)
    return [PhoneFrame(shot.rgb, pix, visible, cam.to_camera(points)[:, 2], cam.fx)]


def detection_errors(frames: list[PhoneFrame]) -> dict:
    """MediaPipe on every frame: detection count and error statistics (see module doc)."""
    from stages.landmarks import MediaPipeDetector

    detector = MediaPipeDetector()
    found, px, mm, per_frame_px = 0, [], [], []
    t0 = time.perf_counter()
    for f in frames:
        det = detector.detect(f.rgb)
        if not det.found:
            continue
        found += 1
        vis = f.visible[:478]
        err = np.linalg.norm(det.points[:478] - f.landmarks_2d[:478], axis=1)[vis]
        px.append(err)
        mm.append(err * f.depth_m[:478][vis] / f.focal * 1000)
        per_frame_px.append(float(err.mean()))
    seconds = time.perf_counter() - t0
    detector.close()
    if not px:
        return {"frames": len(frames), "found": 0}
    px_all, mm_all = np.concatenate(px), np.concatenate(mm)
    return {
        "frames": len(frames), "found": found,
        "mean_px": float(px_all.mean()), "median_px": float(np.median(px_all)),
        "median_mm": float(np.median(mm_all)), "p90_mm": float(np.percentile(mm_all, 90)),
        "median_of_frame_median_mm": float(np.median([np.median(m) for m in mm])),
        "mean_of_frame_mean_px": float(np.mean(per_frame_px)),
        "seconds_per_frame": seconds / len(frames),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny-seed", type=int, default=7)
    p.add_argument("--standard-seed", type=int, default=5)
    args = p.parse_args()
    cases = {
        "neutral": ("480x640 frontal neutral render, mean identity", neutral_frame),
        "tiny": (f"`tiny` phone frames, 240x320, make_subject(seed {args.tiny_seed})",
                 lambda: preset_frames("tiny", args.tiny_seed)),
        "standard": (f"`standard` phone frames, 480x640, 60 prompts x 4, make_subject(seed {args.standard_seed})",
                     lambda: preset_frames("standard", args.standard_seed)),
    }
    out = {"command": "python -m benchmarks.bench_face_model", "cases": {}}
    for name, (what, make) in cases.items():
        result = {"frames_desc": what, **detection_errors(make())}
        out["cases"][name] = result
        print(name, json.dumps(result))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
