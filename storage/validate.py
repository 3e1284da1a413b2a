"""Whole-capture validation and a human-readable summary (docs/capture-format.md).

``validate_capture`` reports *every* problem it finds, each as a
:class:`~pipeline.errors.CaptureError` naming the file, so that a data engineer can fix a
capture in one pass. With ``deep=False`` it checks the structure, the JSON documents, the
timestamps and the PNG headers; with ``deep=True`` it also decodes every image, one at a
time. Every read is bounded and stays inside the capture folder
(:mod:`storage.capture_fs`); a first pass over the folder reports what no reader would
accept anywhere in it (non-UTF-8 names, symlinks leaving the folder or dangling, FIFOs).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.errors import CaptureError, printable
from storage.capture import Capture
from storage.capture_files import check_keypoints, check_timestamps, read_json
from storage.capture_fs import (
    LIMITS,
    dir_problem,
    file_exists,
    list_dir,
    read_capture_bytes,
    scan_tree,
)
from storage.capture_layout import (
    HMC_FILE_RE,
    PHONE_FILE_RE,
    RESERVED_RECORDING_ENTRIES,
    SEGMENT_KINDS,
    CaptureLayout,
    first_gap,
    folder_name,
    is_safe_name,
    resolve_inside,
)
from storage.capture_schema import (
    MAX_PROBLEMS_PER_FILE,
    Manifest,
    check_manifest,
    check_phone_intrinsics,
)
from storage.capture_types import HmcCamera, HmcRig
from storage.hmc_schema import (
    check_rig,
    check_segments,
    frame_count_mismatch,
)
from storage.png_io import ImageKind, header_problem, read_image, read_png_header, size_problem

__all__ = ["ProgressCallback", "summarize_capture", "validate_capture"]

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each image (or RGB + depth pair) is checked."""


def validate_capture(
    path: str | Path,
    deep: bool = True,
    *,
    progress: ProgressCallback | None = None,
    prompts: Collection[str] | None = None,
) -> list[CaptureError]:
    """Checks a capture folder against the capture contract.

    Args:
        path: the capture folder.
        deep: also decode every image (slow on full captures; streams one image at a time).
        progress: called as ``progress(done, total)`` while images are checked; when None,
            a tqdm bar is shown on an interactive terminal.
        prompts: known prompt names; when given, a peak segment's prompt must be one.

    Returns:
        Every problem found, in a stable order (manifest, phone, rig, recordings, images);
        an empty list means the capture is valid.
    """
    return _Validator(Path(path), deep, prompts).run(progress)


@dataclass(frozen=True)
class _ImageJob:
    """One image (or RGB + depth pair) to check after the structural pass."""

    path: Path
    kind: ImageKind
    expected: tuple[int, int] | None  # (width, height)
    source: str  # where the expected size comes from, for the message
    depth: Path | None = None  # the registered depth of an RGB frame


