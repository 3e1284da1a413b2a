"""Job: the metrics of a label table (SPEC §5), written to a versioned metrics table.

For each (subject, recording) of the table it reads the capture's segment annotations and
frame rate, scores SPEC §5.1 (no ground truth), and, when a ground-truth folder is given,
SPEC §5.2 against the synthetic truth. Results go to a Delta metrics table, one commit per
(label_source, label_round), so every computation is a readable version.

With a truth folder (or ``MetricsJob.trivial``), the two trivial labellers of
``stages/metrics_trivial.py`` are written as label tables for the same subjects and
recordings and scored the same way into a metrics table of their own, and
:func:`format_summary` prints them beside the result (docs/metrics.md §6).

The labelled rig (whose inner-lip gap Mouth Closure uses, and which poses the labels for
the expression-mesh error) is the subject's rig from ``rig_dir/<subject>.npz`` when a rig
folder is given, else the personal rig the rig stage of a run made (``rig_run``, the
output root of ``pgt label`` / ``pgt backfill``), else the subject's true rig
``truth/<subject>/rig.npz``. A subject missing from a given rig folder or run is an error. There is no fallback to a generic rig: a generic rig's lip
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
import pyarrow.compute as pc

from pipeline.errors import ConfigError
from pipeline.storage_options import sibling_url
from rigs.definition import RigDefinition, load_default_rig_definition
from rigs.face_model import FaceModel, load_ict_face_model
from rigs.rig import BlendshapeRig
from stages.metrics import (
    MetricsSummary,
    RecordingLabels,
    RecordingMetrics,
    active_frames,
    active_mae,
    aggregate,
    amplitude_ratio,
    blendshape_mae,
    expression_mesh_error,
    gaze_error,
    head_pose_error,
    mesh_error_on_frames,
    mesh_error_vertices,
    metrics_rows,
    recording_metrics,
    recordings_from_label_table,
)
from stages.metrics_common import STATUS_OK, segment_field
from stages.metrics_trivial import TRIVIAL_SOURCES, trivial_label_table
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
            subject needs one there. Empty = ``rig_run``'s rigs, else the true rigs of the
            truth folder.
        rig_run: output root of the ``pgt label`` / ``pgt backfill`` run that made the
            labels; each subject's personal rig is read from the newest finished unit of
            its ``rig`` stage (pipeline/outputs.py). Ignored when ``rig_dir`` is given.
        label_source: score only this source (empty = each source in the table).
        label_round: score only this round (-1 = every round).
        version: label table version to read (-1 = latest).
        run_id: recorded with every metrics row.
        storage_options: object-store options of ``labels`` and ``out``
            (pipeline/storage_options.py); captures, truth and rigs are local folders.
        trivial: also write the two trivial labellers (stages/metrics_trivial.py) for the
            scored subjects and recordings and score them the same way, beside the
            result; None = when ``truth`` is given.
        trivial_labels: label table URI of the trivial labellers; empty =
            ``<out>/../trivial_labels``.
        trivial_metrics: metrics table URI of the trivial labellers (a table of its own,
            so the result's metrics table gets one commit per scored group); empty =
            ``<out>/../trivial_metrics``.
    """

    labels: str
    captures: str
    out: str = ""
    truth: str = ""
    rig_dir: str = ""
    rig_run: str = ""
    label_source: str = ""
    label_round: int = -1
    version: int = -1
    run_id: str = "metrics"
    storage_options: Mapping[str, Any] | None = None
    trivial: bool | None = None
    trivial_labels: str = ""
    trivial_metrics: str = ""


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
    """subject -> :class:`SubjectRig`: ``rig_dir/<subject>.npz``, else the rig stage's
    output in ``rig_run``, else ``truth/<subject>/rig.npz``."""
    cache: dict[str, SubjectRig] = {}
    run_outputs = None

    def from_run(subject: str) -> SubjectRig:
        nonlocal run_outputs
        from pipeline.outputs import RunOutputs
        from stages.rigging import rig_from_run

        run_outputs = run_outputs or RunOutputs(job.rig_run, storage_options=job.storage_options)
        rig = rig_from_run(run_outputs, subject)
        if rig is None:
            raise ConfigError(f"{job.rig_run}: no finished rig stage for subject {subject} in the run output")
        return SubjectRig(rig, (f"{job.rig_run} (rig stage)",))

    def rig_for(subject: str) -> SubjectRig:
        nonlocal model
        if subject in cache:
            return cache[subject]
        if not job.rig_dir and job.rig_run:
            cache[subject] = from_run(subject)
            return cache[subject]
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
        results.update(_ground_truth_metrics(labels, b, definition, mesh_rig, truth_dir, recording.segments))
    return RecordingMetrics(labels.subject_id, labels.recording_id, results)


