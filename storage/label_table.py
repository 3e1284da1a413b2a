"""The canonical label table (SPEC §4, docs/contracts.md "Label table"), a Delta table.

One row per HMC time step. The column order and dtypes are fixed by
:func:`label_schema`; the blendshape names (rig order) and :data:`LABEL_SCHEMA_VERSION`
travel in the Arrow schema metadata of every table this module returns.

A labelling run writes one (subject, label_round, label_source) at a time with
:meth:`LabelTable.write_subject_round`: ONE Delta commit that removes that key's old rows
and adds the new ones, so readers never see a partial relabel.

Layout (schema v2): the table is partitioned by :data:`PARTITION_COLUMN`, a copy of
``subject_id``, so every data file holds one subject. Replacing a subject then reads and
rewrites only that subject's files, compaction (:meth:`LabelTable.optimize`) never merges
subjects, and writers of different subjects never conflict. Version-1 tables (unpartitioned)
stay readable; :meth:`LabelTable.upgrade` rewrites one as v2. See docs/storage.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import WriterProperties

from pipeline.errors import StorageError
from storage import delta
from storage.capture_layout import unsafe_name_reason

__all__ = [
    "AUTO_COMPACT_FILES",
    "BS_PREFIX",
    "COMPRESSION",
    "GAZE_COLUMNS",
    "HEAD_COLUMNS",
    "LABEL_SCHEMA_VERSION",
    "LABEL_SOURCES",
    "PARTITION_BY",
    "PARTITION_COLUMN",
    "STATS_COLUMNS",
    "STATUSES",
    "TABLE_PROPERTIES",
    "LabelTable",
    "blendshape_matrix",
    "blendshape_names_of",
    "label_schema",
    "labels_to_arrow",
    "upgrade_rows",
    "validate_label_table",
    "writer_properties",
]

LABEL_SCHEMA_VERSION = 2
#: Label schema versions this code reads (v1: no partition column; see upgrade_rows).
READABLE_VERSIONS = (1, 2)
BS_PREFIX = "bs_"
GAZE_COLUMNS = ("gaze_left_yaw", "gaze_left_pitch", "gaze_right_yaw", "gaze_right_pitch")
HEAD_COLUMNS = ("head_qw", "head_qx", "head_qy", "head_qz", "head_tx", "head_ty", "head_tz")
STATUSES = ("ok", "rejected", "failed")
#: Who made the labels; the ``trivial_*`` sources are the baselines every result is scored
#: beside (stages/metrics_trivial.py, docs/metrics.md).
LABEL_SOURCES = ("ground_truth", "self_supervision", "distillation", "trivial_zeros", "trivial_prior")
#: The partition column (schema v2): a copy of ``subject_id``. A copy, because Delta keeps
#: partition values out of the Parquet files; this way every file still has ``subject_id``.
PARTITION_COLUMN = "subject_partition"
#: Partitioning of the Delta table (see docs/storage.md "Layout" for the measurement).
PARTITION_BY: list[str] | None = [PARTITION_COLUMN]
#: Parquet codec of label files. LZ4_RAW, not ZSTD: with one file per subject a full scan
#: decodes ~90 column chunks per file, and ZSTD's per-chunk cost made it ~1.6x slower
#: (docs/benchmarks.md); float labels compress little with either.
COMPRESSION = "LZ4_RAW"
#: The only columns whose min/max statistics the Delta log keeps (the ones reads and
#: replaces filter on). Delta's default indexes the first 32 columns, which made the log
#: ~6x larger and every table open, replace and one-subject read ~3-4x slower on a
#: 2,000-subject table (docs/storage.md).
STATS_COLUMNS = ("subject_id", "recording_id", "frame_index", "label_source", "label_round")
TABLE_PROPERTIES = {"delta.dataSkippingStatsColumns": ",".join(STATS_COLUMNS)}
#: write_subject_round compacts the subject's partition once it holds more data files
#: than this (each write adds one; one compacted file per subject is the steady state).
AUTO_COMPACT_FILES = 8
#: Parquet row-group size of label files: small enough that reading one subject out of a
#: multi-subject file (v1 tables, bulk appends before compaction) decodes ~16k rows.
ROW_GROUP_ROWS = 16_384
#: The columns that identify what one write_subject_round replaces.
REPLACE_KEY = ("subject_id", "label_round", "label_source")

META_SCHEMA_VERSION = b"pgt.label_schema_version"
META_BLENDSHAPES = b"pgt.blendshape_names"

#: Columns the table may be partitioned by (``subject_id`` itself would leave the files
#: without it; see PARTITION_COLUMN).
_PARTITIONABLE = (PARTITION_COLUMN,)

_QUAT_NORM_TOL = 1e-3

_HEAD = [
    pa.field("subject_id", pa.string(), nullable=False),
    pa.field("recording_id", pa.string(), nullable=False),
    pa.field("frame_index", pa.int32(), nullable=False),
    pa.field("timestamp_ns", pa.int64(), nullable=False),
]
_TAIL = [
    *(pa.field(c, pa.float32()) for c in GAZE_COLUMNS),
    *(pa.field(c, pa.float32()) for c in HEAD_COLUMNS),
    pa.field("confidence", pa.float32()),
    pa.field("residual_keypoint_px", pa.float32()),
    pa.field("residual_photometric", pa.float32()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("failure_reason", pa.string()),
    pa.field("label_source", pa.string(), nullable=False),
    pa.field("label_round", pa.int16(), nullable=False),
    pa.field("pipeline_version", pa.string(), nullable=False),
    pa.field("rig_version", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("schema_version", pa.int16(), nullable=False),
]
_PARTITION = [pa.field(PARTITION_COLUMN, pa.string(), nullable=False)]


def label_schema(
    blendshape_names: Sequence[str], *, version: int = LABEL_SCHEMA_VERSION
) -> pa.Schema:
    """The label table's Arrow schema for a rig's blendshapes (contracts.md order).

    Args:
        blendshape_names: the rig's K blendshape names in rig order (no ``bs_`` prefix).
        version: label schema version, 2 (current) or 1 (read-only, no partition column).

    Returns:
        Schema with 4 key columns, K ``bs_<name>`` float32 columns, 4 gaze, 7 head pose,
        3 quality, status/failure_reason, 6 provenance columns, ``schema_version`` and
        (v2) ``subject_partition``; metadata holds the schema version and the JSON list
        of blendshape names.
    """
    if version not in READABLE_VERSIONS:
        raise StorageError(f"label schema version {version}: this code reads {READABLE_VERSIONS}")
    names = [str(n) for n in blendshape_names]
    if not names:
        raise StorageError("label_schema: blendshape_names is empty")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise StorageError(f"label_schema: duplicate blendshape names {dup}")
    bs = [pa.field(BS_PREFIX + n, pa.float32()) for n in names]
    meta = {
        META_SCHEMA_VERSION: str(version).encode(),
        META_BLENDSHAPES: json.dumps(names).encode(),
    }
    tail = _PARTITION if version >= 2 else []
    return pa.schema([*_HEAD, *bs, *_TAIL, *tail], metadata=meta)


def blendshape_names_of(schema: pa.Schema) -> list[str]:
    """The blendshape names of a label schema, from its ``bs_`` columns (rig order)."""
    return [f.name[len(BS_PREFIX) :] for f in schema if f.name.startswith(BS_PREFIX)]


def validate_label_table(
    table: pa.Table, *, where: str = "label table", version: int = LABEL_SCHEMA_VERSION
) -> pa.Table:
    """Check that ``table`` has exactly the label schema (names, order, dtypes).

    Args:
        table: the rows to check.
        where: names the table in error messages.
        version: the label schema version to check against (default: current).

    Returns:
        ``table`` with the canonical schema metadata attached.

    Raises:
        StorageError: naming the first mismatching columns.
    """
    names = blendshape_names_of(table.schema)
    if not names:
        raise StorageError(f"{where}: no '{BS_PREFIX}*' blendshape columns")
    expected = label_schema(names, version=version)
    got = [(f.name, f.type) for f in table.schema]
    want = [(f.name, f.type) for f in expected]
    if got != want:
        got_names, want_names = [n for n, _ in got], [n for n, _ in want]
        missing = [n for n in want_names if n not in got_names]
        extra = [n for n in got_names if n not in want_names]
        bad_types = [
            f"{n}: {t} (expected {dict(want)[n]})"
            for n, t in got
            if n in dict(want) and dict(want)[n] != t
        ]
        order = "" if missing or extra or bad_types else " (column order differs)"
        raise StorageError(
            f"{where} does not match label schema v{version}{order}: "
            f"missing={missing} extra={extra} wrong_dtypes={bad_types}"
        )
    return table.replace_schema_metadata(expected.metadata)


def upgrade_rows(table: pa.Table, *, where: str = "label table") -> pa.Table:
    """Bring version-1 label rows to the current schema (adds ``subject_partition``).

    The rows' ``schema_version`` values are kept: they record the contract each row was
    written under. Current-version rows are returned validated and unchanged.
    """
    if PARTITION_COLUMN in table.column_names:
        return validate_label_table(table, where=where)
    table = validate_label_table(table, where=where, version=1)
    out = table.append_column(_PARTITION[0], table.column("subject_id"))
    return out.replace_schema_metadata(label_schema(blendshape_names_of(table.schema)).metadata)


def labels_to_arrow(
    subject_id: str,
    recording_id: str,
    frame_index: np.ndarray,
    timestamp_ns: np.ndarray,
    blendshapes: np.ndarray,
    gaze: np.ndarray,
    head_quat: np.ndarray,
    head_t: np.ndarray,
    *,
    blendshape_names: Sequence[str],
    confidence: np.ndarray | None = None,
    residual_keypoint_px: np.ndarray | None = None,
    residual_photometric: np.ndarray | None = None,
    status: str | Sequence[str] | np.ndarray | None = None,
    failure_reason: str | Sequence[str | None] | np.ndarray | None = None,
    label_source: str,
    label_round: int,
    pipeline_version: str,
    rig_version: str,
    run_id: str,
) -> pa.Table:
    """Build the label rows of one recording as an Arrow table in the canonical schema.

    Args:
        subject_id: safe subject id (contracts.md).
        recording_id: the HMC recording, e.g. ``"rec000"``.
        frame_index: (T,) integer frame indices (>= 0, unique).
        timestamp_ns: (T,) int64 timestamps in nanoseconds.
        blendshapes: (T, K) coefficients, K = len(blendshape_names), rig order.
        gaze: (T, 4) radians: left yaw, left pitch, right yaw, right pitch (head frame).
        head_quat: (T, 4) head rotation quaternion (w, x, y, z), unit norm, w >= 0.
        head_t: (T, 3) head translation in metres (headset frame).
        blendshape_names: the rig's K names in order.
        confidence: (T,) or None (null column).
        residual_keypoint_px: (T,) mean keypoint residual in pixels, or None.
        residual_photometric: (T,) photometric residual, or None.
        status: one of ``ok|rejected|failed`` for all rows, or (T,) values; None = "ok".
        failure_reason: one string for all rows, or (T,) strings/None; None = null.
        label_source: one of :data:`LABEL_SOURCES`.
        label_round: 0 for ground truth and self-supervision, t for distillation round t.
        pipeline_version: version of the code that produced the labels.
        rig_version: version of the rig the blendshapes refer to.
        run_id: id of the labelling run.

    Returns:
        (T rows) table validated against :func:`label_schema`.

    Raises:
        StorageError: an argument has the wrong shape or an invalid value; the message
            names the argument and the shapes.
    """
    names = list(blendshape_names)
    k = len(names)
    _check_id("subject_id", subject_id, safe=True)
    _check_id("recording_id", recording_id, safe=True)
    for arg, value in (
        ("pipeline_version", pipeline_version),
        ("rig_version", rig_version),
        ("run_id", run_id),
    ):
        _check_id(arg, value, safe=False)
    if label_source not in LABEL_SOURCES:
        raise StorageError(f"label_source={label_source!r}: expected one of {LABEL_SOURCES}")
    if isinstance(label_round, bool) or not isinstance(label_round, int | np.integer):
        raise StorageError(f"label_round must be an int, got {type(label_round).__name__}")
    if not 0 <= int(label_round) <= np.iinfo(np.int16).max:
        raise StorageError(f"label_round={label_round} out of range [0, 32767]")
    if label_source != "distillation" and int(label_round) != 0:
        raise StorageError(
            f"label_round must be 0 for label_source={label_source!r}, got {label_round}"
        )

    fi = np.asarray(frame_index)
    if fi.ndim != 1:
        raise StorageError(f"frame_index must have shape (T,), got {fi.shape}")
    t = fi.shape[0]
    ts = np.asarray(timestamp_ns)
    bs = np.asarray(blendshapes)
    gz = np.asarray(gaze)
    hq = np.asarray(head_quat)
    ht = np.asarray(head_t)
    _check_shape("timestamp_ns", ts, (t,))
    _check_shape("blendshapes", bs, (t, k), hint=f"K = len(blendshape_names) = {k}")
    _check_shape("gaze", gz, (t, 4))
    _check_shape("head_quat", hq, (t, 4))
    _check_shape("head_t", ht, (t, 3))
    if not np.issubdtype(fi.dtype, np.integer):
        raise StorageError(f"frame_index must be integers, got dtype {fi.dtype}")
    if not np.issubdtype(ts.dtype, np.integer):
        raise StorageError(f"timestamp_ns must be integers (ns), got dtype {ts.dtype}")
    if t and (fi.min() < 0 or fi.max() > np.iinfo(np.int32).max):
        raise StorageError(
            f"frame_index out of int32 range [0, 2^31): min {fi.min()}, max {fi.max()}"
        )
    if t and np.unique(fi).size != t:
        raise StorageError(f"frame_index has duplicates in recording {recording_id!r}")
    _check_quaternions(hq)

    schema = label_schema(names)
    columns: dict[str, pa.Array] = {
        "subject_id": pa.array([subject_id] * t, pa.string()),
        "recording_id": pa.array([recording_id] * t, pa.string()),
        "frame_index": pa.array(fi.astype(np.int32)),
        "timestamp_ns": pa.array(ts.astype(np.int64)),
    }
    bs32 = _as_float32("blendshapes", bs)
    for j, name in enumerate(names):
        columns[BS_PREFIX + name] = pa.array(bs32[:, j])
    gz32 = _as_float32("gaze", gz)
    for j, c in enumerate(GAZE_COLUMNS):
        columns[c] = pa.array(gz32[:, j])
    pose = np.concatenate([_as_float32("head_quat", hq), _as_float32("head_t", ht)], axis=1)
    for j, c in enumerate(HEAD_COLUMNS):
        columns[c] = pa.array(pose[:, j])
    for arg, value in (
        ("confidence", confidence),
        ("residual_keypoint_px", residual_keypoint_px),
        ("residual_photometric", residual_photometric),
    ):
        columns[arg] = _optional_float_column(arg, value, t)
    columns["status"] = _string_column("status", status, t, default="ok", allowed=STATUSES)
    columns["failure_reason"] = _string_column("failure_reason", failure_reason, t, default=None)
    columns["label_source"] = pa.array([label_source] * t, pa.string())
    columns["label_round"] = pa.array(np.full(t, int(label_round), np.int16))
    columns["pipeline_version"] = pa.array([pipeline_version] * t, pa.string())
    columns["rig_version"] = pa.array([rig_version] * t, pa.string())
    columns["run_id"] = pa.array([run_id] * t, pa.string())
    columns["schema_version"] = pa.array(np.full(t, LABEL_SCHEMA_VERSION, np.int16))
    columns[PARTITION_COLUMN] = columns["subject_id"]
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def writer_properties() -> WriterProperties:
    """Parquet settings of label files (:data:`COMPRESSION`, :data:`ROW_GROUP_ROWS` rows
    per group)."""
    return WriterProperties(max_row_group_size=ROW_GROUP_ROWS, compression=COMPRESSION)


def blendshape_matrix(table: pa.Table, names: Sequence[str]) -> np.ndarray:
    """Stack the ``bs_<name>`` columns of a label table into a (T, K) float32 matrix.

    Args:
        table: label rows (T rows).
        names: K blendshape names (no prefix) in the wanted column order.

    Returns:
        (T, K) float32; nulls become NaN.
    """
    missing = [n for n in names if BS_PREFIX + n not in table.column_names]
    if missing:
        raise StorageError(f"blendshape_matrix: table has no columns for {missing}")
    out = np.empty((table.num_rows, len(names)), np.float32)
    for j, n in enumerate(names):
        col = table.column(BS_PREFIX + n).cast(pa.float32())
        out[:, j] = col.to_numpy(zero_copy_only=False)  # nulls -> NaN
    return out


class LabelTable:
    """The label Delta table at ``uri``.

    Args:
        uri: table location (local path, or an object-store URL deltalake understands).
        storage_options: object-store options (credentials, endpoint), in fsspec or
            deltalake names (pipeline/storage_options.py).
        partition_by: partition columns used when the first write creates the table
            (default :data:`PARTITION_BY`, the measured choice); an existing table keeps
            its own layout.
        auto_compact_files: after a write, compact the written subject's partition when
            it holds more data files than this; None = never (then call :meth:`optimize`).
    """

    def __init__(
        self,
        uri: str,
        storage_options: Mapping[str, str] | None = None,
        *,
        partition_by: list[str] | None = PARTITION_BY,
        auto_compact_files: int | None = AUTO_COMPACT_FILES,
    ) -> None:
        self.uri = str(uri)
        self.storage_options = dict(storage_options) if storage_options else None
        self.partition_by = list(partition_by) if partition_by else None
        if self.partition_by and not set(self.partition_by) <= set(_PARTITIONABLE):
            raise StorageError(
                f"{self.uri}: partition_by={self.partition_by}: the label table can be "
                f"partitioned only by {_PARTITIONABLE}"
            )
        self.auto_compact_files = auto_compact_files
        self._partitions: list[str] | None = None

    def __repr__(self) -> str:
        return f"LabelTable({self.uri!r})"

    def exists(self) -> bool:
        """Whether the table has been created (first write)."""
        return delta.exists(self.uri, storage_options=self.storage_options)

    def schema_version(self) -> int | None:
        """Label schema version of the stored table (1 or 2), None when there is none."""
        if not self.exists():
            return None
        return 2 if PARTITION_COLUMN in self._delta_schema().names else 1

    def write_subject_round(self, table: pa.Table) -> int:
        """Atomically replace one (subject_id, label_round, label_source) by ``table``.

        All rows of ``table`` must share one subject, round and source (several recordings
        are fine). The old rows of that key disappear and the new ones appear in ONE
        commit; other keys are untouched. The commit reads and rewrites only this
        subject's partition, so writers of different subjects never conflict; writers of
        the same key are retried (storage.delta). When the subject's partition then holds
        more than ``auto_compact_files`` files, it is compacted (a second commit that
        changes no rows).

        Args:
            table: label rows in the canonical schema (e.g. from :func:`labels_to_arrow`,
                concatenated over recordings).

        Returns:
            The Delta version of the commit that replaced the rows.
        """
        table = validate_label_table(table, where=f"{self.uri}: rows to write")
        if table.num_rows == 0:
            raise StorageError(f"{self.uri}: write_subject_round got an empty table")
        key = {}
        for col in REPLACE_KEY:
            values = pc.unique(table.column(col)).to_pylist()
            if len(values) != 1:
                raise StorageError(
                    f"{self.uri}: write_subject_round needs one {col} per write, got {values[:5]}"
                )
            key[col] = values[0]
        if pc.unique(table.column(PARTITION_COLUMN)).to_pylist() != [key["subject_id"]]:
            raise StorageError(f"{self.uri}: {PARTITION_COLUMN} must equal subject_id")
        pairs = table.group_by(["recording_id", "frame_index"]).aggregate([])
        if pairs.num_rows != table.num_rows:
            raise StorageError(
                f"{self.uri}: {table.num_rows - pairs.num_rows} duplicate "
                "(recording_id, frame_index) rows in one write_subject_round"
            )
        run_ids = pc.unique(table.column("run_id")).to_pylist()
        meta = {
            "pgt.table": "labels",
            "pgt.run_id": ",".join(map(str, run_ids)),
            **{f"pgt.{k}": str(v) for k, v in key.items()},
        }
        try:
            version = delta.replace_rows(
                self.uri,
                table,
                # the partition value first: delta-rs then prunes to the subject's folder
                {PARTITION_COLUMN: key["subject_id"], **key},
                partition_by=self.partition_by,
                storage_options=self.storage_options,
                commit_metadata=meta,
                writer_properties=writer_properties(),
                configuration=TABLE_PROPERTIES,
                compact_over=self.auto_compact_files,
            )
        except StorageError as exc:
            self._explain_schema_mismatch(table, exc)
            raise
        return version

    def compact_subject(self, subject_id: str, *, min_files: int = 2) -> dict[str, Any] | None:
        """Compact one subject's partition when it holds at least ``min_files`` files.

        Returns:
            The optimize metrics (see :func:`storage.delta.optimize`), or None when there
            was nothing to do or the table is not partitioned by subject.
        """
        # One table open: the folder name is the partition (safe ids need no escaping);
        # an unpartitioned table has no such folder and is never compacted here.
        folder = f"/{PARTITION_COLUMN}={subject_id}/"
        files = delta.data_files(self.uri, storage_options=self.storage_options)
        if sum(folder in f for f in files) < min_files:
            return None
        return delta.optimize(
            self.uri,
            partition_filters={PARTITION_COLUMN: subject_id},
            storage_options=self.storage_options,
            writer_properties=writer_properties(),
            checkpoint=False,  # one subject's handful of actions; the hook checkpoints
        )

    def _explain_schema_mismatch(self, table: pa.Table, exc: StorageError) -> None:
        """Re-raise a rejected write as a clear version or rig mismatch (checked only after
        a failure: it costs one more table open)."""
        if not self.exists():
            return
        stored = self._delta_schema()
        if PARTITION_COLUMN not in stored.names:
            raise StorageError(
                f"{self.uri}: the table has label schema v1 (unpartitioned); this code "
                f"writes v{LABEL_SCHEMA_VERSION}. Rewrite it once with "
                f"LabelTable({self.uri!r}).upgrade() (docs/storage.md)"
            ) from exc
        existing = blendshape_names_of(stored)
        mine = blendshape_names_of(table.schema)
        if existing != mine:
            raise StorageError(
                f"{self.uri}: blendshape columns differ from the table's "
                f"({len(mine)} vs {len(existing)} names; first difference at "
                f"{_first_diff(mine, existing)}); a new rig needs a new table"
            ) from exc

    def upgrade(self) -> int | None:
        """Rewrite a label schema v1 table as v2 (partitioned by subject) in ONE commit.

        Streams the latest version's rows, adds ``subject_partition`` and replaces the
        table (older versions stay readable by time travel until ``vacuum``). Run it while
        no labelling run writes to the table.

        Returns:
            The version of the rewrite, or None when the table is already v2.
        """
        if self.schema_version() != 1:
            return None
        stored = self._delta_schema()
        names = blendshape_names_of(stored)
        target = label_schema(names)
        dataset = delta.read_dataset(self.uri, storage_options=self.storage_options)

        def batches():
            for batch in dataset.to_batches(columns=stored.names):
                t = pa.Table.from_batches([batch], schema=batch.schema)
                yield from upgrade_rows(t, where=self.uri).cast(target).to_batches()

        version = delta.overwrite_table(
            self.uri,
            pa.RecordBatchReader.from_batches(target, batches()),
            partition_by=[PARTITION_COLUMN],
            storage_options=self.storage_options,
            commit_metadata={"pgt.table": "labels", "pgt.upgrade": f"v1->v{LABEL_SCHEMA_VERSION}"},
            writer_properties=writer_properties(),
            configuration=TABLE_PROPERTIES,
        )
        self._partitions = None  # the layout changed
        return version

    def optimize(self) -> dict[str, Any]:
        """Compact the table, then checkpoint its log (one commit that changes no rows).

        On a v2 table each subject's files are merged into one file per subject: files
        never mix subjects, so a later replace of one subject stays cheap and
        conflict-free. An unpartitioned (v1 or ``partition_by=None``) table is Z-ordered
        by ``subject_id`` instead, which mixes subjects in ~100 MB files: replacing one
        subject then rewrites one of them (docs/storage.md, "Layout").
        """
        partitioned = bool(self._partition_columns())
        return delta.optimize(
            self.uri,
            zorder_by=None if partitioned else ["subject_id"],
            storage_options=self.storage_options,
            writer_properties=writer_properties(),
        )

    def read(
        self,
        subject_id: str | Sequence[str] | None = None,
        recording_id: str | Sequence[str] | None = None,
        label_round: int | None = None,
        label_source: str | None = None,
        version: int | None = None,
        columns: Sequence[str] | None = None,
    ) -> pa.Table:
        """Read label rows, optionally filtered and/or at an older version.

        Args:
            subject_id: one id or a list of ids; None = all.
            recording_id: one id or a list; None = all.
            label_round: only this round.
            label_source: only this source.
            version: Delta version to time-travel to; None = latest.
            columns: subset of columns; None = all, in schema order.

        Returns:
            The rows, with the label schema metadata attached (full-column reads). Rows of
            a v1 table come back in the current schema (see :func:`upgrade_rows`).
        """
        # subject_id alone prunes well: every v2 file holds one subject, so delta-rs skips
        # all others by their min/max statistics (no schema lookup for the partition).
        filters: dict[str, Any] = {}
        for col, value in (
            ("subject_id", subject_id),
            ("recording_id", recording_id),
            ("label_round", label_round),
            ("label_source", label_source),
        ):
            if value is not None:
                filters[col] = list(value) if isinstance(value, list | tuple) else value
        out = delta.read_rows(
            self.uri,
            filters=filters or None,
            version=version,
            columns=columns,
            storage_options=self.storage_options,
        )
        if columns is None:
            out = upgrade_rows(out, where=f"{self.uri} (version {version})")
        return out

    def version(self) -> int | None:
        """Latest committed version, or None when the table does not exist yet."""
        return delta.table_version(self.uri, storage_options=self.storage_options)

    def versions(self) -> list[int]:
        """All versions still in the Delta log, oldest first (each is time-travel readable
        until log cleanup / vacuum removes it)."""
        if not self.exists():
            return []
        return sorted(int(e["version"]) for e in self.history())

    def history(self) -> list[dict[str, Any]]:
        """Commit history, newest first (see :func:`storage.delta.history`); label writes
        carry ``pgt.run_id``, ``pgt.subject_id``, ``pgt.label_round``, ``pgt.label_source``."""
        return delta.history(self.uri, storage_options=self.storage_options)

    def subjects(self, version: int | None = None) -> list[str]:
        """Sorted distinct subject ids present (at ``version``, default latest)."""
        if not self.exists():
            return []
        col = delta.read_rows(
            self.uri, columns=["subject_id"], version=version, storage_options=self.storage_options
        ).column("subject_id")
        return sorted(pc.unique(col).to_pylist())

    def _partition_columns(self) -> list[str]:
        """The stored table's partition columns (cached: only upgrade() changes them)."""
        if self._partitions is None:
            self._partitions = delta.partition_columns(
                self.uri, storage_options=self.storage_options
            )
        return self._partitions

    def _delta_schema(self) -> pa.Schema:
        return delta.table_schema(self.uri, storage_options=self.storage_options)