class _Validator:
    def __init__(self, root: Path, deep: bool, prompts: Collection[str] | None) -> None:
        self.root = root
        self.deep = deep
        self.prompts = prompts
        self.layout = CaptureLayout(root)
        self.errors: list[CaptureError] = []
        self.jobs: list[_ImageJob] = []
        self.camera_names: set[str] = set()  # every camera name rig.json lists

    def add(self, path: Path, problem: str) -> None:
        self.errors.append(CaptureError(path, problem))

    def add_all(self, path: Path, problems: list[str]) -> None:
        """Reports a document's problems, at most :data:`MAX_PROBLEMS_PER_FILE` of them."""
        for problem in problems[:MAX_PROBLEMS_PER_FILE]:
            self.add(path, problem)
        rest = problems[MAX_PROBLEMS_PER_FILE:]
        if rest:
            stopped = rest[-1] if rest[-1].startswith("checking stopped") else ""
            more = len(rest) - bool(stopped)
            self.add(path, "; ".join(filter(None, [more and f"... and {more} more problems", stopped])))

    def read_json(self, path: Path) -> object | None:
        try:
            return read_json(path, self.root)
        except CaptureError as exc:
            self.errors.append(exc)
            return None

    def folder(self, path: Path, missing: str) -> bool:
        """True when ``path`` is a usable folder of the capture; reports why not."""
        problem = dir_problem(path, self.root) if file_exists(path) else missing
        if problem:
            self.add(path, problem)
        return problem is None

    def listing(self, folder: Path) -> list[str]:
        try:
            return list_dir(folder, self.root)
        except CaptureError as exc:
            self.errors.append(exc)
            return []

    def run(self, progress: ProgressCallback | None) -> list[CaptureError]:
        if not self.root.is_dir():
            self.add(self.root, "capture folder does not exist or is not a folder")
            return self.unique_errors()
        try:
            _, problems = scan_tree(self.root)
        except CaptureError as exc:  # over the entry or depth limit: read nothing more
            self.errors.append(exc)
            return self.unique_errors()
        self.errors.extend(problems)
        manifest = self.check_manifest()
        if manifest is None:
            return self.unique_errors()
        for expression in manifest.phone_expressions:
            self.check_expression(expression)
        rig = self.check_rig(manifest)
        for recording in manifest.recordings:
            self.check_recording(recording, rig)
        self.check_images(progress)
        return self.unique_errors()

    def unique_errors(self) -> list[CaptureError]:
        """The errors in order, each (file, problem) once: the folder scan and a reader
        may both find one bad symlink or FIFO."""
        seen: set[tuple[str, str]] = set()
        out = []
        for e in self.errors:
            if (e.path, e.problem) not in seen:
                seen.add((e.path, e.problem))
                out.append(e)
        return out

    # ------------------------------------------------------------------------- manifest

    def check_manifest(self) -> Manifest | None:
        path = self.layout.manifest
        obj = self.read_json(path)
        if obj is None:
            return None
        manifest, problems = check_manifest(obj)
        self.add_all(path, problems)
        if is_safe_name(manifest.subject_id) and manifest.subject_id != folder_name(self.root):
            self.add(
                path,
                f"subject id {manifest.subject_id!r} does not match the capture folder name "
                f"{folder_name(self.root)!r}",
            )
        return manifest

    # ---------------------------------------------------------------------------- phone

    def check_expression(self, expression: str) -> None:
        folder = self.layout.phone_dir(expression)
        if not self.folder(folder, "missing expression folder (listed in capture.json)"):
            return
        intr_path = self.layout.phone_intrinsics(expression)
        intr = None
        obj = self.read_json(intr_path)
        if obj is not None:
            intr, problems = check_phone_intrinsics(obj)
            self.add_all(intr_path, problems)
        found: dict[str, set[int]] = {"rgb": set(), "depth": set()}
        for name in self.listing(folder):
            m = PHONE_FILE_RE.fullmatch(name)
            if m:
                found[m.group(2)].add(int(m.group(1)))
        indices = sorted(found["rgb"] | found["depth"])
        if not indices:
            self.add(folder, "expression has no frames (no 000000_rgb.png / 000000_depth.png)")
            return
        gap = first_gap(indices)
        if gap is not None:
            self.add(
                self.layout.phone_rgb(expression, gap),
                f"missing file: frames must be numbered 0..N-1 without gaps "
                f"({indices[-1] + 1 - len(indices)} missing)",
            )
        for i in indices:
            rgb, depth = (
                self.layout.phone_rgb(expression, i),
                self.layout.phone_depth(expression, i),
            )
            if i not in found["depth"]:
                self.add(depth, f"missing file: {rgb.name} has no registered depth")
            elif i not in found["rgb"]:
                self.add(rgb, f"missing file: {depth.name} has no RGB")
            else:
                size = None if intr is None else (intr.width, intr.height)
                self.jobs.append(_ImageJob(rgb, "rgb", size, "intrinsics.json", depth))

    # ------------------------------------------------------------------------------ rig

    def check_rig(self, manifest: Manifest) -> HmcRig | None:
        path = resolve_inside(self.root, manifest.rig_path) or self.layout.rig
        obj = self.read_json(path)
        if obj is None:
            return None
        rig, problems = check_rig(obj)
        self.add_all(path, problems)
        # Cameras listed but invalid are still known names: reporting their folders or
        # segment references as unknown would only repeat the rig's problem.
        listed = obj.get("cameras") if isinstance(obj, dict) else None
        if isinstance(listed, list):
            self.camera_names = {
                c["name"] for c in listed if isinstance(c, dict) and isinstance(c.get("name"), str)
            }
        return rig

    # ------------------------------------------------------------------------ recording

    def check_recording(self, recording: str, rig: HmcRig | None) -> None:
        folder = self.layout.recording_dir(recording)
        if not self.folder(folder, "missing recording folder (listed in capture.json)"):
            return
        if rig is None:  # without a rig only the segments can be checked
            self.check_segments(recording, None, None)
            return
        known = self.camera_names | set(RESERVED_RECORDING_ENTRIES)
        for name in self.listing(folder):
            entry = folder / name
            if entry.is_dir() and not name.startswith(".") and name not in known:
                self.add(entry, "folder is not a camera of the rig")
        counts: dict[str, int] = {}
        stamps: dict[str, np.ndarray] = {}
        for cam in rig.cameras:
            found = self.check_camera_folder(recording, cam)
            if found is not None:
                counts[cam.name], values = found
                if values is not None:
                    stamps[cam.name] = values
        problem = frame_count_mismatch(counts)
        if problem:
            self.add(folder, problem)
        frame_count = next(iter(counts.values())) if counts and not problem else None
        if frame_count == 0:
            self.add(folder, "recording has no frames")
        self.check_sync(recording, rig, stamps)
        self.check_segments(recording, frame_count, rig)
        self.check_keypoints(recording, frame_count)

    def check_camera_folder(
        self, recording: str, cam: HmcCamera
    ) -> tuple[int, np.ndarray | None] | None:
        """Checks one camera folder's listing and timestamps; queues its images.

        Returns:
            (number of frame images, valid timestamps or None), or None without a folder.
        """
        cam_dir = self.layout.camera_dir(recording, cam.name)
        if not self.folder(cam_dir, f"missing camera folder (the rig has camera {cam.name})"):
            return None
        indices = sorted(
            int(m.group(1))
            for m in (HMC_FILE_RE.fullmatch(name) for name in self.listing(cam_dir))
            if m
        )
        gap = first_gap(indices)
        if gap is not None:
            self.add(
                self.layout.hmc_frame(recording, cam.name, gap),
                f"missing file: frames must be numbered 0..N-1 without gaps "
                f"({indices[-1] + 1 - len(indices)} missing in {cam.name})",
            )
        for i in indices:
            path = self.layout.hmc_frame(recording, cam.name, i)
            self.jobs.append(_ImageJob(path, "mono", cam.intrinsics.size, f"rig camera {cam.name}"))
        ts_path = self.layout.timestamps(recording, cam.name)
        try:
            data = read_capture_bytes(ts_path, self.root, LIMITS.max_timestamps_bytes)
        except CaptureError as exc:
            self.errors.append(exc)
            return len(indices), None
        values, problems = check_timestamps(data)
        self.add_all(ts_path, problems)
        if values is not None and len(values) != len(indices):
            self.add(
                ts_path,
                f"has {len(values)} rows but {cam.name} has {len(indices)} frame images "
                "(one row per frame)",
            )
        # Only valid timestamps take part in the synchronisation check.
        return len(indices), (values if not problems else None)

    def check_sync(self, recording: str, rig: HmcRig, stamps: dict[str, np.ndarray]) -> None:
        """Cameras must be synchronised: same frame index within half a frame period."""
        ref = rig.cameras[0].name if rig.cameras else None
        if ref not in stamps or not math.isfinite(rig.fps):
            return
        half_period_ns = 0.5e9 / rig.fps
        for cam, values in stamps.items():
            if cam == ref or len(values) != len(stamps[ref]) or not len(values):
                continue
            gap = abs(values - stamps[ref])
            k = int(gap.argmax())
            if gap[k] > half_period_ns:
                self.add(
                    self.layout.timestamps(recording, cam),
                    f"camera {cam} is out of sync with {ref} at frame {k}: timestamps differ by "
                    f"{gap[k] / 1e6:.1f} ms (more than half a frame period, "
                    f"{half_period_ns / 1e6:.1f} ms)",
                )

    def check_segments(self, recording: str, frame_count: int | None, rig: HmcRig | None) -> None:
        path = self.layout.segments(recording)
        obj = self.read_json(path)
        if obj is None:
            return
        names = None if rig is None else self.camera_names
        _, problems = check_segments(obj, frame_count, names, self.prompts)
        self.add_all(path, problems)

    def check_keypoints(self, recording: str, frame_count: int | None) -> None:
        folder = self.layout.keypoints_dir(recording)
        if not file_exists(folder) or not self.folder(folder, ""):
            return
        for name in self.listing(folder):
            entry = folder / name
            if name.startswith("."):
                continue
            if entry.suffix != ".npz" or entry.stem not in self.camera_names:
                self.add(entry, "keypoint files must be named <rig camera>.npz")
                continue
            _, problems = check_keypoints(entry, self.root, frame_count)
            self.add_all(entry, problems)

    # --------------------------------------------------------------------------- images

    def check_images(self, progress: ProgressCallback | None) -> None:
        total = len(self.jobs)
        bar = None
        if progress is None:
            bar = tqdm(
                total=total,
                desc=f"validating {self.root.name}",
                unit="img",
                disable=not sys.stderr.isatty(),
            )
        for done, job in enumerate(self.jobs, start=1):
            size = self.check_image(job.path, job.kind, job.expected, job.source)
            if job.depth is not None:
                if size is not None:
                    self.check_image(job.depth, "depth", size, "RGB")
                else:  # the RGB is broken: still check the depth on its own
                    self.check_image(job.depth, "depth", job.expected, job.source)
            if bar is not None:
                bar.update(1)
            else:
                progress(done, total)  # type: ignore[misc]
        if bar is not None:
            bar.close()

    def check_image(
        self,
        path: Path,
        kind: ImageKind,
        expected: tuple[int, int] | None,
        source: str,
    ) -> tuple[int, int] | None:
        """Checks one image; returns its (width, height) when it could be read, else None.

        The header is checked (kind, limits, expected size) before any pixel is decoded.
        """
        try:
            header = read_png_header(path, self.root)
        except CaptureError as exc:
            self.errors.append(exc)
            return None
        problem = header_problem(header, kind)
        if problem:
            self.add(path, problem)
            return None
        size = (header.width, header.height)
        problem = size_problem(kind, size, expected, source)
        if problem:  # the pixels may be fine, but decoding them cannot make the size right
            self.add(path, problem)
            return size
        if self.deep:
            try:
                read_image(path, kind, self.root)
            except CaptureError as exc:
                self.errors.append(exc)
                return None
        return size


