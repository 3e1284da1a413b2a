"""A recording's HMC frames at model resolution, in memory, with per-frame usability.

Self-supervision trains on every frame of a subject many times, so the frames are read
once, area-downsampled to the network's resolution and held as uint8: a 30 s recording
of 10 cameras at 96 px is about 80 MiB. Images stay as stored (unmirrored) because the
renderer and the keypoints live in the stored image; the network's input flips the
mirrored cameras (:func:`network_input`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError
from storage.capture import Recording

#: Frame usability codes, one per (frame, camera).
USABLE, DARK, SATURATED = 0, 1, 2
CODE_NAMES = {DARK: "dark", SATURATED: "saturated"}


@dataclass(frozen=True)
class FrameCheck:
    """Thresholds that decide whether a camera's image of a frame can be used."""

    dark_mean: float = 6.0
    """A camera image whose mean intensity (0-255) is below this is dark: its LED or
    sensor failed, or it sees nothing. Its pixels and keypoints are then not used."""
    saturated_fraction: float = 0.5
    """A camera image with more than this fraction of pixels at 255 is saturated."""


@dataclass(frozen=True)
class HmcClip:
    """One recording's frames, downsampled, with keypoints in the downsampled pixels.

    Attributes:
        recording: the recording's name.
        cameras: camera names, rig order subset.
        mirrored: (C,) whether each camera is flipped at network input.
        images: (T, C, S, S) uint8, stored orientation.
        scale: (C,) model pixels per stored pixel of each camera.
        timestamps_ns: (T,) int64 frame timestamps.
        keypoints: (T, C, P, 2) float32 model pixels, NaN where missing; None without
            keypoint files.
        keypoint_confidence: (T, C, P) float32 in [0, 1], 0 where missing; or None.
        usability: (T, C) uint8 codes USABLE, DARK, SATURATED.
        segments: the recording's annotated segments.
    """

    recording: str
    cameras: tuple[str, ...]
    mirrored: np.ndarray
    images: np.ndarray
    scale: np.ndarray
    timestamps_ns: np.ndarray
    keypoints: np.ndarray | None
    keypoint_confidence: np.ndarray | None
    usability: np.ndarray
    segments: tuple = ()

    @property
    def frame_count(self) -> int:
        return int(self.images.shape[0])

    def frame_reasons(self) -> list[str]:
        """Per frame, '' when every camera is usable, else e.g. 'mouth_left dark; glabella saturated'."""
        return ["; ".join(unusable_cameras(row, self.cameras)) for row in self.usability]


def unusable_cameras(codes: np.ndarray, cameras: Sequence[str]) -> list[str]:
    """'<camera> dark' / '<camera> saturated' for each unusable camera of one frame's (C,) codes."""
    return [f"{cam} {CODE_NAMES[int(c)]}" for cam, c in zip(cameras, codes, strict=True) if c != USABLE]


def downsample(image: np.ndarray, size: int) -> np.ndarray:
    """Area-average an (H, W) uint8 image to (size, size) uint8."""
    import cv2

    if image.shape == (size, size):
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def check_image(image: np.ndarray, check: FrameCheck) -> int:
    """The usability code of one (H, W) uint8 image."""
    if float(image.mean()) < check.dark_mean:
        return DARK
    if float((image == 255).mean()) > check.saturated_fraction:
        return SATURATED
    return USABLE


def load_clip(
    recording: Recording,
    cameras: Sequence[str],
    size: int,
    check: FrameCheck = FrameCheck(),
    progress: Callable[[int], None] | None = None,
) -> HmcClip:
    """Reads a recording's frames of ``cameras`` at ``size`` x ``size`` model pixels.

    Args:
        recording: an opened recording.
        cameras: camera names (each must be in the rig).
        size: model resolution, pixels (square); >= 16.
        check: dark / saturated thresholds, applied at full resolution.
        progress: called with the number of frames read after each frame.

    Raises:
        ConfigError: size < 16 or no cameras.
        KeyError: an unknown camera.
        CaptureError: an invalid frame, timestamps or keypoints file (names the file).
    """
    if size < 16 or not cameras:
        raise ConfigError(f"need size >= 16 and at least one camera (size {size}, cameras {list(cameras)})")
    rig = recording.rig
    cams = [rig.camera(c) for c in cameras]
    n = recording.frame_count
    images = np.empty((n, len(cams), size, size), np.uint8)
    usability = np.zeros((n, len(cams)), np.uint8)
    for i, frame in enumerate(recording.iter_frames(cameras=list(cameras))):
        for c, name in enumerate(cameras):
            full = frame.images[name]
            usability[i, c] = check_image(full, check)
            images[i, c] = downsample(full, size)
        if progress is not None:
            progress(i + 1)
    scale = np.array([size / cam.intrinsics.width for cam in cams], np.float32)
    points, conf = _keypoints(recording, cameras, scale, n)
    if points is not None:
        dark = usability != USABLE  # a dark camera's detector output is not trusted
        points[dark] = np.nan
        conf[dark] = 0.0
    return HmcClip(
        recording=recording.name, cameras=tuple(cameras),
        mirrored=np.array([cam.mirrored for cam in cams]), images=images, scale=scale,
        timestamps_ns=np.asarray(recording.frame_timestamps_ns, np.int64),
        keypoints=points, keypoint_confidence=conf, usability=usability, segments=tuple(recording.segments),
    )


def _keypoints(
    recording: Recording, cameras: Sequence[str], scale: np.ndarray, n: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Stacked keypoints of the cameras that have them; cameras without get NaN rows.

    A recording where no camera has keypoints gives (None, None). Cameras with keypoints
    must agree on the point count (one detector per recording, capture contract).
    """
    found = {c: recording.keypoints(c) for c in cameras}
    counts = {c: kp[0].shape[1] for c, kp in found.items() if kp is not None}
    if not counts:
        return None, None
    if len(set(counts.values())) > 1:
        raise ConfigError(f"{recording.root}: cameras' keypoint counts differ: {counts}")
    p = next(iter(counts.values()))
    points = np.full((n, len(cameras), p, 2), np.nan, np.float32)
    conf = np.zeros((n, len(cameras), p), np.float32)
    for c, name in enumerate(cameras):
        if found[name] is None:
            continue
        pts, cf = found[name]
        # Model pixel centres: stored pixel centre x maps to (x + 0.5) * s - 0.5.
        points[:, c] = (pts + 0.5) * scale[c] - 0.5
        conf[:, c] = np.where(np.isfinite(pts).all(-1), cf, 0.0)
    return points, conf


def network_input(images: np.ndarray, mirrored: np.ndarray):
    """(B, C, S, S) uint8 -> (B, C, S, S) float32 torch tensor in [0, 1], mirrored cameras flipped.

    Flipping makes a left camera look like a right one, so the per-camera encoder's weights
    can be shared across symmetric cameras.
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    flip = torch.as_tensor(np.asarray(mirrored, bool))
    if bool(flip.any()):
        x[:, flip] = x[:, flip].flip(-1)
    return x
