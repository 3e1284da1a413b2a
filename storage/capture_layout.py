"""Names, constants and paths of the capture folder layout (docs/capture-format.md).

Reader, writer and validator all build their paths here, so the three cannot drift apart.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

FORMAT_NAME = "hmc-pgt-capture"
FORMAT_VERSION = 1
MANIFEST_NAME = "capture.json"
RIG_RELPATH = "hmc/rig.json"
INTRINSICS_NAME = "intrinsics.json"
SEGMENTS_NAME = "segments.json"
TIMESTAMPS_NAME = "timestamps.csv"
KEYPOINTS_DIR = "keypoints"
TIMESTAMPS_HEADER = "frame,timestamp_ns"
DEPTH_UNIT_M = 0.001

EMBEDDED_CAMERAS = ("eye_left", "eye_right", "mouth_left", "mouth_right", "glabella")
GT_CAMERAS = ("gt_eye_left", "gt_eye_right", "gt_boom_left", "gt_boom_right", "gt_glabella")
MIRRORED_CAMERAS = ("eye_left", "mouth_left")
CAMERA_ROLES = ("embedded", "gt")
SEGMENT_KINDS = ("neutral", "peak", "eye_closure", "wink", "mouth_closed", "speech")
WINK_EYES = ("left", "right")
# Entries of a recording folder that are not camera folders.
RESERVED_RECORDING_ENTRIES = (SEGMENTS_NAME, KEYPOINTS_DIR)

# Matched with fullmatch only: "$" would also match before a final newline. ASCII digits
# only: "\d" matches every Unicode digit, which int() then accepts.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PHONE_FILE_RE = re.compile(r"([0-9]{6,9})_(rgb|depth)\.png")
HMC_FILE_RE = re.compile(r"([0-9]{6,9})\.png")


_ECHOABLE = re.compile(r"[A-Za-z0-9_.\-/ ]{0,64}")


def describe(value: object) -> str:
    """A short description of a parsed JSON value, for messages.

    Numbers, booleans and short plain names are shown as written (strings quoted);
    anything else only by its type and size, so that no file content of any length or
    character set ends up in a message, a failure record or a log.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= 32 else f"a number of {len(text)} characters"
    if isinstance(value, str):
        return repr(value) if _ECHOABLE.fullmatch(value) else f"a string of {len(value)} characters"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        return f"an object with {len(value)} key{'s' if len(value) != 1 else ''}"
    return type(value).__name__


def unsafe_name_reason(name: object, what: str) -> str | None:
    """Says why ``name`` cannot be used as a folder or file name, or None when it can.

    Subject ids, expressions, recordings and cameras become path components, so they must
    not be able to escape the capture folder or confuse a shell.

    Args:
        name: the candidate name (anything parsed from JSON).
        what: what the name is, for the message (e.g. "subject id").

    Returns:
        A problem in words, or None when the name is safe.
    """
    if not isinstance(name, str):
        return f"{what} must be a string, got {type(name).__name__}"
    if not _SAFE_NAME.fullmatch(name) or ".." in name:
        rule = "1-64 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit, no '..'"
        shown = describe(name)
        if not shown.startswith("'"):  # not shown verbatim: say what it is instead
            return f"{what} is not a safe name: {shown} ({rule})"
        return f"{what} {shown} is not a safe name ({rule})"
    return None


def is_safe_name(name: object) -> bool:
    """True when ``name`` is a safe subject id / expression / recording / camera name."""
    return unsafe_name_reason(name, "name") is None


def folder_name(root: Path) -> str:
    """The name of folder ``root`` as written ("." allowed; symlinks are not followed)."""
    return Path(os.path.abspath(root)).name


def first_gap(indices: list[int]) -> int | None:
    """The smallest index missing from sorted unique ``indices`` (0..N-1 expected), or None.

    Linear in the number of files, whatever the indices (a file named 999999999.png must
    not cost a billion steps).
    """
    for expected, index in enumerate(indices):
        if index != expected:
            return expected
    return None


def frame_stem(index: int) -> str:
    """The zero-padded stem of frame ``index`` (six digits, more when needed)."""
    return f"{index:06d}"


@dataclass(frozen=True)
class CaptureLayout:
    """Every path of one capture folder.

    Attributes:
        root: the capture folder (its name is the subject id).
    """

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def phone_root(self) -> Path:
        return self.root / "phone"

    @property
    def hmc_root(self) -> Path:
        return self.root / "hmc"

    @property
    def rig(self) -> Path:
        return self.root / RIG_RELPATH

    def phone_dir(self, expression: str) -> Path:
        return self.phone_root / expression

    def phone_intrinsics(self, expression: str) -> Path:
        return self.phone_dir(expression) / INTRINSICS_NAME

    def phone_rgb(self, expression: str, index: int) -> Path:
        return self.phone_dir(expression) / f"{frame_stem(index)}_rgb.png"

    def phone_depth(self, expression: str, index: int) -> Path:
        return self.phone_dir(expression) / f"{frame_stem(index)}_depth.png"

    def recording_dir(self, recording: str) -> Path:
        return self.hmc_root / recording

    def segments(self, recording: str) -> Path:
        return self.recording_dir(recording) / SEGMENTS_NAME

    def camera_dir(self, recording: str, camera: str) -> Path:
        return self.recording_dir(recording) / camera

    def timestamps(self, recording: str, camera: str) -> Path:
        return self.camera_dir(recording, camera) / TIMESTAMPS_NAME

    def hmc_frame(self, recording: str, camera: str, index: int) -> Path:
        return self.camera_dir(recording, camera) / f"{frame_stem(index)}.png"

    def keypoints_dir(self, recording: str) -> Path:
        return self.recording_dir(recording) / KEYPOINTS_DIR

    def keypoints(self, recording: str, camera: str) -> Path:
        return self.keypoints_dir(recording) / f"{camera}.npz"


def resolve_inside(root: Path, relpath: object) -> Path | None:
    """Resolves a manifest-relative path, or None when it could leave the capture folder.

    Args:
        root: the capture folder.
        relpath: a relative POSIX path from capture.json.
    """
    if not isinstance(relpath, str) or not relpath or relpath.startswith(("/", "\\")):
        return None
    parts = relpath.split("/")
    if any(p in ("", ".", "..") or "\\" in p or ":" in p for p in parts):
        return None
    return root.joinpath(*parts)
