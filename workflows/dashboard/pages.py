"""The dashboard's four views assembled from queries and builders (front-end neutral).

- dataset: every metric of every (source, round) at dataset level beside the trivial
  labellers, the trend over rounds and runs, coverage per stage, label table versions,
  the failure table;
- subjects: sortable subject and recording tables, worst first (``worst_metric``: where
  each is furthest on the bad side of the others), and the phone-chain pictures;
- recording: curves against the truth (or another round) with segment bands, confidence
  and status, the worst frames; the frame drill-down overlay beside them.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workflows.dashboard import views
from workflows.dashboard.data import DashboardData, FrameData, Group, product_group
from workflows.dashboard.drill import FrameDrill, worst_frames


@dataclass(frozen=True)
class PageConfig:
    """What the views show.

    Attributes:
        worst_n: rows of the worst-first tables that the report embeds recordings for,
            and worst frames listed per recording.
        curves: blendshape curves drawn per recording.
        sampled_frames: frames pre-rendered per recording in the offline report (beside
            the worst ones), evenly spaced, so a click on a curve finds one near it.
        phone_subjects: subjects whose phone-chain pictures the report embeds (worst first).
    """

    worst_n: int = 5
    curves: int = 6
    sampled_frames: int = 8
    phone_subjects: int = 3


def dataset_view(data: DashboardData) -> tuple[Any, dict[str, Any]]:
    """The dataset view and the facts it shows: {"product", "groups", "subjects", "labelled"}."""
    from bokeh.layouts import column
    from bokeh.models import Div

    groups_df = data.groups()
    groups = [(str(s), int(r)) for s, r in zip(groups_df["label_source"], groups_df["label_round"], strict=True)]
    product = product_group(groups_df)  # groups() is read once: each read scans both metrics tables
    dataset = data.dataset_metrics()
    counts = data.label_counts()
    coverage = data.coverage()
    subjects = sorted(set(counts["subject_id"]) if not counts.empty else set())
    labelled = 0
    if product is not None and not counts.empty:
        mine = counts[(counts["label_source"] == product[0]) & (counts["label_round"] == product[1])]
        labelled = int(mine["subject_id"].nunique())
    n_run = int(coverage.groupby("stage")["subjects"].sum().max()) if not coverage.empty else 0
    history = data.label_history()
    failures = data.failures()
    head = (f"<h2>Dataset</h2><p>Product labels: <b>{views.group_label(product) if product else 'none'}</b>; "
            f"{labelled} subject(s) labelled of {max(n_run, len(subjects))}; label table at version "
            f"{history[-1]['version'] if history else 'n/a'} ({len(history)} commits); "
            f"{len(failures)} failure record(s).</p>")
    hist_rows = [{k: h[k] for k in ("version", "run_id", "subject_id", "label_source", "label_round")}
                 for h in history[-12:]][::-1]
    parts = [Div(text=views.TABLE_STYLE + head + views.metrics_table_html(dataset, groups, product),
                 name="dataset-metrics", sizing_mode="stretch_width"),
             views.trend_figure(data.trend(), product),
             views.coverage_figure(coverage, labelled, max(n_run, len(subjects))),
             Div(text="<h3>Latest label table commits</h3>" + views.list_html(
                 hist_rows, ["version", "run_id", "subject_id", "label_source", "label_round"]))]
    parts.append(Div(text=f"<h3>Failures ({len(failures)})</h3>"))
    if not failures.empty:
        parts.append(views.data_table(failures.astype(str), "failures", height=200))
    facts = {"product": product, "groups": groups, "subjects": subjects, "labelled": labelled}
    return column(*parts, sizing_mode="stretch_width"), facts


def subject_tables(data: DashboardData, group: Group | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(subjects, recordings) metric tables of a group, worst first."""
    if group is None:
        return pd.DataFrame(), pd.DataFrame()
    subjects = views.with_worst_metric(data.level_table("subject", group), ["subject_id"])
    recordings = views.with_worst_metric(data.level_table("recording", group), ["subject_id", "recording_id"])
    return subjects, recordings


