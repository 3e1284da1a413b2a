"""The JSON documents of a capture's top and phone side: capture.json, intrinsics.json.

Also the shared field-checking helpers used by :mod:`storage.hmc_schema` (rig, segments).

Each ``check_*`` function returns a best-effort value together with *every* problem it
found (the validator reports them all); each ``parse_*`` function raises the problems as
one :class:`~pipeline.errors.CaptureError` naming the file (what readers use); each
``*_to_json`` function is the exact inverse used by the writer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import CaptureError
from storage.capture_fs import LIMITS
from storage.capture_layout import (
    DEPTH_UNIT_M,
    FORMAT_NAME,
    FORMAT_VERSION,
    RIG_RELPATH,
    describe,
    resolve_inside,
    unsafe_name_reason,
)
from storage.capture_types import PhoneIntrinsics, PinholeIntrinsics


def is_number(value: object) -> bool:
    # JSON true/false parse as bool, a subclass of int: never accept them as numbers.
    return isinstance(value, int | float) and not isinstance(value, bool)


def number_array(value: object, shape: tuple[int, ...]) -> np.ndarray | None:
    """A float64 array of ``shape`` from nested JSON lists of finite numbers, else None."""
    if len(shape) == 0:
        return np.float64(value) if is_number(value) and math.isfinite(value) else None
    if not isinstance(value, list) or len(value) != shape[0]:
        return None
    rows = [number_array(v, shape[1:]) for v in value]
    if any(r is None for r in rows):
        return None
    return np.array(rows, dtype=np.float64).reshape(shape)


def raise_problems(path: Path, problems: Sequence[str]) -> None:
    """Raises one CaptureError for ``path`` listing ``problems`` (no-op when empty)."""
    if problems:
        raise CaptureError(path, "; ".join(problems))


class FieldReader:
    """Reads typed fields of one JSON object, recording problems instead of raising.

    Every getter returns None when the field is missing or invalid (and records why).
    """

    def __init__(self, obj: dict[str, Any], problems: list[str], context: str = "") -> None:
        self.obj = obj
        self.problems = problems
        self.context = context

    def problem(self, text: str) -> None:
        self.problems.append(f"{self.context}: {text}" if self.context else text)

    def raw(self, key: str, *, optional: bool = False) -> Any:
        if key not in self.obj:
            if not optional:
                self.problem(f'missing field "{key}"')
            return None
        return self.obj[key]

    def string(self, key: str, *, optional: bool = False) -> str | None:
        value = self.raw(key, optional=optional)
        if value is None and (optional or key not in self.obj):
            return None
        if not isinstance(value, str) or not value:
            self.problem(f'field "{key}" must be a non-empty string, got {describe(value)}')
            return None
        return value

    def boolean(self, key: str) -> bool | None:
        value = self.raw(key)
        if key in self.obj and not isinstance(value, bool):
            self.problem(f'field "{key}" must be true or false, got {describe(value)}')
            return None
        return value

    def integer(
        self, key: str, *, minimum: int | None = None, maximum: int | None = None
    ) -> int | None:
        value = self.raw(key)
        if key not in self.obj:
            return None
        if not is_number(value) or not isinstance(value, int):
            self.problem(f'field "{key}" must be an integer, got {describe(value)}')
            return None
        if minimum is not None and value < minimum:
            self.problem(f'field "{key}" must be >= {minimum}, got {describe(value)}')
            return None
        if maximum is not None and value > maximum:
            self.problem(f'field "{key}" must be <= {maximum}, got {describe(value)}')
            return None
        return value

    def number(self, key: str, *, positive: bool = False) -> float | None:
        value = self.raw(key)
        if key not in self.obj:
            return None
        if not is_number(value) or not math.isfinite(value):
            self.problem(f'field "{key}" must be a finite number, got {describe(value)}')
            return None
        if positive and value <= 0:
            self.problem(f'field "{key}" must be > 0, got {describe(value)}')
            return None
        return float(value)

    def obj_field(self, key: str) -> dict[str, Any] | None:
        value = self.raw(key)
        if key in self.obj and not isinstance(value, dict):
            self.problem(f'field "{key}" must be a JSON object')
            return None
        return value

    def names(self, key: str, what: str) -> tuple[str, ...]:
        """A list of unique safe names; unsafe or repeated entries are dropped."""
        value = self.raw(key)
        if key not in self.obj:
            return ()
        if not isinstance(value, list):
            self.problem(f'field "{key}" must be a list of names')
            return ()
        out: list[str] = []
        for item in value:
            reason = unsafe_name_reason(item, what)
            if reason:
                self.problem(f'field "{key}": {reason}')
            elif item in out:
                self.problem(f'field "{key}": {what} {describe(item)} is listed twice')
            else:
                out.append(item)
        if not out:
            self.problem(f'field "{key}" must list at least one {what}')
        return tuple(out)


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Manifest:
    """The parsed capture.json.

    Attributes:
        subject_id: the subject (also the capture folder's name).
        phone_expressions: expression names, each a folder under phone/.
        rig_path: the rig file, relative to the capture folder (POSIX).
        recordings: recording names, each a folder under hmc/.
    """

    subject_id: str
    phone_expressions: tuple[str, ...]
    rig_path: str
    recordings: tuple[str, ...]


def check_manifest(obj: object) -> tuple[Manifest, list[str]]:
    """Checks a parsed capture.json; returns what could be salvaged and every problem."""
    problems: list[str] = []
    if not isinstance(obj, dict):
        return Manifest("", (), RIG_RELPATH, ()), ["capture.json must hold a JSON object"]
    f = FieldReader(obj, problems)
    fmt = f.string("format")
    if fmt is not None and fmt != FORMAT_NAME:
        f.problem(f'field "format" must be "{FORMAT_NAME}", got {describe(fmt)}')
    version = f.integer("format_version")
    if version is not None and version != FORMAT_VERSION:
        f.problem(f"unsupported format_version {version} (this reader reads {FORMAT_VERSION})")
    subject = f.raw("subject_id")
    if "subject_id" in obj:
        reason = unsafe_name_reason(subject, "subject id")
        if reason:
            f.problem(reason)
    phone = f.obj_field("phone") or {}
    expressions = FieldReader(phone, problems, "phone").names("expressions", "expression")
    hmc = f.obj_field("hmc") or {}
    hf = FieldReader(hmc, problems, "hmc")
    rig_path = hf.string("rig") or RIG_RELPATH
    if resolve_inside(Path("."), rig_path) is None:
        hf.problem(f'field "rig" must be a relative path inside the capture, got {describe(rig_path)}')
        rig_path = RIG_RELPATH
    recordings = hf.names("recordings", "recording")
    subject_id = subject if isinstance(subject, str) else ""
    return Manifest(subject_id, expressions, rig_path, recordings), problems


def parse_manifest(obj: object, path: Path) -> Manifest:
    """Parses capture.json, raising CaptureError(path, ...) on any problem."""
    manifest, problems = check_manifest(obj)
    raise_problems(path, problems)
    return manifest


def manifest_to_json(manifest: Manifest) -> dict[str, Any]:
    """The capture.json object of ``manifest``."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "subject_id": manifest.subject_id,
        "phone": {"expressions": list(manifest.phone_expressions)},
        "hmc": {"rig": manifest.rig_path, "recordings": list(manifest.recordings)},
    }