def _usable(labels: RecordingLabels, *columns: np.ndarray | None) -> np.ndarray:
    """(T,) bool: status ok (or no status) and every given column finite."""
    ok = np.ones(labels.frame_index.size, bool) if labels.status is None else labels.status == STATUS_OK
    for c in columns:
        ok &= np.all(np.isfinite(c), axis=1)
    return ok


def _ground_truth_metrics(labels, b, definition, rig, truth_dir: Path, segments) -> dict:
    """SPEC §5.2 over the labelled frames (status ok, finite values); b in rig order."""
    from stages.synthesis.truth import SubjectTruth

    truth = SubjectTruth.open(truth_dir)
    t = truth.hmc(labels.recording_id)
    rows = np.searchsorted(t["frame_index"], labels.frame_index)
    if not np.array_equal(t["frame_index"][np.minimum(rows, len(t["frame_index"]) - 1)], labels.frame_index):
        raise ConfigError(f"{truth_dir}: frames of {labels.recording_id} differ from the labels")
    names, follow = definition.blendshape_names, set(definition.eye_following)
    use = _usable(labels, b)
    b, b_true, frames = b[use], t["b"][rows[use]], labels.frame_index[use]
    out = blendshape_mae(b, b_true, names, exclude=follow).as_results()
    out.update(active_mae(b, b_true, names, exclude=follow).as_results())
    out.update(amplitude_ratio(b, b_true, names, frames, segments, exclude=follow).as_results())
    mesh = expression_mesh_error(b, b_true, rig.pose, truth.rig.pose, vertex_mask=mesh_error_vertices(rig.model))
    out.update(mesh.as_results())
    out.update(mesh_error_on_frames(mesh, active_frames(b_true, names, exclude=follow)))
    if labels.head_q is not None and labels.head_t is not None:
        use = _usable(labels, labels.head_q, labels.head_t)
        out.update(head_pose_error(labels.head_q[use], labels.head_t[use], t["head_quat"][rows[use]],
                                   t["head_t"][rows[use]]).as_results())
    if labels.gaze is not None:
        use = _usable(labels, labels.gaze)
        out.update(gaze_error(labels.gaze[use], t["gaze"][rows[use]]).as_results())
    return out


class MetricsSummaries(dict):
    """{(label_source, label_round): MetricsSummary} of the scored label table.

    A plain dict of the result's groups, so callers that unpack it are unaffected, plus
    ``trivial``: {trivial labeller's source: MetricsSummary} of the trivial labellers
    scored on the same subjects and recordings (empty when they were not scored).
    """

    def __init__(self, summaries: Mapping[tuple[str, int], MetricsSummary],
                 trivial: Mapping[str, MetricsSummary] | None = None) -> None:
        super().__init__(summaries)
        self.trivial: dict[str, MetricsSummary] = dict(trivial or {})


def _score_table(table, job: MetricsJob, definition: RigDefinition, rig_for) -> list[RecordingMetrics]:
    """Scores every recording of label rows (one source and round)."""
    recs = []
    for labels in recordings_from_label_table(table):
        capture = Capture.open(Path(job.captures) / labels.subject_id)
        truth_dir = Path(job.truth) / labels.subject_id if job.truth else None
        recs.append(score_recording(labels, capture, definition, rig_for(labels.subject_id), truth_dir))
    return recs


def _write_metrics(uri: str, recs, source: str, rnd: int, job: MetricsJob, now) -> MetricsSummary:
    """One commit replacing the (source, round) rows of a metrics table; the summary."""
    rows = metrics_rows(recs, label_source=source, label_round=rnd, run_id=job.run_id, computed_at=now)
    delta.replace_rows(uri, rows, {"label_source": source, "label_round": rnd}, storage_options=job.storage_options)
    return aggregate(recs)