def phone_pictures_html(data: DashboardData, subject: str) -> str:
    """The subject's phone-chain pictures (landmarks and mask, fused scan, fit-error map,
    texture; workflows/phone_figures.py) embedded, or a line saying why there are none."""
    from pipeline.errors import PgtError
    from workflows.phone_figures import write_phone_figures

    if not data.sources.truth:
        return f"<p>{subject}: phone pictures need the truth folder (they are drawn beside the truth).</p>"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            written = write_phone_figures(Path(data.sources.out), Path(data.sources.truth), Path(tmp), subject)
        except (PgtError, OSError, KeyError, ValueError) as exc:
            return f"<p>{subject}: no phone-chain pictures ({type(exc).__name__}: {exc}).</p>"
        pics = "".join(views.image_html(as_jpeg(p), "image/jpeg", f"{subject}: {p.stem}", 360) for p in written)
    return f'<h3>Phone chain of {subject}</h3><div style="display:flex;flex-wrap:wrap">{pics}</div>'


def as_jpeg(png: Path, quality: int = 85) -> bytes:
    """A picture file re-encoded as JPEG (the phone pictures are photos and meshes: a
    fifth of the PNG's bytes in the report)."""
    import cv2

    from workflows.dashboard.overlay import encode_jpeg

    return encode_jpeg(cv2.imread(str(png))[:, :, ::-1], quality)


@dataclass
class RecordingView:
    """One recording's view and the parts a front end wires up.

    Attributes:
        layout: the Bokeh layout.
        curves: the curves figure (tap target).
        overlay: the Div that shows a frame's overlay.
        worst: the worst-frames DataTable (columns frame, score).
        frames: the labels shown.
        worst_frames: (n,) their frame indices, worst first.
    """

    layout: Any
    curves: Any
    overlay: Any
    worst: Any
    frames: FrameData
    worst_frames: np.ndarray


def recording_view(data: DashboardData, drill: FrameDrill, subject: str, recording: str, group: Group,
                   config: PageConfig, compare: Group | None = None) -> RecordingView | None:
    """The recording view of a group's labels, or None when the table has no such rows.

    Curves are drawn against the truth when the truth folder has it, else against
    ``compare`` (e.g. the previous round) when given.
    """
    from bokeh.layouts import column, row
    from bokeh.models import Div

    from storage.capture import Capture

    frames = data.recording_frames(subject, recording, group)
    if frames is None:
        return None
    truth_b = drill.truth_curves(subject, recording, frames)
    other, other_name = None, ""
    if truth_b is None and compare is not None:
        other_frames = data.recording_frames(subject, recording, compare)
        if other_frames is not None and np.array_equal(other_frames.labels.frame_index, frames.labels.frame_index):
            other, other_name = other_frames.labels.b, views.group_label(compare)
    path = data.capture_path(subject)
    segments = Capture.open(path).recording(recording).segments if path else ()
    title = f"{subject} / {recording}: {views.group_label(group)} (solid) against {'truth' if truth_b is not None else other_name or 'nothing'} (dashed); click a frame"
    curves = views.curves_figure(frames, truth_b, segments, title, config.curves, other, other_name)
    conf = views.confidence_figure(frames, curves.x_range)
    idx, score, what = worst_frames(frames, truth_b, config.worst_n)
    worst = views.data_table(pd.DataFrame({"frame": idx.astype(int), what: score}), f"worst-{subject}-{recording}",
                             height=30 + 26 * max(len(idx), 1))
    overlay = Div(text="<p>Click a curve or a worst frame to see the labelled rig over the HMC views.</p>",
                  name=f"overlay-{subject}-{recording}", css_classes=["pgt-overlay"])
    side = column(Div(text=f"<b>Worst frames</b> ({what})"), worst, width=260)
    layout = column(row(column(curves, conf, sizing_mode="stretch_width"), side, sizing_mode="stretch_width"),
                    overlay, sizing_mode="stretch_width", name=f"recording-{subject}-{recording}")
    return RecordingView(layout, curves, overlay, worst, frames, idx)


def overlay_html(drill: FrameDrill, subject: str, recording: str, frame: int, frames: FrameData) -> str:
    """The drill-down picture of one frame as embedded HTML (or why there is none)."""
    picture = drill.overlay(subject, recording, frame, frames)
    if picture is None:
        return f"<p>{subject}/{recording} frame {frame}: capture not found.</p>"
    origin = drill.rig(subject).origin
    caption = (f"{subject} / {recording} frame {frame}: labelled rig ({origin} rig) over the embedded HMC views; "
               "green = the rendered rig, yellow = its 68 landmarks"
               + (", magenta = true landmarks" if drill.truth(subject) is not None else ""))
    return views.image_html(picture, "image/jpeg", caption)
