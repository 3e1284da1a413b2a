"""Job: the metrics of a label table (SPEC §5), written to a versioned metrics table.

For each (subject, recording) of the table it reads the capture's segment annotations and
frame rate, scores SPEC §5.1 (no ground truth), and, when a ground-truth folder is given,
SPEC §5.2 against the synthetic truth. Results go to a Delta metrics table, one commit per
(label_source, label_round), so every computation is a readable version.

The labelled rig (whose inner-lip gap Mouth Closure uses, and which poses the labels for
the expression-mesh error) is the subject's rig from ``rig_dir/<subject>.npz`` when a rig
folder is given (a missing file is an error), else the subject's true rig
``truth/<subject>/rig.npz``. There is no fallback to a generic rig: a generic rig's lip
gap and mesh are not the subject's, so the numbers would not measure the labels. With
no rig, the metrics that need none still run, and a recording that needs one (it has a
mouth_closed window, or is scored against ground truth) stops the job with an error that
names the subject and the files looked for.

Copy this file to change what is scored or where it is written.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.storage_options import sibling_url
from rigs.definition import RigDefinition, load_default_rig_definition
from rigs.face_model import FaceModel, load_ict_face_model
from rigs.rig import BlendshapeRig
from stages.metrics import (
    MetricsSummary,
    RecordingLabels,
    RecordingMetrics,
    aggregate,
    blendshape_mae,
    expression_mesh_error,
    gaze_error,
    head_pose_error,
    mesh_error_vertices,
    metrics_rows,
    recording_metrics,
    recordings_from_label_table,
)
from stages.metrics_common import segment_field
from storage import delta
from storage.capture import Capture
from storage.label_table import LabelTable


@dataclass(frozen=True)
class MetricsJob:
    """What to score and where to write it.

    Attributes:
        labels: label table URI.
        captures: folder holding one capture folder per subject (segments, fps).
        out: metrics table URI; empty = ``<labels>/../metrics``.
        truth: synthetic ground-truth root (``ground_truth/``); empty = no §5.2 metrics.
        rig_dir: folder of the labelled rigs ``<subject>.npz``; when given, every scored
            subject needs one there. Empty = the true rigs of the truth folder.
        label_source: score only this source (empty = each source in the table).
        label_round: score only this round (-1 = every round).
        version: label table version to read (-1 = latest).
        run_id: recorded with every metrics row.
        storage_options: object-store options of ``labels`` and ``out``
            (pipeline/storage_options.py); captures, truth and rigs are local folders.
    """

    labels: str
    captures: str
    out: str = ""
    truth: str = ""
    rig_dir: str = ""
    label_source: str = ""
    label_round: int = -1
    version: int = -1
    run_id: str = "metrics"
    storage_options: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class SubjectRig:
    """The labelled rig of one subject, or why there is none.

    Attributes:
        rig: the rig, or None when neither a rig folder nor a truth folder holds one.
        looked_for: the files looked for, for the error of a metric that needs the rig.
    """

    rig: BlendshapeRig | None
    looked_for: tuple[str, ...]


def _rig_provider(job: MetricsJob, model: FaceModel | None = None) -> Callable[[str], SubjectRig]:
    """subject -> :class:`SubjectRig`: ``rig_dir/<subject>.npz``, else ``truth/<subject>/rig.npz``."""
    cache: dict[str, SubjectRig] = {}

    def rig_for(subject: str) -> SubjectRig:
        nonlocal model
        if subject not in cache:
            if job.rig_dir:
                path = Path(job.rig_dir) / f"{subject}.npz"
                if not path.is_file():
                    raise ConfigError(f"{path}: no rig for subject {subject} in the rig folder")
            else:
                path = Path(job.truth) / subject / "rig.npz" if job.truth else None
            if path is not None and path.is_file():
                model = model or load_ict_face_model()
                cache[subject] = SubjectRig(BlendshapeRig.load(path, model), (str(path),))
            else:
                cache[subject] = SubjectRig(None, (str(path),) if path is not None else ())
        return cache[subject]

    return rig_for


def _need_rig(subject_rig: SubjectRig | BlendshapeRig | None, labels: RecordingLabels, why: str) -> BlendshapeRig:
    """The rig, or a ConfigError naming the subject, the metric and the files looked for."""
    rig = subject_rig.rig if isinstance(subject_rig, SubjectRig) else subject_rig
    if rig is not None:
        return rig
    looked = subject_rig.looked_for if isinstance(subject_rig, SubjectRig) else ()
    where = f"looked for {', '.join(looked)}" if looked else "no rig folder and no truth folder given"
    raise ConfigError(
        f"subject {labels.subject_id}, recording {labels.recording_id}: {why} needs the subject's rig "
        f"({where}); pass a rig folder holding {labels.subject_id}.npz, or the truth folder"
    )


def _has_kind(segments: Sequence, kind: str) -> bool:
    return any(segment_field(s, "kind") == kind for s in segments)


def score_recording(
    labels: RecordingLabels,
    capture: Capture,
    definition: RigDefinition,
    rig: SubjectRig | BlendshapeRig | None,
    truth_dir: Path | None = None,
) -> RecordingMetrics:
    """SPEC §5.1 (and §5.2 with a truth folder) of one recording.

    ``rig`` is the labelled rig (see the module docstring), or None: then the metrics
    that need no rig are scored, and one that needs it raises ConfigError.
    """
    recording = capture.recording(labels.recording_id)
    order = [labels.names.index(n) for n in definition.blendshape_names]
    b = labels.b[:, order]
    lip_gap = None
    if _has_kind(recording.segments, "mouth_closed"):
        lip_gap = _need_rig(rig, labels, "Mouth Closure (inner-lip gap)").inner_lip_gap
    results = dict(recording_metrics(
        b, definition.blendshape_names, labels.frame_index, labels.timestamp_ns, recording.segments,
        definition.art_priors(), set(definition.eye_following), status=labels.status,
        fps=capture.rig.fps, lip_gap=lip_gap,
    ))
    if truth_dir is not None and (truth_dir / "hmc" / f"{labels.recording_id}.npz").is_file():
        mesh_rig = _need_rig(rig, labels, "the expression-mesh error")
        results.update(_ground_truth_metrics(labels, b, definition, mesh_rig, truth_dir))
    return RecordingMetrics(labels.subject_id, labels.recording_id, results)


def _ground_truth_metrics(labels, b, definition, rig, truth_dir: Path) -> dict:
    from stages.synthesis.truth import SubjectTruth

    truth = SubjectTruth.open(truth_dir)
    t = truth.hmc(labels.recording_id)
    rows = np.searchsorted(t["frame_index"], labels.frame_index)
    if not np.array_equal(t["frame_index"][rows], labels.frame_index):
        raise ConfigError(f"{truth_dir}: frames of {labels.recording_id} differ from the labels")
    b_true = t["b"][rows]
    out = blendshape_mae(b, b_true, definition.blendshape_names, exclude=set(definition.eye_following)).as_results()
    out.update(expression_mesh_error(
        b, b_true, rig.pose, truth.rig.pose, vertex_mask=mesh_error_vertices(rig.model),
    ).as_results())
    if labels.head_q is not None and labels.head_t is not None:
        out.update(head_pose_error(labels.head_q, labels.head_t, t["head_quat"][rows], t["head_t"][rows]).as_results())
    if labels.gaze is not None:
        out.update(gaze_error(labels.gaze, t["gaze"][rows]).as_results())
    return out


def run_metrics(job: MetricsJob, definition: RigDefinition | None = None) -> dict[tuple[str, int], MetricsSummary]:
    """Scores the label table; returns {(label_source, label_round): summary}."""
    definition = definition or load_default_rig_definition()
    table = LabelTable(job.labels, job.storage_options).read(version=None if job.version < 0 else job.version)
    if table.num_rows == 0:
        raise ConfigError(f"{job.labels}: the label table has no rows")
    groups = sorted({(s, int(r)) for s, r in zip(table.column("label_source").to_pylist(), table.column("label_round").to_pylist(), strict=True)})
    groups = [g for g in groups if (not job.label_source or g[0] == job.label_source) and (job.label_round < 0 or g[1] == job.label_round)]
    out_uri = job.out or sibling_url(job.labels, "metrics")
    summaries = {}
    now = dt.datetime.now(dt.UTC)
    rig_for = _rig_provider(job)
    for source, rnd in groups:
        import pyarrow.compute as pc

        part = table.filter(pc.and_(pc.equal(table["label_source"], source), pc.equal(table["label_round"], rnd)))
        recs = []
        for labels in recordings_from_label_table(part):
            capture = Capture.open(Path(job.captures) / labels.subject_id)
            truth_dir = Path(job.truth) / labels.subject_id if job.truth else None
            recs.append(score_recording(labels, capture, definition, rig_for(labels.subject_id), truth_dir))
        summary = aggregate(recs)
        rows = metrics_rows(recs, label_source=source, label_round=rnd, run_id=job.run_id, computed_at=now)
        delta.replace_rows(out_uri, rows, {"label_source": source, "label_round": rnd},
                           storage_options=job.storage_options)
        summaries[(source, rnd)] = summary
    return summaries


def format_summary(summaries: dict[tuple[str, int], MetricsSummary]) -> str:
    """A plain-text table: dataset level, then each subject, SPEC §5.1 metrics first."""
    lines = []
    for (source, rnd), s in summaries.items():
        names = [m for m in s.dataset if "/" not in m]
        lines.append(f"{source} round {rnd}: {len(s.subjects)} subject(s), {len(s.recordings)} recording(s)")
        width = max(len(n) for n in names)
        for m in names:
            agg = s.dataset[m]
            value = "n/a" if agg.value is None else f"{agg.value:.4f}"
            per_subject = "  ".join(
                f"{sid}={'n/a' if v[m].value is None else f'{v[m].value:.3f}'}" for sid, v in s.subjects.items()
            )
            lines.append(f"  {m:<{width}}  {value:>8}   {per_subject}")
    return "\n".join(lines)

