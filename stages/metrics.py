"""Label metrics (SPEC §5, REFA 8.1): the public entry point.

- :func:`recording_metrics` scores one recording with the five no-ground-truth metrics
  (SPEC §5.1; the single metrics live in ``stages.metrics_windows`` and
  ``stages.metrics_smoothness``).
- ``stages.metrics_gt``, ``stages.metrics_active`` and ``stages.metrics_geometry`` hold
  the ground-truth metrics (SPEC §5.2); they are re-exported here.
  ``stages.metrics_trivial`` holds the two trivial labellers every result is scored beside.
- :func:`aggregate` averages recording -> subject -> dataset, skipping metrics that do
  not apply; :func:`metrics_rows` writes the long-format metrics table.
- :func:`recordings_from_label_table` is the thin layer over label tables (SPEC §4).

docs/metrics.md states every formula, threshold and convention.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import ConfigError, StageError
from stages.metrics_active import (
    ACTIVE_MAE,
    AMPLITUDE_RATIO,
    EXPRESSION_MESH_ERROR_ACTIVE,
    ActiveMae,
    AmplitudeRatio,
    active_frames,
    active_mae,
    amplitude_ratio,
    mesh_error_on_frames,
)
from stages.metrics_common import (
    DEFAULT_PARAMS,
    EYE_CLOSURE,
    MOUTH_CLOSURE,
    NEUTRALNESS,
    NO_GT_METRICS,
    SEMANTIC_ACCURACY,
    SMOOTHNESS,
    Failure,
    LipGap,
    MetricParams,
    MetricResult,
    Skip,
    prepare_labels,
    scalar_result,
)
from stages.metrics_geometry import MeshSurface, NowResult, now_scan_to_mesh, rigid_fit
from stages.metrics_gt import (
    BlendshapeMae,
    GazeError,
    HeadPoseError,
    MeshError,
    PerVertexError,
    blendshape_mae,
    expression_mesh_error,
    gaze_angle_deg,
    gaze_direction,
    gaze_error,
    head_pose_error,
    mesh_error_vertices,
    per_vertex_error,
    rotation_error_deg,
    vertex_error,
)
from stages.metrics_smoothness import score_smoothness, smoothness
from stages.metrics_windows import (
    eye_closure,
    mouth_closure,
    neutralness,
    score_eye_closure,
    score_mouth_closure,
    score_neutralness,
    score_semantic_accuracy,
    semantic_accuracy,
)
from storage.label_table import LABEL_SOURCES

__all__ = [
    "EYE_CLOSURE", "MOUTH_CLOSURE", "NEUTRALNESS", "NO_GT_METRICS", "SEMANTIC_ACCURACY",
    "SMOOTHNESS", "METRICS_SCHEMA", "LABEL_SOURCES", "ACTIVE_MAE", "AMPLITUDE_RATIO",
    "EXPRESSION_MESH_ERROR_ACTIVE", "ActiveMae", "AmplitudeRatio",
    "Aggregate", "BlendshapeMae", "Failure", "GazeError", "HeadPoseError", "MeshError",
    "MeshSurface", "MetricParams", "MetricResult", "MetricsSummary", "NowResult",
    "PerVertexError", "RecordingLabels", "RecordingMetrics", "Skip",
    "active_frames", "active_mae", "aggregate", "amplitude_ratio", "blendshape_mae", "expression_mesh_error", "eye_closure", "gaze_angle_deg",
    "gaze_direction", "gaze_error", "head_pose_error", "mesh_error_on_frames", "mesh_error_vertices", "metrics_rows", "mouth_closure",
    "neutralness", "now_scan_to_mesh", "per_vertex_error", "recording_metrics",
    "recordings_from_label_table", "rigid_fit", "rotation_error_deg", "scalar_result",
    "semantic_accuracy", "smoothness", "vertex_error",
]



def recording_metrics(
    b: np.ndarray,
    names: Sequence[str],
    frame_index: np.ndarray,
    timestamp_ns: np.ndarray | None,
    segments: Sequence[Any],
    art_priors: Mapping[str, Mapping[str, float]],
    eye_following: Collection[str],
    *,
    status: Sequence[Any] | None = None,
    fps: float = 30.0,
    lip_gap: LipGap | None = None,
    params: MetricParams = DEFAULT_PARAMS,
) -> dict[str, MetricResult]:
    """The five SPEC §5.1 metrics of one recording.

    Args:
        b: (T, K) coefficients, columns in ``names`` order.
        names: (K,) blendshape names.
        frame_index: (T,) frame indices (any order; segments refer to these values).
        timestamp_ns: (T,) timestamps, or None.
        segments: the recording's segments (kind, start, end, prompt, eye), as objects
            or mappings; start inclusive, end exclusive, in frame indices.
        art_priors: prompt -> {blendshape: prior}.
        eye_following: names of the eye-following blendshapes.
        status: (T,) per-frame status, or None when all frames are labelled.
        fps: the recording's frame rate.
        lip_gap: inner-lip gaps (T,) metres aligned with the given rows, or a function
            b (n, K) -> (n,) metres; needed only when there is a mouth_closed window.
        params: thresholds and conventions (defaults: SPEC's).

    Returns:
        {metric name: result} in :data:`NO_GT_METRICS` order; value None = not applicable.
    """
    rec = prepare_labels(b, names, frame_index, timestamp_ns, status)
    return {
        SEMANTIC_ACCURACY: score_semantic_accuracy(rec, segments, art_priors, params),
        NEUTRALNESS: score_neutralness(rec, segments, eye_following, fps, params),
        SMOOTHNESS: score_smoothness(rec, fps, params),
        EYE_CLOSURE: score_eye_closure(rec, segments, params),
        MOUTH_CLOSURE: score_mouth_closure(rec, segments, lip_gap, params),
    }


# --- Label tables ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordingLabels:
    """One recording's rows of a label table, as arrays (rows in frame order).

    Attributes:
        subject_id: the subject.
        recording_id: the recording.
        b: (T, K) float64 coefficients (float32 in the table).
        names: (K,) blendshape names from the ``bs_<name>`` columns, in table order.
        frame_index: (T,) int64.
        timestamp_ns: (T,) int64.
        status: (T,) object array of status strings, or None without a status column.
        gaze: (T, 4) (left yaw, left pitch, right yaw, right pitch), or None.
        head_q: (T, 4) (w, x, y, z), or None.
        head_t: (T, 3) metres, or None.
    """

    subject_id: str
    recording_id: str
    b: np.ndarray
    names: tuple[str, ...]
    frame_index: np.ndarray
    timestamp_ns: np.ndarray
    status: np.ndarray | None
    gaze: np.ndarray | None
    head_q: np.ndarray | None
    head_t: np.ndarray | None


_GAZE = ("gaze_left_yaw", "gaze_left_pitch", "gaze_right_yaw", "gaze_right_pitch")
_HEAD_Q = ("head_qw", "head_qx", "head_qy", "head_qz")
_HEAD_T = ("head_tx", "head_ty", "head_tz")


def _columns(table: pa.Table, cols: Sequence[str]) -> np.ndarray | None:
    if not all(c in table.column_names for c in cols):
        return None
    if not cols:
        return np.zeros((table.num_rows, 0))
    # Nulls become NaN, so such frames are not usable.
    return np.column_stack(
        [table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in cols]
    ).reshape(table.num_rows, len(cols))


def recordings_from_label_table(table: pa.Table) -> list[RecordingLabels]:
    """Splits a label table (SPEC §4) into recordings.

    Args:
        table: rows of any number of (subject_id, recording_id), in any order.

    Returns:
        One :class:`RecordingLabels` per (subject_id, recording_id), sorted by both; rows
        sorted by frame_index.
    """
    need = ("subject_id", "recording_id", "frame_index", "timestamp_ns")
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise StageError(f"label table lacks columns {missing}")
    bs_cols = [c for c in table.column_names if c.startswith("bs_")]
    if table.num_rows:
        table = table.sort_by([("subject_id", "ascending"), ("recording_id", "ascending"),
                               ("frame_index", "ascending")])
    subj = np.asarray(table.column("subject_id").to_pylist(), dtype=object)
    rec = np.asarray(table.column("recording_id").to_pylist(), dtype=object)
    changes = np.nonzero((subj[1:] != subj[:-1]) | (rec[1:] != rec[:-1]))[0] + 1
    bounds = np.r_[0, changes, table.num_rows] if table.num_rows else np.zeros(1, np.int64)
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        part = table.slice(int(lo), int(hi - lo))
        status = None
        if "status" in part.column_names:
            status = np.asarray(part.column("status").to_pylist(), dtype=object)
        out.append(RecordingLabels(
            subject_id=str(subj[lo]),
            recording_id=str(rec[lo]),
            b=_columns(part, bs_cols),
            names=tuple(c[3:] for c in bs_cols),
            frame_index=part.column("frame_index").to_numpy().astype(np.int64),
            timestamp_ns=pc.fill_null(part.column("timestamp_ns"), -1).to_numpy()
            .astype(np.int64),
            status=status,
            gaze=_columns(part, _GAZE),
            head_q=_columns(part, _HEAD_Q),
            head_t=_columns(part, _HEAD_T),
        ))
    return out


# --- Aggregation and the metrics table ------------------------------------------------------


@dataclass(frozen=True)
class RecordingMetrics:
    """The metric results of one recording.

    Attributes:
        subject_id: the subject.
        recording_id: the recording.
        results: {metric name: result}; any metric names (SPEC §5.1 and §5.2 alike).
    """

    subject_id: str
    recording_id: str
    results: Mapping[str, MetricResult]


@dataclass(frozen=True)
class Aggregate:
    """An averaged metric.

    Attributes:
        value: the mean of the values below it that apply, or None if none applies.
        n: how many values were averaged (recordings for a subject, subjects for the
            dataset).
    """

    value: float | None
    n: int


@dataclass(frozen=True)
class MetricsSummary:
    """Metrics at the three levels of REFA 8.1.

    Attributes:
        recordings: the recording-level results, as given.
        subjects: {subject_id: {metric: mean over the subject's recordings}}.
        dataset: {metric: mean over subjects of the subject means}.
    """

    recordings: tuple[RecordingMetrics, ...]
    subjects: dict[str, dict[str, Aggregate]]
    dataset: dict[str, Aggregate]


def _mean(values: Iterable[float | None]) -> Aggregate:
    vals = [v for v in values if v is not None]
    return Aggregate(float(np.mean(vals)) if vals else None, len(vals))


def aggregate(recordings: Iterable[RecordingMetrics]) -> MetricsSummary:
    """Averages recording -> subject -> dataset; a metric that does not apply is left out.

    A subject's value is the plain mean over its recordings whose value is not None; the
    dataset's is the plain mean over subjects whose value is not None (every subject
    weighs the same, whatever its number of recordings).

    Args:
        recordings: per-recording results; (subject_id, recording_id) must be unique.

    Returns:
        The three levels.
    """
    recs = tuple(recordings)
    seen: set[tuple[str, str]] = set()
    metric_names: list[str] = []
    by_subject: dict[str, list[RecordingMetrics]] = {}
    for r in recs:
        key = (r.subject_id, r.recording_id)
        if key in seen:
            raise StageError(f"recording {key} given twice")
        seen.add(key)
        by_subject.setdefault(r.subject_id, []).append(r)
        metric_names += [m for m in r.results if m not in metric_names]
    subjects = {
        s: {m: _mean(r.results[m].value for r in rs if m in r.results) for m in metric_names}
        for s, rs in sorted(by_subject.items())
    }
    dataset = {m: _mean(subjects[s][m].value for s in subjects) for m in metric_names}
    return MetricsSummary(recs, subjects, dataset)


#: Schema of the long-format metrics table (one row per level x subject x recording x metric).
METRICS_SCHEMA = pa.schema([
    pa.field("level", pa.string(), nullable=False),  # "recording" | "subject" | "dataset"
    pa.field("subject_id", pa.string()),  # null at dataset level
    pa.field("recording_id", pa.string()),  # null at subject and dataset level
    pa.field("metric", pa.string(), nullable=False),
    pa.field("value", pa.float64()),  # null = does not apply
    pa.field("n_items", pa.int64(), nullable=False),
    pa.field("label_source", pa.string(), nullable=False),
    pa.field("label_round", pa.int16(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("computed_at", pa.timestamp("us", tz="UTC"), nullable=False),
])


def metrics_rows(
    recordings: Iterable[RecordingMetrics],
    *,
    label_source: str,
    label_round: int,
    run_id: str,
    computed_at: dt.datetime | None = None,
) -> pa.Table:
    """The metrics table rows of one labelling run, at all three levels (long format).

    Recording rows carry the metric's n_items; subject rows the number of recordings
    averaged; dataset rows the number of subjects averaged. A metric that does not apply
    has a row with value null (and n_items 0 at recording level).

    Args:
        recordings: per-recording results of the run.
        label_source: one of the label table's ``LABEL_SOURCES``.
        label_round: 0, or the distillation round.
        run_id: the labelling run.
        computed_at: timestamp for every row (timezone-aware; default: now, UTC).

    Returns:
        A table with :data:`METRICS_SCHEMA`.

    Raises:
        ConfigError: label_source, label_round or computed_at are invalid.
    """
    if label_source not in LABEL_SOURCES:
        raise ConfigError(f"label_source must be one of {LABEL_SOURCES}, got {label_source!r}")
    if not 0 <= int(label_round) < 2**15:
        raise ConfigError(f"label_round must be in [0, 32767], got {label_round}")
    if computed_at is None:
        computed_at = dt.datetime.now(dt.UTC)
    elif computed_at.tzinfo is None:
        raise ConfigError("computed_at must be timezone-aware")
    summary = aggregate(recordings)
    rows: list[tuple[str, str | None, str | None, str, float | None, int]] = []
    for r in sorted(summary.recordings, key=lambda r: (r.subject_id, r.recording_id)):
        rows += [("recording", r.subject_id, r.recording_id, m, res.value, res.n_items)
                 for m, res in r.results.items()]
    for s, metrics in summary.subjects.items():
        rows += [("subject", s, None, m, a.value, a.n) for m, a in metrics.items()]
    rows += [("dataset", None, None, m, a.value, a.n) for m, a in summary.dataset.items()]
    n = len(rows)
    cols = list(zip(*rows, strict=True)) if rows else [()] * 6
    return pa.table([
        pa.array(cols[0], pa.string()),
        pa.array(cols[1], pa.string()),
        pa.array(cols[2], pa.string()),
        pa.array(cols[3], pa.string()),
        pa.array(cols[4], pa.float64()),
        pa.array(cols[5], pa.int64()),
        pa.array([label_source] * n, pa.string()),
        pa.array([int(label_round)] * n, pa.int16()),
        pa.array([run_id] * n, pa.string()),
        pa.array([computed_at] * n, pa.timestamp("us", tz="UTC")),
    ], schema=METRICS_SCHEMA)
