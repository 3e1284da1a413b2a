"""Typed, streaming reader of a capture folder (docs/capture-format.md).

``Capture.open`` reads only the manifest; everything else is read when asked for, one
file at a time, and checked as it is read. Every read goes through
:mod:`storage.capture_fs` (inside the capture folder, regular files only, size limits
checked first; an image's header is checked before its pixels are decoded). Any violation of the capture contract raises
:class:`~pipeline.errors.CaptureError` naming the file and the problem. Asking for a name
the capture does not have (an expression, recording or camera) raises ``KeyError`` and an
index out of range raises ``IndexError``: those are the caller's mistakes, not the data's.

Example:
    >>> cap = Capture.open("captures/subj0000")
    >>> rec = cap.recording(cap.recordings[0])
    >>> for frame in rec.iter_frames(cameras=["eye_left", "eye_right"]):
    ...     frame.images["eye_left"]  # (400, 400) uint8
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import CaptureError
from storage.capture_files import check_keypoints, read_json, read_timestamps
from storage.capture_fs import dir_problem, file_exists, list_dir
from storage.capture_layout import (
    PHONE_FILE_RE,
    CaptureLayout,
    first_gap,
    folder_name,
    resolve_inside,
)
from storage.capture_schema import (
    Manifest,
    parse_manifest,
    parse_phone_intrinsics,
    raise_problems,
)
from storage.capture_types import (
    HmcFrame,
    HmcRig,
    PhoneFrame,
    PhoneIntrinsics,
    Segment,
)
from storage.hmc_schema import (
    frame_count_mismatch,
    parse_rig,
    parse_segments,
)
from storage.png_io import read_image

__all__ = ["Capture", "Recording"]


class Capture:
    """One subject's capture folder, opened for reading.

    Cheap to create and to pickle (it holds paths and small parsed documents only), so it
    can be shipped to Dask workers. Cached documents are immutable.
    """

    def __init__(self, root: Path, manifest: Manifest) -> None:
        """Use :meth:`Capture.open`; this constructor trusts its arguments."""
        self._root = root
        self._manifest = manifest
        self.layout = CaptureLayout(root)
        self._recordings: dict[str, Recording] = {}
        self._intrinsics: dict[str, PhoneIntrinsics] = {}
        self._frame_counts: dict[str, int] = {}

    @classmethod
    def open(cls, path: str | Path) -> Capture:
        """Opens a capture folder, reading and checking capture.json only.

        Raises:
            CaptureError: the folder or manifest is missing or invalid, or the subject id
                does not match the folder name.
        """
        root = Path(path)
        if not root.is_dir():
            raise CaptureError(root, "capture folder does not exist or is not a folder")
        layout = CaptureLayout(root)
        manifest = parse_manifest(read_json(layout.manifest, root), layout.manifest)
        if manifest.subject_id != folder_name(root):
            raise CaptureError(
                layout.manifest,
                f"subject id {manifest.subject_id!r} does not match the capture folder name "
                f"{folder_name(root)!r}",
            )
        return cls(root, manifest)

    @classmethod
    def of(cls, capture: str | os.PathLike | Capture) -> Capture:
        """:meth:`open` of a folder path (what the engine passes a stage as its
        ``"capture"`` input); anything else is taken as an already opened capture."""
        return cls.open(capture) if isinstance(capture, str | os.PathLike) else capture

    def __repr__(self) -> str:
        return f"Capture({str(self._root)!r}, subject_id={self.subject_id!r})"

    @property
    def root(self) -> Path:
        """The capture folder."""
        return self._root

    @property
    def subject_id(self) -> str:
        return self._manifest.subject_id

    @property
    def phone_expressions(self) -> tuple[str, ...]:
        """Expression names, in manifest order."""
        return self._manifest.phone_expressions

    @property
    def recordings(self) -> tuple[str, ...]:
        """Recording names, in manifest order."""
        return self._manifest.recordings

    @property
    def rig_path(self) -> Path:
        path = resolve_inside(self._root, self._manifest.rig_path)
        assert path is not None  # the manifest check guarantees it
        return path

    @functools.cached_property
    def rig(self) -> HmcRig:
        """The headset camera rig (read on first use).

        Raises:
            CaptureError: rig.json is missing or invalid.
        """
        return parse_rig(read_json(self.rig_path, self._root), self.rig_path)

    # ------------------------------------------------------------------------- phone

    def _check_expression(self, expression: str) -> None:
        if expression not in self._manifest.phone_expressions:
            raise KeyError(
                f"no expression {expression!r} in capture {self.subject_id!r}; "
                f"has {list(self.phone_expressions)}"
            )

    def phone_intrinsics(self, expression: str) -> PhoneIntrinsics:
        """The intrinsics shared by the frames of ``expression``.

        Raises:
            KeyError: unknown expression.
            CaptureError: intrinsics.json missing or invalid.
        """
        self._check_expression(expression)
        if expression not in self._intrinsics:
            path = self.layout.phone_intrinsics(expression)
            self._intrinsics[expression] = parse_phone_intrinsics(
                read_json(path, self._root), path
            )
        return self._intrinsics[expression]

    def phone_frame_count(self, expression: str) -> int:
        """Number of RGB + depth frames of ``expression`` (lists the folder, reads no image).

        Raises:
            KeyError: unknown expression.
            CaptureError: missing folder, no frames, or frames not numbered 0..N-1.
        """
        self._check_expression(expression)
        if expression not in self._frame_counts:
            self._frame_counts[expression] = self._count_phone_frames(expression)
        return self._frame_counts[expression]

    def _count_phone_frames(self, expression: str) -> int:
        folder = self.layout.phone_dir(expression)
        if not file_exists(folder):
            raise CaptureError(folder, "missing expression folder (listed in capture.json)")
        indices = sorted(
            int(m.group(1))
            for m in (PHONE_FILE_RE.fullmatch(name) for name in list_dir(folder, self._root))
            if m and m.group(2) == "rgb"
        )
        if not indices:
            raise CaptureError(folder, "expression has no frames (no 000000_rgb.png)")
        missing = first_gap(indices)
        if missing is not None:
            raise CaptureError(
                self.layout.phone_rgb(expression, missing),
                f"missing file: frames must be numbered 0..N-1 without gaps ({len(indices)} frames found)",
            )
        return len(indices)

    def read_phone_frame(self, expression: str, index: int) -> PhoneFrame:
        """Reads and checks one RGB + depth pair.

        Raises:
            KeyError: unknown expression.
            IndexError: ``index`` out of range.
            CaptureError: a file is missing or undecodable, has the wrong dtype or channel
                count, or RGB, depth and intrinsics disagree on the size.
        """
        count = self.phone_frame_count(expression)
        if not 0 <= index < count:
            raise IndexError(f"phone frame {index} out of range 0..{count - 1} of {expression!r}")
        intr = self.phone_intrinsics(expression)
        rgb_path = self.layout.phone_rgb(expression, index)
        depth_path = self.layout.phone_depth(expression, index)
        size = (intr.width, intr.height)
        rgb = read_image(rgb_path, "rgb", self._root, expected=size, source="intrinsics.json")
        depth = read_image(depth_path, "depth", self._root, expected=size, source="RGB")
        return PhoneFrame(expression, index, rgb, depth, intr, rgb_path, depth_path)

    def iter_phone_frames(self, expression: str) -> Iterator[PhoneFrame]:
        """Yields the frames of ``expression`` in order, reading one pair per step."""
        count = self.phone_frame_count(expression)  # eager: bad names fail at the call
        return (self.read_phone_frame(expression, i) for i in range(count))

    # --------------------------------------------------------------------------- hmc

    def recording(self, name: str) -> Recording:
        """The recording called ``name`` (reads nothing yet).

        Raises:
            KeyError: the manifest does not list ``name``.
            CaptureError: its folder is missing.
        """
        if name not in self._manifest.recordings:
            raise KeyError(
                f"no recording {name!r} in capture {self.subject_id!r}; has {list(self.recordings)}"
            )
        if name not in self._recordings:
            folder = self.layout.recording_dir(name)
            if not file_exists(folder):
                raise CaptureError(folder, "missing recording folder (listed in capture.json)")
            problem = dir_problem(folder, self._root)
            if problem:
                raise CaptureError(folder, problem)
            self._recordings[name] = Recording(self, name)
        return self._recordings[name]


class Recording:
    """One HMC recording: synchronised monochrome frames of every rig camera."""

    def __init__(self, capture: Capture, name: str) -> None:
        """Use :meth:`Capture.recording`."""
        self.capture = capture
        self.name = name
        self._layout = capture.layout
        self._timestamps: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"Recording({self.capture.subject_id!r}, {self.name!r})"

    @property
    def root(self) -> Path:
        return self._layout.recording_dir(self.name)

    @property
    def rig(self) -> HmcRig:
        return self.capture.rig

    @property
    def cameras(self) -> tuple[str, ...]:
        """Camera names in rig order."""
        return self.rig.names

    def timestamps_ns(self, camera: str) -> np.ndarray:
        """(T,) int64 read-only timestamps of ``camera``, nanoseconds, strictly increasing.

        Raises:
            KeyError: unknown camera.
            CaptureError: timestamps.csv missing, malformed or not strictly increasing.
        """
        self.rig.camera(camera)
        if camera not in self._timestamps:
            self._timestamps[camera] = read_timestamps(
                self._layout.timestamps(self.name, camera), self.capture.root
            )
        return self._timestamps[camera]

    @functools.cached_property
    def frame_count(self) -> int:
        """Frames in the recording (every camera has this many).

        Raises:
            CaptureError: cameras disagree on the count, or a timestamps file is invalid.
        """
        counts = {cam: len(self.timestamps_ns(cam)) for cam in self.cameras}
        problem = frame_count_mismatch(counts)
        if problem:
            raise CaptureError(self.root, problem)
        return next(iter(counts.values()))

    @property
    def frame_timestamps_ns(self) -> np.ndarray:
        """(T,) int64 frame timestamps: the reference (first rig) camera's."""
        return self.timestamps_ns(self.cameras[0])

    @property
    def duration_s(self) -> float:
        """frame_count / fps, seconds."""
        return self.frame_count / self.rig.fps

    @functools.cached_property
    def segments(self) -> tuple[Segment, ...]:
        """The annotated segments, checked against the frame count and the rig.

        Raises:
            CaptureError: segments.json missing or invalid (names the file).
        """
        path = self._layout.segments(self.name)
        return parse_segments(
            read_json(path, self.capture.root), path, self.frame_count, set(self.cameras)
        )

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.frame_count:
            raise IndexError(
                f"frame {index} out of range 0..{self.frame_count - 1} of {self.name!r}"
            )

    def read_frame(self, camera: str, index: int) -> np.ndarray:
        """Reads one image: (H, W) uint8, as stored (not mirrored).

        Raises:
            KeyError: unknown camera.
            IndexError: ``index`` out of range.
            CaptureError: missing or undecodable file, not 8-bit monochrome, or not the
                rig's size for that camera.
        """
        cam = self.rig.camera(camera)
        self._check_index(index)
        path = self._layout.hmc_frame(self.name, camera, index)
        return read_image(
            path, "mono", self.capture.root, expected=cam.intrinsics.size,
            source=f"rig camera {camera}",
        )  # fmt: skip

    def iter_frames(
        self, cameras: Sequence[str] | None = None, start: int = 0, stop: int | None = None
    ) -> Iterator[HmcFrame]:
        """Yields frames ``start..stop-1`` one at a time, reading one image per camera per step.

        Args:
            cameras: the cameras to read (default: all, rig order).
            start: first frame index.
            stop: one past the last frame index (default: the frame count).

        Raises:
            KeyError: unknown camera (raised at the call, before any frame is read).
            IndexError: start/stop out of range (at the call).
            CaptureError: while iterating, from the frame that is invalid.
        """
        names = tuple(self.cameras if cameras is None else cameras)
        for cam in names:
            self.rig.camera(cam)
        stop = self.frame_count if stop is None else stop
        if not 0 <= start <= stop <= self.frame_count:
            raise IndexError(
                f"frames {start}..{stop} out of range 0..{self.frame_count} of {self.name!r}"
            )
        stamps = {cam: self.timestamps_ns(cam) for cam in names}
        reference = self.frame_timestamps_ns
        return self._frames(names, start, stop, stamps, reference)

    def _frames(
        self,
        names: tuple[str, ...],
        start: int,
        stop: int,
        stamps: dict[str, np.ndarray],
        reference: np.ndarray,
    ) -> Iterator[HmcFrame]:
        for index in range(start, stop):
            images = {cam: self.read_frame(cam, index) for cam in names}
            yield HmcFrame(
                index=index,
                timestamp_ns=int(reference[index]),
                images=images,
                timestamps_ns={cam: int(stamps[cam][index]) for cam in names},
            )

    def keypoints(self, camera: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The external detector's keypoints of ``camera``, or None when there are none.

        Returns:
            (points (T, P, 2) float32 pixels, NaN where undetected;
            confidence (T, P) float32 in [0, 1]) or None.

        Raises:
            KeyError: unknown camera.
            CaptureError: the file exists but is invalid.
        """
        self.rig.camera(camera)
        path = self._layout.keypoints(self.name, camera)
        if not file_exists(path):  # a dangling symlink is an error, not "no keypoints"
            return None
        result, problems = check_keypoints(path, self.capture.root, self.frame_count)
        raise_problems(path, problems)
        return result
