"""Byte-level file handling of a capture: JSON, timestamps CSV, keypoint archives, atomic writes.

Everything written here is deterministic (sorted keys, fixed formats, no wall-clock
metadata), so writing the same inputs twice gives byte-identical files.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.errors import CaptureError
from storage.capture_fs import LIMITS, CaptureLimits, open_capture_file, read_capture_bytes
from storage.capture_layout import TIMESTAMPS_HEADER, describe
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

_BOM = b"\xef\xbb\xbf"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400 parses as inf without ever calling parse_constant
        raise ValueError("a number overflows a 64-bit float")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:  # json.loads would silently keep the last value
            raise ValueError(f"key {describe(key)} appears twice in one object")
        obj[key] = value
    return obj


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), counted without recursion up to ``limit + 1``."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                break
            stack.extend((v, depth) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json_bytes(data: bytes, path: Path, limits: CaptureLimits = LIMITS) -> Any:
    """Parses the bytes of a capture JSON document with the format's rules.

    Raises:
        CaptureError: not UTF-8, a byte-order mark, nested deeper than the limit, not
            JSON, NaN/Infinity or an overflowing number, or a key repeated in one object.
    """
    if data.startswith(_BOM):
        raise CaptureError(path, "starts with a UTF-8 byte-order mark (BOM); write plain UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CaptureError(path, f"not UTF-8 text (byte {exc.start})") from None
    too_deep = f"JSON nests deeper than {limits.max_json_depth} levels (the limit)"
    try:
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_no_duplicate_keys,
        )
    except json.JSONDecodeError as exc:
        raise CaptureError(
            path, f"cannot parse JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:  # the C parser stops cleanly at the interpreter's recursion limit
        raise CaptureError(path, too_deep) from None
    except ValueError as exc:  # our hooks, or an integer of more than 4300 digits
        raise CaptureError(path, f"cannot parse JSON: {_first_line(exc)}") from None
    # Checked after parsing too, so no later recursive walk of the document can overflow.
    if json_depth(value, limits.max_json_depth) > limits.max_json_depth:
        raise CaptureError(path, too_deep)
    return value


def _first_line(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0][:200]


def read_json(path: Path, root: Path, limits: CaptureLimits = LIMITS) -> Any:
    """Reads a JSON document of the capture at ``root`` (bounded, contained, strict).

    Raises:
        CaptureError: the file is missing, outside the capture, not a regular file, over
            ``limits.max_json_bytes``, or not valid JSON by :func:`parse_json_bytes`.
    """
    return parse_json_bytes(read_capture_bytes(path, root, limits.max_json_bytes), path, limits)


# ---------------------------------------------------------------------------- timestamps


def timestamps_to_csv(timestamps_ns: np.ndarray) -> bytes:
    """The timestamps.csv bytes: header "frame,timestamp_ns", then "i,t" per frame."""
    lines = [TIMESTAMPS_HEADER]
    lines.extend(f"{i},{int(t)}" for i, t in enumerate(timestamps_ns))
    return ("\n".join(lines) + "\n").encode("ascii")


_ROW = re.compile(rb"([0-9]{1,19}),([0-9]{1,19})")


def check_timestamps(data: bytes) -> tuple[np.ndarray | None, list[str]]:
    """Checks the bytes of a timestamps.csv.

    Messages give line numbers, never the file's content.

    Returns:
        (timestamps, problems): timestamps is the (T,) int64 array whenever every row
        parses (even if it is not increasing, so that the validator can still count the
        rows), else None.
    """
    try:
        data.decode("ascii")
    except UnicodeDecodeError as exc:
        return None, [f"timestamps must be ASCII text (non-ASCII byte at offset {exc.start})"]
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if not lines or lines[0].strip() != TIMESTAMPS_HEADER.encode():
        return None, [f'line 1 must be the header "{TIMESTAMPS_HEADER}"']
    values = np.empty(len(lines) - 1, dtype=np.int64)
    for row, line in enumerate(lines[1:]):
        m = _ROW.fullmatch(line)
        if m is None:
            return None, [
                f'line {row + 2} must be "frame,timestamp_ns" (two non-negative integers)'
            ]
        frame, stamp = int(m.group(1)), int(m.group(2))
        if frame != row:
            return None, [
                f"line {row + 2} has frame {frame}, expected {row} (one row per frame, in order)"
            ]
        if stamp >= 2**63:
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


def read_timestamps(path: Path, root: Path, limits: CaptureLimits = LIMITS) -> np.ndarray:
    """Reads a timestamps.csv as a read-only (T,) int64 array of nanoseconds.

    Raises:
        CaptureError: missing or unusable file (see :mod:`storage.capture_fs`), malformed
            row, or timestamps not strictly increasing.
    """
    values, problems = check_timestamps(
        read_capture_bytes(path, root, limits.max_timestamps_bytes)
    )
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


_KEYPOINT_ARRAYS = {"points": 3, "confidence": 2}  # name -> ndim


class _Contract(Exception):
    """A readable archive that breaks the keypoints contract (dtype, shape, size, length)."""


@dataclass(frozen=True)
class _NpyHeader:
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    nbytes: int


def _npy_header(member: BinaryIO, name: str) -> _NpyHeader:
    version = np.lib.format.read_magic(member)
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise ValueError(f'array "{name}" has an unsupported .npy version {version}')
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)  # fmt: skip
    shape, fortran, dtype = read(member, max_header_size=10000)
    return _NpyHeader(tuple(shape), bool(fortran), dtype, math.prod(shape) * dtype.itemsize)


def _keypoint_headers(zf: zipfile.ZipFile, limits: CaptureLimits) -> dict[str, _NpyHeader]:
    """Checks both arrays' declared sizes, dtypes and shapes before any data is inflated.

    Raises:
        _Contract: what is wrong, in words (the caller adds the file).
    """
    headers = {}
    for name, ndim in _KEYPOINT_ARRAYS.items():
        info = zf.getinfo(f"{name}.npy")
        if info.file_size > limits.max_array_bytes + 4096:  # + the .npy header
            raise _Contract(
                f'array "{name}" declares {info.file_size} bytes, more than the limit of '
                f"{limits.max_array_bytes}"
            )
        with zf.open(info) as member:
            h = _npy_header(member, name)
        if h.dtype != np.float32 or len(h.shape) != ndim:
            dims = "(T, P, 2)" if ndim == 3 else "(T, P)"
            refused = " (pickled objects are refused)" if h.dtype.hasobject else ""
            raise _Contract(f"{name} must be {dims} float32, got {h.shape} {h.dtype}{refused}")
        if h.nbytes > limits.max_array_bytes:
            raise _Contract(
                f'array "{name}" of shape {h.shape} needs {h.nbytes} bytes, more than the '
                f"limit of {limits.max_array_bytes}"
            )
        headers[name] = h
    points, conf = headers["points"].shape, headers["confidence"].shape
    if points[2] != 2:
        raise _Contract(f"points must be (T, P, 2) float32, got {points} float32")
    if conf != points[:2]:
        raise _Contract(
            f"confidence must be (T, P) float32 matching points {points[:2]}, got {conf} float32"
        )
    return headers


def _read_npy_data(zf: zipfile.ZipFile, name: str, h: _NpyHeader) -> np.ndarray:
    """Reads exactly the bytes the (already checked) header promises."""
    with zf.open(f"{name}.npy") as member:
        _npy_header(member, name)
        data = member.read(h.nbytes)
    if len(data) != h.nbytes:
        raise _Contract(f'array "{name}" is truncated: {len(data)} of {h.nbytes} bytes')
    order = "F" if h.fortran else "C"
    return np.frombuffer(data, dtype=h.dtype).reshape(h.shape, order=order).copy(order="C")


def load_keypoint_arrays(
    path: Path, root: Path, frame_count: int | None = None, limits: CaptureLimits = LIMITS
) -> tuple[np.ndarray, np.ndarray]:
    """The ``points`` and ``confidence`` arrays of a keypoints .npz, read with bounds.

    The zip entries' declared sizes and the .npy headers (dtype, shape, frame count) are
    checked before any array data is inflated, and no more bytes than a header promises
    are read: a small archive cannot inflate into a large allocation, and an object
    (pickled) array is refused without unpickling.

    Args:
        path: the archive.
        root: the capture folder (reads stay inside it).
        frame_count: the recording's frames; when given, T must equal it.
        limits: the size limits.

    Raises:
        CaptureError: the file is missing or unusable (see :mod:`storage.capture_fs`), not
            a zip archive, lacks an array, or an array has the wrong dtype, rank, shape or
            frame count, is larger than the limits, or is truncated.
    """
    with open_capture_file(path, root, limits.max_keypoints_bytes) as fh:
        try:
            with zipfile.ZipFile(fh) as zf:
                names = set(zf.namelist())
                if not {f"{n}.npy" for n in _KEYPOINT_ARRAYS} <= names:
                    raise _Contract(  # member names are content: counted, not quoted
                        f'must hold arrays "points" and "confidence" '
                        f"(has {len(names)} member{'s' if len(names) != 1 else ''})"
                    )
                headers = _keypoint_headers(zf, limits)
                t = headers["points"].shape[0]
                if frame_count is not None and t != frame_count:
                    raise _Contract(f"has {t} frames, the recording has {frame_count}")
                points, confidence = (_read_npy_data(zf, n, h) for n, h in headers.items())
        except _Contract as exc:
            raise CaptureError(path, str(exc)) from None
        except (ValueError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError,
                NotImplementedError, RuntimeError) as exc:  # RuntimeError: encrypted entry
            raise CaptureError(path, f"cannot read keypoints archive ({_first_line(exc)})") from None
    return points, confidence


def check_keypoints(
    path: Path, root: Path, frame_count: int | None, limits: CaptureLimits = LIMITS
) -> tuple[tuple[np.ndarray, np.ndarray] | None, list[str]]:
    """Checks a keypoints .npz file.

    Args:
        path: the file.
        root: the capture folder (reads stay inside it).
        frame_count: frames in the recording; None skips the length check.
        limits: the size limits.

    Returns:
        ((points (T, P, 2) float32 px, confidence (T, P) float32 in [0, 1]) or None, problems).
    """
    try:
        points, confidence = load_keypoint_arrays(path, root, frame_count, limits)
    except CaptureError as exc:
        return None, [exc.problem]
    problems = []
    if not np.all(np.isfinite(confidence) & (confidence >= 0) & (confidence <= 1)):
        problems.append("confidence must be finite and within [0, 1]")
    if np.isinf(points).any():
        problems.append("points must be finite pixels (NaN marks an undetected point)")
    if problems:
        return None, problems
    return (points, confidence), []