# --------------------------------------------------------------------------- intrinsics


def check_pinhole(f: FieldReader) -> PinholeIntrinsics | None:
    """Reads width, height, fx, fy, cx, cy of one object; None if any is bad."""
    n_before = len(f.problems)
    # Bounded like the images they describe (docs/capture-format.md, "Limits").
    width = f.integer("width", minimum=1, maximum=LIMITS.max_image_side)
    height = f.integer("height", minimum=1, maximum=LIMITS.max_image_side)
    fx = f.number("fx", positive=True)
    fy = f.number("fy", positive=True)
    cx = f.number("cx")
    cy = f.number("cy")
    # A principal point outside the image means pixels were confused with normalised units.
    if cx is not None and width is not None and not 0.0 <= cx <= width:
        f.problem(f'field "cx" = {cx} lies outside the image (0..{width})')
    if cy is not None and height is not None and not 0.0 <= cy <= height:
        f.problem(f'field "cy" = {cy} lies outside the image (0..{height})')
    if len(f.problems) > n_before:
        return None
    return PinholeIntrinsics(width, height, fx, fy, cx, cy)  # type: ignore[arg-type]


def check_phone_intrinsics(obj: object) -> tuple[PhoneIntrinsics | None, list[str]]:
    """Checks a parsed phone intrinsics.json."""
    if not isinstance(obj, dict):
        return None, ["intrinsics must be a JSON object"]
    problems: list[str] = []
    f = FieldReader(obj, problems)
    pin = check_pinhole(f)
    unit = f.number("depth_unit_m", positive=True)
    if unit is not None and unit != DEPTH_UNIT_M:
        f.problem(f'field "depth_unit_m" must be {DEPTH_UNIT_M} (millimetres), got {describe(unit)}')
    if problems or pin is None:
        return None, problems
    return PhoneIntrinsics(pin.width, pin.height, pin.fx, pin.fy, pin.cx, pin.cy), problems


def parse_phone_intrinsics(obj: object, path: Path) -> PhoneIntrinsics:
    """Parses a phone intrinsics.json, raising CaptureError(path, ...) on any problem."""
    intr, problems = check_phone_intrinsics(obj)
    raise_problems(path, problems)
    assert intr is not None
    return intr


def phone_intrinsics_to_json(intr: PinholeIntrinsics) -> dict[str, Any]:
    """The intrinsics.json object of ``intr`` (depth_unit_m is always 0.001)."""
    return {
        "width": int(intr.width),
        "height": int(intr.height),
        "fx": float(intr.fx),
        "fy": float(intr.fy),
        "cx": float(intr.cx),
        "cy": float(intr.cy),
        "depth_unit_m": DEPTH_UNIT_M,
    }