# ----------------------------------------------------------------------------- helpers


def _check_id(arg: str, value: object, *, safe: bool) -> None:
    if not isinstance(value, str) or not value:
        raise StorageError(f"{arg} must be a non-empty string, got {value!r}")
    if safe and (reason := unsafe_name_reason(value, arg)) is not None:
        raise StorageError(reason)


def _check_shape(arg: str, a: np.ndarray, want: tuple[int, ...], hint: str = "") -> None:
    if a.shape != want:
        extra = f"; {hint}" if hint else ""
        raise StorageError(
            f"{arg} must have shape {_fmt_shape(want)} (T = len(frame_index) = {want[0]}"
            f"{extra}), got {a.shape}"
        )


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _as_float32(arg: str, a: np.ndarray) -> np.ndarray:
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise StorageError(f"{arg} must be numeric, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _check_quaternions(q: np.ndarray) -> None:
    q = np.asarray(q, np.float64)
    finite = np.isfinite(q).all(axis=1)
    if not finite.any():
        return
    norms = np.linalg.norm(q[finite], axis=1)
    bad = np.abs(norms - 1.0) > _QUAT_NORM_TOL
    if bad.any():
        raise StorageError(
            f"head_quat must be unit quaternions (w, x, y, z): {int(bad.sum())} rows have "
            f"|q| off by > {_QUAT_NORM_TOL} (e.g. {norms[bad][0]:.4f})"
        )
    if (q[finite, 0] < -1e-6).any():
        raise StorageError("head_quat must have w >= 0 (contracts.md); negate q where w < 0")


def _optional_float_column(arg: str, value: np.ndarray | None, t: int) -> pa.Array:
    if value is None:
        return pa.nulls(t, pa.float32())
    a = np.asarray(value)
    _check_shape(arg, a, (t,))
    return pa.array(_as_float32(arg, a))


def _string_column(
    arg: str, value: object, t: int, *, default: str | None, allowed: Sequence[str] | None = None
) -> pa.Array:
    if value is None:
        values: list[str | None] = [default] * t
    elif isinstance(value, str):
        values = [value] * t
    else:
        values = [None if v is None else str(v) for v in list(value)]
        if len(values) != t:
            raise StorageError(
                f"{arg} must be one string or have shape ({t},), got {len(values)} values"
            )
    if allowed is not None:
        bad = sorted({v for v in values if v not in allowed}, key=str)
        if bad:
            raise StorageError(f"{arg} values {bad} not in {tuple(allowed)}")
    return pa.array(values, pa.string())


def _first_diff(a: Sequence[str], b: Sequence[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"index {i}: {x!r} vs {y!r}"
    return f"index {min(len(a), len(b))} (length)"
