"""Byte-level file handling of a capture: JSON, timestamps CSV, keypoint archives, atomic writes.

Everything written here is deterministic (sorted keys, fixed formats, no wall-clock
metadata), so writing the same inputs twice gives byte-identical files.
"""

from __future__ import annotations

import io
import json
import os
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import CaptureError
from storage.capture_layout import TIMESTAMPS_HEADER
from storage.capture_schema import raise_problems

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold; fixed for determinism


# ------------------------------------------------------------------------------ writing


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a hidden temporary file and a rename.

    A reader (or a crash) never sees a half-written file: the rename is atomic on POSIX
    and Windows. Temporary names start with "." so listings of frames skip them.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def dump_json_bytes(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, 2-space indent, ASCII, shortest round-trip floats."""
    return (
        json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False) + "\n"
    ).encode("ascii")


# ------------------------------------------------------------------------------ reading


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_json(path: Path) -> Any:
    """Reads a JSON file.

    Raises:
        CaptureError: the file is missing, not UTF-8, not JSON, or holds NaN/Infinity.
    """
    if not path.is_file():
        raise CaptureError(path, f"missing {path.name}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CaptureError(path, f"not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise CaptureError(path, f"cannot read file ({exc.strerror})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise CaptureError(
            path, f"cannot parse JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:
        raise CaptureError(path, f"cannot parse JSON: {exc}") from None


# ---------------------------------------------------------------------------- timestamps


def timestamps_to_csv(timestamps_ns: np.ndarray) -> bytes:
    """The timestamps.csv bytes: header "frame,timestamp_ns", then "i,t" per frame."""
    lines = [TIMESTAMPS_HEADER]
    lines.extend(f"{i},{int(t)}" for i, t in enumerate(timestamps_ns))
    return ("\n".join(lines) + "\n").encode("ascii")


def check_timestamps(data: bytes) -> tuple[np.ndarray | None, list[str]]:
    """Checks the bytes of a timestamps.csv.

    Returns:
        (timestamps, problems): timestamps is the (T,) int64 array whenever every row
        parses (even if it is not increasing, so that the validator can still count the
        rows), else None.
    """
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None, ["timestamps must be ASCII text"]
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0].strip() != TIMESTAMPS_HEADER:
        got = lines[0][:40] if lines else "an empty file"
        return None, [f'first line must be the header "{TIMESTAMPS_HEADER}", got {got!r}']
    values = np.empty(len(lines) - 1, dtype=np.int64)
    for row, line in enumerate(lines[1:]):
        parts = line.split(",")
        try:
            frame, stamp = (int(p) for p in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            frame, stamp = None, None
        if frame is None or stamp is None:
            return None, [f'line {row + 2} must be "frame,timestamp_ns" integers, got {line!r}']
        if frame != row:
            return None, [
                f"line {row + 2} has frame {frame}, expected {row} (one row per frame, in order)"
            ]
        if not 0 <= stamp < 2**63:
            return None, [f"line {row + 2}: timestamp {stamp} is outside 0..2^63-1 ns"]
        values[row] = stamp
    problems = []
    bad = np.flatnonzero(np.diff(values) <= 0)
    if bad.size:
        k = int(bad[0]) + 1
        problems.append(
            f"timestamps are not strictly increasing at frame {k} "
            f"(line {k + 2}: {values[k]} ns after {values[k - 1]} ns)"
        )
    return values, problems


def read_timestamps(path: Path) -> np.ndarray:
    """Reads a timestamps.csv as a read-only (T,) int64 array of nanoseconds.

    Raises:
        CaptureError: missing file, malformed row, or timestamps not strictly increasing.
    """
    if not path.is_file():
        raise CaptureError(path, f"missing {path.name}")
    values, problems = check_timestamps(path.read_bytes())
    raise_problems(path, problems)
    assert values is not None
    values.flags.writeable = False
    return values


# ----------------------------------------------------------------------------- keypoints


def encode_npz(arrays: dict[str, np.ndarray], compress: bool = False) -> bytes:
    """A deterministic .npz (what np.savez writes, minus the wall-clock dates).

    ``compress`` deflates the members (as np.savez_compressed), still byte-reproducible.
    """
    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(
                member, np.ascontiguousarray(arrays[name]), allow_pickle=False
            )
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def check_keypoints(
    path: Path, frame_count: int | None
) -> tuple[tuple[np.ndarray, np.ndarray] | None, list[str]]:
    """Checks a keypoints .npz file.

    Args:
        path: the file.
        frame_count: frames in the recording; None skips the length check.

    Returns:
        ((points (T, P, 2) float32 px, confidence (T, P) float32 in [0, 1]) or None, problems).
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if not {"points", "confidence"} <= keys:
                return None, [f'must hold arrays "points" and "confidence", has {sorted(keys)}']
            points, confidence = npz["points"], npz["confidence"]
    except FileNotFoundError:
        return None, [f"missing {path.name}"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        return None, [f"cannot read keypoints archive ({exc})"]
    problems = []
    if points.dtype != np.float32 or points.ndim != 3 or points.shape[2] != 2:
        problems.append(f"points must be (T, P, 2) float32, got {points.shape} {points.dtype}")
    if confidence.dtype != np.float32 or confidence.shape != points.shape[:2]:
        problems.append(
            f"confidence must be (T, P) float32 matching points {points.shape[:2]}, "
            f"got {confidence.shape} {confidence.dtype}"
        )
    if not problems:
        if frame_count is not None and points.shape[0] != frame_count:
            problems.append(f"has {points.shape[0]} frames, the recording has {frame_count}")
        if not np.all(np.isfinite(confidence) & (confidence >= 0) & (confidence <= 1)):
            problems.append("confidence must be finite and within [0, 1]")
        if np.isinf(points).any():
            problems.append("points must be finite pixels (NaN marks an undetected point)")
    if problems:
        return None, problems
    return (points, confidence), []
