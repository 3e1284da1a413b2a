"""Writes a capture folder in the exact layout the reader expects (docs/capture-format.md).

Used by the synthetic generator and by converters from real capture systems. Output is
byte-identical for identical inputs (canonical JSON, fixed PNG compression, no dates), and
every file is written to a hidden temporary name and renamed, so a crash never leaves a
half-written file behind. The writer checks what it writes with the same rules the
reader applies; a violation raises :class:`~pipeline.errors.CaptureError` naming the file
it would have written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import CaptureError
from storage.capture_files import (
    atomic_write_bytes,
    check_timestamps,
    dump_json_bytes,
    encode_npz,
    read_json,
    timestamps_to_csv,
)
from storage.capture_layout import RIG_RELPATH, CaptureLayout, folder_name, unsafe_name_reason
from storage.capture_schema import (
    Manifest,
    check_manifest,
    check_phone_intrinsics,
    manifest_to_json,
    phone_intrinsics_to_json,
    raise_problems,
)
from storage.capture_types import HmcRig, PinholeIntrinsics, Segment
from storage.hmc_schema import (
    check_rig,
    check_segments,
    parse_rig,
    rig_to_json,
    segments_to_json,
)
from storage.png_io import ImageKind, encode_png

__all__ = ["CaptureWriter"]


class CaptureWriter:
    """Writes one subject's capture folder, file by file.

    The order of calls is free, except that the checks against the rig (camera names and
    image sizes) and against the intrinsics (phone frame size) only happen once those were
    written (in this process or an earlier one). Call :meth:`finalize` last: a capture
    without capture.json is not a capture, so a crashed writer leaves nothing a reader
    would accept.

    Args:
        root: the capture folder to create; its name must be ``subject_id``.
        subject_id: the subject, a safe name (``^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$``, no "..").

    Raises:
        CaptureError: unsafe subject id or folder name mismatch.
    """

    def __init__(self, root: str | Path, subject_id: str) -> None:
        self.root = Path(root)
        reason = unsafe_name_reason(subject_id, "subject id")
        if reason:
            raise CaptureError(self.root, reason)
        if folder_name(self.root) != subject_id:
            raise CaptureError(
                self.root, f"capture folder name must equal the subject id {subject_id!r}"
            )
        self.subject_id = subject_id
        self.layout = CaptureLayout(self.root)
        self._rig: HmcRig | None = None
        self._intrinsics: dict[str, PinholeIntrinsics] = {}
        self.root.mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------------------------- helpers

    @staticmethod
    def _name(name: str, what: str, path: Path) -> None:
        reason = unsafe_name_reason(name, what)
        if reason:
            raise CaptureError(path, reason)

    @staticmethod
    def _index(index: int, path: Path) -> None:
        if isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0:
            raise CaptureError(path, f"frame index must be an integer >= 0, got {index!r}")

    def _rig_or_none(self) -> HmcRig | None:
        """The rig written so far (possibly by an earlier process), or None."""
        if self._rig is None and self.layout.rig.is_file():
            self._rig = parse_rig(read_json(self.layout.rig, self.root), self.layout.rig)
        return self._rig

    def _intrinsics_or_none(self, expression: str) -> PinholeIntrinsics | None:
        if expression not in self._intrinsics:
            path = self.layout.phone_intrinsics(expression)
            if not path.is_file():
                return None
            intr, problems = check_phone_intrinsics(read_json(path, self.root))
            raise_problems(path, problems)
            assert intr is not None
            self._intrinsics[expression] = intr
        return self._intrinsics[expression]

    @staticmethod
    def _png(path: Path, image: np.ndarray, kind: ImageKind) -> bytes:
        try:
            return encode_png(image, kind)
        except ValueError as exc:
            raise CaptureError(path, str(exc)) from None

    # ---------------------------------------------------------------------------- phone

    def write_phone_intrinsics(self, expression: str, intrinsics: PinholeIntrinsics) -> Path:
        """Writes phone/<expression>/intrinsics.json (depth_unit_m is always 0.001).

        Args:
            expression: expression name (a safe name).
            intrinsics: the RGB (= registered depth) camera of this expression's frames.
        """
        path = self.layout.phone_intrinsics(expression)
        self._name(expression, "expression", path)
        obj = phone_intrinsics_to_json(intrinsics)
        intr, problems = check_phone_intrinsics(obj)
        raise_problems(path, problems)
        atomic_write_bytes(path, dump_json_bytes(obj))
        self._intrinsics[expression] = intr  # type: ignore[assignment]
        return path

    def write_phone_frame(
        self, expression: str, index: int, rgb: np.ndarray, depth_mm: np.ndarray
    ) -> tuple[Path, Path]:
        """Writes one registered pair <index>_rgb.png and <index>_depth.png.

        Args:
            expression: expression name.
            index: frame index; frames must end up numbered 0..N-1.
            rgb: (H, W, 3) uint8, RGB order.
            depth_mm: (H, W) uint16 millimetres, 0 = invalid, same size as ``rgb``.

        Returns:
            (rgb path, depth path).
        """
        rgb_path = self.layout.phone_rgb(expression, index)
        depth_path = self.layout.phone_depth(expression, index)
        rgb, depth_mm = np.asarray(rgb), np.asarray(depth_mm)
        self._name(expression, "expression", rgb_path)
        self._index(index, rgb_path)
        rgb_png = self._png(rgb_path, rgb, "rgb")
        depth_png = self._png(depth_path, depth_mm, "depth")
        h, w = rgb.shape[:2]
        if depth_mm.shape != (h, w):
            dh, dw = depth_mm.shape
            raise CaptureError(depth_path, f"depth is {dw}x{dh} but RGB is {w}x{h}")
        intr = self._intrinsics_or_none(expression)
        if intr is not None and (w, h) != (intr.width, intr.height):
            raise CaptureError(
                rgb_path, f"RGB is {w}x{h} but intrinsics.json is {intr.width}x{intr.height}"
            )
        atomic_write_bytes(rgb_path, rgb_png)
        atomic_write_bytes(depth_path, depth_png)
        return rgb_path, depth_path

    # ------------------------------------------------------------------------------ hmc

    def write_rig(self, rig: HmcRig) -> Path:
        """Writes hmc/rig.json (cameras in the given order; the first is the reference)."""
        path = self.layout.rig
        obj = rig_to_json(rig)
        _, problems = check_rig(obj)
        raise_problems(path, problems)
        atomic_write_bytes(path, dump_json_bytes(obj))
        self._rig = rig
        return path

    def _camera_path(self, recording: str, camera: str, path: Path) -> None:
        self._name(recording, "recording", path)
        self._name(camera, "camera name", path)
        rig = self._rig_or_none()
        if rig is not None and camera not in rig.names:
            raise CaptureError(
                path, f"camera {camera!r} is not in the rig ({', '.join(rig.names)})"
            )

    def write_hmc_frame(self, recording: str, camera: str, index: int, image: np.ndarray) -> Path:
        """Writes hmc/<recording>/<camera>/<index>.png.

        Args:
            recording: recording name.
            camera: a rig camera name.
            index: frame index.
            image: (H, W) uint8 monochrome, as the sensor delivers it (never mirrored); the
                rig's width x height for that camera.
        """
        path = self.layout.hmc_frame(recording, camera, index)
        self._camera_path(recording, camera, path)
        self._index(index, path)
        image = np.asarray(image)
        data = self._png(path, image, "mono")
        rig = self._rig_or_none()
        if rig is not None:
            cam = rig.camera(camera)
            h, w = image.shape
            if (w, h) != (cam.width, cam.height):
                raise CaptureError(
                    path, f"image is {w}x{h} but rig camera {camera} is {cam.width}x{cam.height}"
                )
        atomic_write_bytes(path, data)
        return path

    def write_timestamps(self, recording: str, camera: str, timestamps_ns: np.ndarray) -> Path:
        """Writes hmc/<recording>/<camera>/timestamps.csv.

        Args:
            timestamps_ns: (T,) integer nanoseconds, strictly increasing, one per frame.
        """
        path = self.layout.timestamps(recording, camera)
        self._camera_path(recording, camera, path)
        stamps = np.asarray(timestamps_ns)
        if stamps.ndim != 1 or not np.issubdtype(stamps.dtype, np.integer):
            raise CaptureError(
                path, f"timestamps must be (T,) integers, got {stamps.shape} {stamps.dtype}"
            )
        data = timestamps_to_csv(stamps)
        _, problems = check_timestamps(data)
        raise_problems(path, problems)
        atomic_write_bytes(path, data)
        return path

    def write_segments(self, recording: str, segments: Sequence[Segment]) -> Path:
        """Writes hmc/<recording>/segments.json (checked against the rig when known)."""
        path = self.layout.segments(recording)
        self._name(recording, "recording", path)
        obj = segments_to_json(segments)
        rig = self._rig_or_none()
        _, problems = check_segments(obj, None, None if rig is None else set(rig.names))
        raise_problems(path, problems)
        atomic_write_bytes(path, dump_json_bytes(obj))
        return path

    def write_keypoints(
        self, recording: str, camera: str, points: np.ndarray, confidence: np.ndarray
    ) -> Path:
        """Writes hmc/<recording>/keypoints/<camera>.npz.

        Args:
            points: (T, P, 2) pixel coordinates (stored as float32), NaN where undetected.
            confidence: (T, P) in [0, 1] (stored as float32).
        """
        path = self.layout.keypoints(recording, camera)
        self._camera_path(recording, camera, path)
        pts = np.asarray(points, dtype=np.float32)
        conf = np.asarray(confidence, dtype=np.float32)
        if pts.ndim != 3 or pts.shape[2] != 2 or conf.shape != pts.shape[:2]:
            raise CaptureError(
                path,
                f"need points (T, P, 2) and confidence (T, P), got {pts.shape} and {conf.shape}",
            )
        if not np.all(np.isfinite(conf) & (conf >= 0) & (conf <= 1)):
            raise CaptureError(path, "confidence must be finite and within [0, 1]")
        if np.isinf(pts).any():
            raise CaptureError(path, "points must be finite pixels (NaN marks an undetected point)")
        atomic_write_bytes(path, encode_npz({"points": pts, "confidence": conf}))
        return path

    # ------------------------------------------------------------------------- manifest

    def finalize(self, phone_expressions: Sequence[str], recordings: Sequence[str]) -> Path:
        """Writes capture.json, which makes the folder a capture. Call it last.

        Args:
            phone_expressions: expression names, in the order readers will list them.
            recordings: recording names, in order.

        Raises:
            CaptureError: a name is unsafe or repeated, or a listed expression or recording
                was not written.
        """
        path = self.layout.manifest
        manifest = Manifest(
            self.subject_id, tuple(phone_expressions), RIG_RELPATH, tuple(recordings)
        )
        obj = manifest_to_json(manifest)
        _, problems = check_manifest(obj)
        raise_problems(path, problems)
        for expression in manifest.phone_expressions:
            if not self.layout.phone_intrinsics(expression).is_file():
                raise CaptureError(
                    self.layout.phone_intrinsics(expression),
                    f"expression {expression!r} is listed but its intrinsics.json was not written",
                )
        for recording in manifest.recordings:
            if not self.layout.recording_dir(recording).is_dir():
                raise CaptureError(
                    self.layout.recording_dir(recording),
                    f"recording {recording!r} is listed but was not written",
                )
        if not self.layout.rig.is_file():
            raise CaptureError(self.layout.rig, "the rig was not written (call write_rig)")
        atomic_write_bytes(path, dump_json_bytes(obj))
        return path
