"""Builds small, valid captures from numpy arrays for tests (``make_capture``).

Every array written is kept on the returned :class:`MadeCapture`, so tests can compare
what a reader returns with exactly what was written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from storage.capture_layout import EMBEDDED_CAMERAS, GT_CAMERAS, MIRRORED_CAMERAS, CaptureLayout
from storage.capture_types import HmcCamera, HmcRig, PhoneIntrinsics, PinholeIntrinsics, Segment
from storage.capture_writer import CaptureWriter

DEFAULTS: dict[str, Any] = {
    "subject_id": "subj0000",
    "expressions": ("neutral", "jaw_drop_max"),
    "n_phone_frames": 2,
    "phone_size": (64, 48),  # (width, height)
    "recording": "rec000",
    "n_frames": 6,
    "hmc_size": (32, 32),  # (width, height)
    "cameras": EMBEDDED_CAMERAS + GT_CAMERAS,
    "fps": 30.0,
    "segments": None,  # None -> a default set covering every kind
    "keypoints": ("eye_left",),  # cameras that get a keypoint file
    "n_keypoints": 4,
    "seed": 0,
    "finalize": True,
}


@dataclass
class MadeCapture:
    """What ``make_capture`` wrote.

    Attributes:
        root: the capture folder.
        layout: its paths.
        subject_id, expressions, recording: names used.
        phone_intrinsics: expression -> intrinsics.
        phone_rgb: (expression, index) -> (H, W, 3) uint8 RGB.
        phone_depth: (expression, index) -> (H, W) uint16 mm.
        rig: the rig written.
        frames: camera -> (T, H, W) uint8.
        timestamps: camera -> (T,) int64 ns.
        segments: the segments written.
        keypoints: camera -> (points (T, P, 2) float32, confidence (T, P) float32).
    """

    root: Path
    layout: CaptureLayout
    subject_id: str
    expressions: tuple[str, ...]
    recording: str
    rig: HmcRig
    phone_intrinsics: dict[str, PhoneIntrinsics] = field(default_factory=dict)
    phone_rgb: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    phone_depth: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    frames: dict[str, np.ndarray] = field(default_factory=dict)
    timestamps: dict[str, np.ndarray] = field(default_factory=dict)
    segments: tuple[Segment, ...] = ()
    keypoints: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def make_rig(cameras: tuple[str, ...], size: tuple[int, int], fps: float) -> HmcRig:
    """A plausible rig: cameras spread around the face, looking back at it."""
    w, h = size
    cams = []
    for i, name in enumerate(cameras):
        angle = np.pi + 0.3 * (i - len(cameras) / 2)  # face the head (+z toward the face)
        cams.append(
            HmcCamera(
                name=name,
                role="gt" if name.startswith("gt_") else "embedded",
                mirrored=name in MIRRORED_CAMERAS,
                intrinsics=PinholeIntrinsics(w, h, 0.9 * w, 0.9 * w, w / 2 - 0.5, h / 2 - 0.5),
                distortion=np.array([0.01 * i, -0.002, 0.0, 0.0, 0.0001]),
                R_headset_from_camera=Rotation.from_euler("y", angle).as_matrix(),
                t_headset_from_camera=np.array([0.01 * i - 0.05, -0.02, 0.04]),
            )
        )
    return HmcRig("test-rig-1", fps, tuple(cams))


def default_segments(n_frames: int, cameras: tuple[str, ...]) -> tuple[Segment, ...]:
    """One segment of every kind, all inside ``n_frames`` (needs n_frames >= 6)."""
    return (
        Segment("neutral", 0, 2),
        Segment("peak", 2, 4, prompt="jaw_drop_max", cameras=cameras[:2]),
        Segment("eye_closure", 4, 5),
        Segment("wink", 5, 6, eye="left"),
        Segment("mouth_closed", 0, 1),
        Segment("speech", 1, n_frames),
    )


def make_capture(tmp_path: Path, **overrides: Any) -> MadeCapture:
    """Writes a small valid capture under ``tmp_path / subject_id`` with CaptureWriter.

    Args:
        tmp_path: parent folder.
        **overrides: any key of ``DEFAULTS``.

    Returns:
        Everything written.
    """
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown make_capture options {sorted(unknown)}")
    o = {**DEFAULTS, **overrides}
    rng = np.random.default_rng(o["seed"])
    cameras = tuple(o["cameras"])
    root = Path(tmp_path) / o["subject_id"]
    writer = CaptureWriter(root, o["subject_id"])
    rig = make_rig(cameras, o["hmc_size"], o["fps"])
    made = MadeCapture(
        root, writer.layout, o["subject_id"], tuple(o["expressions"]), o["recording"], rig
    )

    pw, ph = o["phone_size"]
    for expression in made.expressions:
        intr = PhoneIntrinsics(pw, ph, 1.1 * pw, 1.1 * pw, pw / 2, ph / 2)
        writer.write_phone_intrinsics(expression, intr)
        made.phone_intrinsics[expression] = intr
        for i in range(o["n_phone_frames"]):
            rgb = rng.integers(0, 256, (ph, pw, 3), dtype=np.uint8)
            depth = rng.integers(250, 600, (ph, pw), dtype=np.uint16)
            depth[0, :3] = 0  # a few invalid pixels
            writer.write_phone_frame(expression, i, rgb, depth)
            made.phone_rgb[(expression, i)] = rgb
            made.phone_depth[(expression, i)] = depth

    writer.write_rig(rig)
    n, (hw, hh) = o["n_frames"], o["hmc_size"]
    base = 1_700_000_000_000_000_000
    period = round(1e9 / o["fps"])
    for cam in cameras:
        frames = rng.integers(0, 256, (n, hh, hw), dtype=np.uint8)
        stamps = base + period * np.arange(n, dtype=np.int64)
        for i in range(n):
            writer.write_hmc_frame(made.recording, cam, i, frames[i])
        writer.write_timestamps(made.recording, cam, stamps)
        made.frames[cam] = frames
        made.timestamps[cam] = stamps
    segments = o["segments"]
    made.segments = tuple(default_segments(n, cameras) if segments is None else segments)
    writer.write_segments(made.recording, made.segments)
    for cam in o["keypoints"]:
        points = rng.uniform(0, hw, (n, o["n_keypoints"], 2)).astype(np.float32)
        points[0, 0] = np.nan  # an undetected point
        conf = rng.uniform(0, 1, (n, o["n_keypoints"])).astype(np.float32)
        conf[0, 0] = 0.0
        writer.write_keypoints(made.recording, cam, points, conf)
        made.keypoints[cam] = (points, conf)
    if o["finalize"]:
        writer.finalize(made.expressions, (made.recording,))
    return made