def summarize_capture(path: str | Path) -> str:
    """A short human-readable summary of a capture (reads no image).

    Lists the subject, the expressions with frame counts and resolution, the cameras with
    roles, and the recordings with frames, duration and segment counts by kind.

    Raises:
        CaptureError: the capture cannot be read (run :func:`validate_capture` for all
            problems at once).
    """
    cap = Capture.open(path)
    lines = [f"subject {cap.subject_id}  ({printable(str(cap.root))})"]
    counts = {e: cap.phone_frame_count(e) for e in cap.phone_expressions}
    lines.append(f"phone: {len(counts)} expressions, {sum(counts.values())} RGBD frames")
    width = max(len(e) for e in counts)
    for expression, n in counts.items():
        intr = cap.phone_intrinsics(expression)
        lines.append(f"  {expression:<{width}}  {n:>4} frames  {intr.width}x{intr.height}")
    rig = cap.rig
    lines.append(f"hmc rig {rig.rig_version!r}: {len(rig.cameras)} cameras at {rig.fps:g} fps")
    width = max(len(c.name) for c in rig.cameras)
    for cam in rig.cameras:
        mirrored = "  mirrored" if cam.mirrored else ""
        lines.append(f"  {cam.name:<{width}}  {cam.role:<8}  {cam.width}x{cam.height}{mirrored}")
    lines.append(f"recordings: {len(cap.recordings)}")
    for name in cap.recordings:
        rec = cap.recording(name)
        kinds = Counter(s.kind for s in rec.segments)
        segs = ", ".join(f"{k} {kinds[k]}" for k in SEGMENT_KINDS if kinds[k]) or "none"
        lines.append(
            f"  {name}  {rec.frame_count} frames  {rec.duration_s:.2f} s  segments: {segs}"
        )
    return "\n".join(lines)
