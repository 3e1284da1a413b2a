"""Typed, immutable records of what a capture holds (docs/capture-format.md).

Arrays held by these records are read-only copies, so a record can be shared between
threads and cached without anyone mutating it behind the cache's back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rigs.camera import PinholeIntrinsics  # the capture's intrinsics are the cameras' own
from rigs.lens import DEFAULT_LENS_MODEL, LENS_MODELS
from storage.capture_layout import DEPTH_UNIT_M


def _frozen_array(value: object, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only C-contiguous copy of ``value`` with the given dtype and shape."""
    arr = np.array(value, dtype=dtype, copy=True)
    if arr.shape != shape:
        raise ValueError(f"expected shape {shape}, got {arr.shape}")
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True)
class PhoneIntrinsics(PinholeIntrinsics):
    """Intrinsics of a phone RGBD expression scan; depth is registered to RGB.

    Attributes:
        depth_unit_m: metres per depth count (always 0.001: depth is in millimetres).
    """

    depth_unit_m: float = DEPTH_UNIT_M


@dataclass(frozen=True, eq=False)
class HmcCamera:
    """One calibrated headset camera.

    Attributes:
        name: camera name, e.g. "eye_left" (also its folder name).
        role: "embedded" (on the consumer headset) or "gt" (data-collection only).
        mirrored: whether the image is flipped left-right at model input. Stored images
            are never mirrored; consumers flip them.
        intrinsics: pinhole intrinsics, image size included.
        distortion: float64 coefficients of ``model``: (5,) k1, k2, p1, p2, k3 for
            "opencv", (4,) k1, k2, k3, k4 for "opencv_fisheye".
        R_headset_from_camera: (3, 3) float64 rotation, camera frame -> headset frame.
        t_headset_from_camera: (3,) float64 camera centre in the headset frame, metres.
        model: lens model, "opencv" (default) or "opencv_fisheye" (:mod:`rigs.lens`).
    """

    name: str
    role: str
    mirrored: bool
    intrinsics: PinholeIntrinsics
    distortion: np.ndarray
    R_headset_from_camera: np.ndarray
    t_headset_from_camera: np.ndarray
    model: str = DEFAULT_LENS_MODEL

    def __post_init__(self) -> None:
        # Frozen: go through object.__setattr__ to store the read-only copies.
        n_coefficients = LENS_MODELS[self.model]
        object.__setattr__(
            self, "distortion", _frozen_array(self.distortion, np.float64, (n_coefficients,))
        )
        object.__setattr__(
            self,
            "R_headset_from_camera",
            _frozen_array(self.R_headset_from_camera, np.float64, (3, 3)),
        )
        object.__setattr__(
            self,
            "t_headset_from_camera",
            _frozen_array(self.t_headset_from_camera, np.float64, (3,)),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HmcCamera):
            return NotImplemented
        return (
            (self.name, self.role, self.mirrored, self.intrinsics, self.model)
            == (other.name, other.role, other.mirrored, other.intrinsics, other.model)
            and np.array_equal(self.distortion, other.distortion)
            and np.array_equal(self.R_headset_from_camera, other.R_headset_from_camera)
            and np.array_equal(self.t_headset_from_camera, other.t_headset_from_camera)
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays

    @property
    def width(self) -> int:
        return self.intrinsics.width

    @property
    def height(self) -> int:
        return self.intrinsics.height


@dataclass(frozen=True)
class HmcRig:
    """The headset camera rig (hmc/rig.json).

    Attributes:
        rig_version: free-form version string of the calibration.
        fps: nominal frame rate, Hz.
        cameras: the cameras, in file order. The first one is the reference camera whose
            timestamps are the recording's frame timestamps.
    """

    rig_version: str
    fps: float
    cameras: tuple[HmcCamera, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Camera names in rig order."""
        return tuple(c.name for c in self.cameras)

    @property
    def embedded(self) -> tuple[HmcCamera, ...]:
        """Cameras of the consumer headset (role "embedded")."""
        return tuple(c for c in self.cameras if c.role == "embedded")

    @property
    def ground_truth(self) -> tuple[HmcCamera, ...]:
        """Data-collection-only cameras (role "gt")."""
        return tuple(c for c in self.cameras if c.role == "gt")

    def camera(self, name: str) -> HmcCamera:
        """The camera called ``name``.

        Raises:
            KeyError: no camera has that name.
        """
        for cam in self.cameras:
            if cam.name == name:
                return cam
        raise KeyError(f"no camera {name!r} in rig {self.rig_version!r}; has {list(self.names)}")


@dataclass(frozen=True)
class Segment:
    """One annotated window of a recording, frames [start, end).

    Attributes:
        kind: one of neutral, peak, eye_closure, wink, mouth_closed, speech.
        start: first frame index (inclusive).
        end: one past the last frame index (exclusive).
        prompt: the prompt name (peak segments only).
        eye: "left" or "right", the closed eye (wink segments only).
        cameras: the views in which the segment is visible; empty means all.
    """

    kind: str
    start: int
    end: int
    prompt: str | None = None
    eye: str | None = None
    cameras: tuple[str, ...] = ()

    @property
    def frames(self) -> range:
        """The frame indices of the segment."""
        return range(self.start, self.end)

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, eq=False)
class PhoneFrame:
    """One registered RGB + depth frame of a phone expression scan.

    Attributes:
        expression: the expression (prompt) name.
        index: frame index within the expression burst.
        rgb: (H, W, 3) uint8, RGB channel order.
        depth_mm: (H, W) uint16 depth in millimetres, 0 = invalid.
        intrinsics: the expression's intrinsics (shared by its frames).
        rgb_path: the file ``rgb`` was read from.
        depth_path: the file ``depth_mm`` was read from.
    """

    expression: str
    index: int
    rgb: np.ndarray
    depth_mm: np.ndarray
    intrinsics: PhoneIntrinsics
    rgb_path: Path
    depth_path: Path

    @property
    def depth_m(self) -> np.ndarray:
        """(H, W) float32 depth in metres, NaN where the raw depth is 0 (invalid)."""
        depth = self.depth_mm.astype(np.float32) * np.float32(self.intrinsics.depth_unit_m)
        depth[self.depth_mm == 0] = np.nan
        return depth


@dataclass(frozen=True, eq=False)
class HmcFrame:
    """One synchronised time step of a recording.

    Attributes:
        index: frame index.
        timestamp_ns: the reference (first rig) camera's timestamp, nanoseconds.
        images: camera name -> (H, W) uint8 image, as stored (not mirrored).
        timestamps_ns: camera name -> that camera's own timestamp, nanoseconds.
    """

    index: int
    timestamp_ns: int
    images: dict[str, np.ndarray]
    timestamps_ns: dict[str, int] = field(default_factory=dict)
