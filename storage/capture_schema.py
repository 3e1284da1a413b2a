"""The JSON documents of a capture's top and phone side: capture.json, intrinsics.json.

Also the shared field-checking helpers used by :mod:`storage.hmc_schema` (rig, segments).

Each ``check_*`` function returns a best-effort value together with *every* problem it
found (the validator reports them all); each ``parse_*`` function raises the problems as
one :class:`~pipeline.errors.CaptureError` naming the file (what readers use); each
``*_to_json`` function is the exact inverse used by the writer.
"""

from __future__ import annotations

import functools
import json
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


#: Problems one document's check collects before it stops (a hostile document can hold
#: millions; the validator shows at most this many per file).
MAX_PROBLEMS_PER_FILE = 50


def too_many(problems: list[str]) -> bool:
    """True (once noted in ``problems``) when a check should stop collecting."""
    if len(problems) < MAX_PROBLEMS_PER_FILE:
        return False
    if not problems[-1].startswith("checking stopped"):
        problems.append(f"checking stopped after {MAX_PROBLEMS_PER_FILE} problems")
    return True


def raise_problems(path: Path, problems: Sequence[str]) -> None:
    """Raises one CaptureError for ``path`` listing ``problems`` (no-op when empty; at most
    :data:`MAX_PROBLEMS_PER_FILE` of them in the message)."""
    if problems:
        shown = list(problems[:MAX_PROBLEMS_PER_FILE])
        if len(problems) > len(shown):
            shown.append(f"and {len(problems) - len(shown)} more")
        raise CaptureError(path, "; ".join(shown))


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


#: The published JSON Schema of capture.json (package data; docs/capture-format.md).
MANIFEST_SCHEMA_PATH = Path(__file__).parent / "schemas" / "capture.schema.json"

# What a name is called in messages, by the field that lists it.
_NAME_FIELDS = {
    ("subject_id",): "subject id",
    ("phone", "expressions"): "expression",
    ("hmc", "recordings"): "recording",
}
_TYPE_WORDS = {
    "object": "a JSON object", "array": "a list", "string": "a string", "integer": "an integer",
    "number": "a number", "boolean": "true or false",
}  # fmt: skip


@functools.cache
def manifest_validator() -> Any:
    """A jsonschema validator of the published capture.json schema (built once)."""
    import jsonschema

    schema = json.loads(MANIFEST_SCHEMA_PATH.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _field_path(path: Sequence[object]) -> str:
    """``("phone", "expressions", 0)`` -> ``phone.expressions[0]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _schema_problem(error: Any) -> str:
    """One jsonschema error in the product's words: the field path and the rule, never the
    offending text itself (see :func:`describe`)."""
    path = tuple(error.absolute_path)
    field, kind, value = _field_path(path), error.validator, error.instance
    at = f'field "{field}"' if field else "capture.json"
    names_of = path[:-1] if path and isinstance(path[-1], int) else path
    what = _NAME_FIELDS.get(tuple(names_of), "name")
    if kind == "required":
        missing = [k for k in error.validator_value if k not in value]
        where = f"{field}: " if field else ""
        return f'{where}missing field "{missing[0]}"'
    if kind == "type":
        want = _TYPE_WORDS.get(error.validator_value, error.validator_value)
        return f"{at} must be {want}, got {describe(value)}"
    if kind == "const" and path == ("format_version",):
        return f"unsupported format_version {describe(value)} (this reader reads {FORMAT_VERSION})"
    if kind == "const":
        return f"{at} must be {json.dumps(error.validator_value)}, got {describe(value)}"
    if kind == "pattern" and path == ("hmc", "rig"):
        return f"{at} must be a relative path inside the capture, got {describe(value)}"
    if kind == "pattern":
        reason = unsafe_name_reason(value, what) or f"{what} is not a safe name"
        return f"{at}: {reason}" if path != ("subject_id",) else reason
    if kind == "minItems":
        return f"{at} must list at least one {what}"
    if kind == "uniqueItems":
        seen: list[object] = []
        dup = next((v for v in value if v in seen or seen.append(v)), None)
        return f"{at}: {what} {describe(dup)} is listed twice"
    if kind == "minLength":
        return f"{at} must be a non-empty string"
    return f"{at} breaks the schema rule {kind!r}"


def _safe_unique(value: object) -> tuple[str, ...]:
    """The safe, first-seen names of a JSON list (what a broken manifest still names)."""
    out: list[str] = []
    for item in value if isinstance(value, list) else []:
        if unsafe_name_reason(item, "name") is None and item not in out:
            out.append(item)
    return tuple(out)


def check_manifest(obj: object) -> tuple[Manifest, list[str]]:
    """Checks a parsed capture.json against the published schema.

    Returns:
        What could be salvaged (unsafe or repeated names dropped, the default rig path for
        a bad one) and every problem, each naming its field path.
    """
    errors = sorted(manifest_validator().iter_errors(obj), key=lambda e: list(map(str, e.path)))
    mistyped = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    errors = [e for e in errors  # a value of the wrong type: its other rules only repeat it
              if e.validator == "type" or tuple(e.absolute_path) not in mistyped]
    problems = list(dict.fromkeys(_schema_problem(e) for e in errors))
    if not isinstance(obj, dict):
        return Manifest("", (), RIG_RELPATH, ()), problems
    phone = obj.get("phone") if isinstance(obj.get("phone"), dict) else {}
    hmc = obj.get("hmc") if isinstance(obj.get("hmc"), dict) else {}
    subject = obj.get("subject_id")
    rig_path = hmc.get("rig")
    if not isinstance(rig_path, str) or resolve_inside(Path("."), rig_path) is None:
        rig_path = RIG_RELPATH
    manifest = Manifest(
        subject if isinstance(subject, str) else "",
        _safe_unique(phone.get("expressions")),
        rig_path,
        _safe_unique(hmc.get("recordings")),
    )
    return manifest, problems


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
