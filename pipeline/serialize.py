"""A small typed serializer for stage outputs: numpy arrays, JSON metadata, Arrow tables.

No pickle: artifacts may be read by other tools and by later runs of newer code, and
unpickling is code execution. A stage returns one of

* ``None``;
* a ``dict[str, np.ndarray]`` (stored as ``arrays.npz``, loaded with ``allow_pickle=False``);
* a ``pyarrow.Table`` (``table.parquet``);
* plain JSON data: dict / list / str / number / bool (``value.json``);
* a :class:`StageOutput` combining arrays, JSON metadata and named tables.

Loading returns the same kind the stage returned.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import StageError, StorageError

_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

KINDS = ("none", "arrays", "table", "json", "output")


@dataclass(frozen=True)
class StageOutput:
    """A stage result with several parts.

    Attributes:
        arrays: named numeric arrays (no object dtype).
        meta: JSON-serialisable metadata.
        tables: named Arrow tables (e.g. per-frame records to publish).
    """

    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    tables: Mapping[str, pa.Table] = field(default_factory=dict)

    def names(self) -> set[str]:
        """Every array, table and meta key name."""
        return set(self.arrays) | set(self.tables) | set(self.meta)


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _PART_RE.fullmatch(name):
        raise StageError(f"{what} name {name!r} must match {_PART_RE.pattern}")


def _npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    for name, arr in arrays.items():
        _check_name(name, "array")
        if not isinstance(arr, np.ndarray) or arr.dtype.hasobject:
            raise StageError(f"array {name!r} must be a numpy array without object dtype")
    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _json(value: Any) -> bytes:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=True).encode()
    except (TypeError, ValueError) as exc:
        raise StageError(f"stage output is not JSON-serialisable: {exc}") from exc


def _is_arrays(value: Any) -> bool:
    return (isinstance(value, Mapping) and len(value) > 0
            and all(isinstance(v, np.ndarray) for v in value.values()))


def encode(value: Any) -> tuple[str, dict[str, bytes]]:
    """Serialises a stage output.

    Returns:
        ``(kind, files)``: the kind (one of :data:`KINDS`) and file name -> bytes.

    Raises:
        StageError: when the value is of an unsupported type or has bad names.
    """
    if value is None:
        return "none", {}
    if isinstance(value, StageOutput):
        files: dict[str, bytes] = {"meta.json": _json(dict(value.meta))}
        if value.arrays:
            files["arrays.npz"] = _npz(value.arrays)
        for name, table in value.tables.items():
            _check_name(name, "table")
            if not isinstance(table, pa.Table):
                raise StageError(f"table {name!r} must be a pyarrow.Table")
            files[f"table.{name}.parquet"] = _parquet(table)
        return "output", files
    if isinstance(value, pa.Table):
        return "table", {"table.parquet": _parquet(value)}
    if _is_arrays(value):
        return "arrays", {"arrays.npz": _npz(value)}
    if isinstance(value, dict | list | str | int | float | bool):
        return "json", {"value.json": _json(value)}
    raise StageError(f"unsupported stage output type {type(value).__name__}; return a dict of "
                     "arrays, a pyarrow.Table, JSON data or a StageOutput")


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def decode(kind: str, files: Mapping[str, bytes]) -> Any:
    """Inverse of :func:`encode`.

    Raises:
        StorageError: for an unknown kind or a missing part.
    """
    try:
        if kind == "none":
            return None
        if kind == "arrays":
            return _load_npz(files["arrays.npz"])
        if kind == "table":
            return pq.read_table(io.BytesIO(files["table.parquet"]))
        if kind == "json":
            return json.loads(files["value.json"])
        if kind == "output":
            arrays = _load_npz(files["arrays.npz"]) if "arrays.npz" in files else {}
            tables = {name[len("table."):-len(".parquet")]: pq.read_table(io.BytesIO(data))
                      for name, data in files.items()
                      if name.startswith("table.") and name.endswith(".parquet")}
            return StageOutput(arrays=arrays, meta=json.loads(files["meta.json"]), tables=tables)
    except KeyError as exc:
        raise StorageError(f"artifact of kind {kind!r} lacks part {exc}") from exc
    raise StorageError(f"unknown artifact kind {kind!r}")


def output_names(value: Any) -> set[str]:
    """Names a declared ``Stage.outputs`` is checked against."""
    if isinstance(value, StageOutput):
        return value.names()
    if isinstance(value, Mapping):
        return set(value)
    if isinstance(value, pa.Table):
        return set(value.column_names)
    return set()


def decode_table(data: bytes) -> pa.Table:
    """One ``table*.parquet`` part as an Arrow table (see ``ArtifactStore.load_part``)."""
    return pq.read_table(io.BytesIO(data))