def _score_trivial(recordings: Mapping[str, list[str]], job: MetricsJob, definition: RigDefinition,
                   rig_for, out_uri: str, now) -> dict[str, MetricsSummary]:
    """Writes the trivial labellers' label tables for ``{subject: recordings}`` and scores them."""
    from pipeline import __version__

    labels_uri = job.trivial_labels or sibling_url(out_uri, "trivial_labels")
    metrics_uri = job.trivial_metrics or sibling_url(out_uri, "trivial_metrics")
    table = LabelTable(labels_uri, job.storage_options)
    out = {}
    for source in TRIVIAL_SOURCES:
        for subject, recs in sorted(recordings.items()):
            capture = Capture.open(Path(job.captures) / subject)
            table.write_subject_round(trivial_label_table(
                source, capture, definition, pipeline_version=__version__, run_id=job.run_id, recordings=recs))
        rows = table.read(subject_id=sorted(recordings), label_source=source)
        out[source] = _write_metrics(metrics_uri, _score_table(rows, job, definition, rig_for), source, 0, job, now)
    return out


def run_metrics(job: MetricsJob, definition: RigDefinition | None = None) -> MetricsSummaries:
    """Scores the label table, and beside it the trivial labellers (see ``MetricsJob.trivial``)."""
    definition = definition or load_default_rig_definition()
    table = LabelTable(job.labels, job.storage_options).read(version=None if job.version < 0 else job.version)
    if table.num_rows == 0:
        raise ConfigError(f"{job.labels}: the label table has no rows")
    groups = sorted({(s, int(r)) for s, r in zip(table.column("label_source").to_pylist(), table.column("label_round").to_pylist(), strict=True)})
    groups = [g for g in groups if (not job.label_source or g[0] == job.label_source) and (job.label_round < 0 or g[1] == job.label_round)]
    out_uri = job.out or sibling_url(job.labels, "metrics")
    summaries = {}
    scored: dict[str, set[str]] = {}
    now = dt.datetime.now(dt.UTC)
    rig_for = _rig_provider(job)
    for source, rnd in groups:
        part = table.filter(pc.and_(pc.equal(table["label_source"], source), pc.equal(table["label_round"], rnd)))
        recs = _score_table(part, job, definition, rig_for)
        for r in recs:
            scored.setdefault(r.subject_id, set()).add(r.recording_id)
        summaries[(source, rnd)] = _write_metrics(out_uri, recs, source, rnd, job, now)
    trivial = {}
    if (bool(job.truth) if job.trivial is None else job.trivial) and scored:
        recordings = {s: sorted(r) for s, r in scored.items()}
        trivial = _score_trivial(recordings, job, definition, rig_for, out_uri, now)
    return MetricsSummaries(summaries, trivial)


def _value(summary: MetricsSummary, metric: str) -> str:
    agg = summary.dataset.get(metric)
    return "n/a" if agg is None or agg.value is None else f"{agg.value:.4f}"


def format_summary(summaries: Mapping[tuple[str, int], MetricsSummary]) -> str:
    """A plain-text table: dataset level, then each subject, SPEC §5.1 metrics first.

    With trivial labellers (:class:`MetricsSummaries`), their dataset values stand in
    columns beside the result's, so the result reads against both.
    """
    trivial = getattr(summaries, "trivial", {})
    lines = []
    for (source, rnd), s in summaries.items():
        names = [m for m in s.dataset if "/" not in m]
        lines.append(f"{source} round {rnd}: {len(s.subjects)} subject(s), {len(s.recordings)} recording(s)")
        width = max(len(n) for n in names)
        if trivial:
            head = "".join(f"  {t:>13}" for t in trivial)
            lines.append(f"  {'metric':<{width}}  {'value':>8}{head}   per subject")
        for m in names:
            beside = "".join(f"  {_value(t, m):>13}" for t in trivial.values())
            per_subject = "  ".join(
                f"{sid}={'n/a' if v[m].value is None else f'{v[m].value:.3f}'}" for sid, v in s.subjects.items()
            )
            lines.append(f"  {m:<{width}}  {_value(s, m):>8}{beside}   {per_subject}")
    return "\n".join(lines)
