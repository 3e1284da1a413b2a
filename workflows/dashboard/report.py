"""``pgt report OUT``: one self-contained HTML file of the QA views (works offline).

Bokeh's INLINE resources embed every script and style; pictures are base64 data URIs.
The report holds the dataset view, the sortable subject and recording tables, the
phone-chain pictures of the worst subjects, and the recording view of the worst
recordings (``max_recordings``), each with overlays pre-rendered for its worst frames
and a few evenly spaced ones: a click on a curve shows the nearest one. Clicking a
subject or recording row opens its recording view. Every recording and frame is
reachable in the served dashboard (``pgt dashboard``), which renders on demand.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workflows.dashboard import pages
from workflows.dashboard.data import DashboardData, DashboardSources
from workflows.dashboard.drill import FrameDrill
from workflows.dashboard.overlay import OverlayConfig


@dataclass(frozen=True)
class ReportConfig:
    """What the offline report embeds.

    Attributes:
        page: the views' options (worst-N, curves, frames sampled per recording).
        overlay: how drill-down pictures are drawn.
        max_recordings: recordings (worst first) whose curves and frames are embedded.
        title: the page title.
    """

    page: pages.PageConfig = field(default_factory=pages.PageConfig)
    overlay: OverlayConfig = field(default_factory=OverlayConfig)
    max_recordings: int = 12
    title: str = "hmc-pgt QA report"


@dataclass(frozen=True)
class ReportInfo:
    """What :func:`build_report` wrote.

    Attributes:
        path: the HTML file.
        size_bytes: its size.
        seconds: wall time of the build.
        recordings: the recordings embedded ("subject/recording").
        frames: overlay pictures embedded.
    """

    path: Path
    size_bytes: int
    seconds: float
    recordings: tuple[str, ...]
    frames: int


_SHOW_RECORDING = """
const i = select.options.indexOf(select.value);
for (let k = 0; k < layouts.length; k++) { layouts[k].visible = (k === i); }
"""
_PICK_ROW = """
const idx = src.selected.indices;
if (idx.length === 0) { return; }
const key = src.data[field][idx[0]] + (field2 ? "/" + src.data[field2][idx[0]] : "");
const hit = select.options.find(o => o === key || o.startsWith(key + "/"));
if (hit) { select.value = hit; tabs.active = 2; }
"""
_TAP_FRAME = """
const frames = pics.data.frame;
let best = 0;
for (let k = 1; k < frames.length; k++) {
  if (Math.abs(frames[k] - cb_obj.x) < Math.abs(frames[best] - cb_obj.x)) { best = k; }
}
div.text = pics.data.html[best];
"""
_PICK_WORST = """
const idx = src.selected.indices;
if (idx.length === 0) { return; }
const k = Array.from(pics.data.frame).indexOf(src.data.frame[idx[0]]);
if (k >= 0) { div.text = pics.data.html[k]; }
"""


def _embedded_frames(view: pages.RecordingView, sampled: int) -> list[int]:
    """The worst frames and ``sampled`` evenly spaced ones, in frame order."""
    index = view.frames.labels.frame_index
    spaced = index[np.linspace(0, len(index) - 1, min(sampled, len(index))).astype(int)]
    return sorted({int(f) for f in (*view.worst_frames, *spaced)})


def _wire_recording(view: pages.RecordingView, drill: FrameDrill, subject: str, recording: str,
                    sampled: int) -> int:
    """Pre-renders the recording's drill-down pictures and wires the tap and row clicks."""
    from bokeh.events import Tap
    from bokeh.models import ColumnDataSource, CustomJS

    frames = _embedded_frames(view, sampled)
    html = [pages.overlay_html(drill, subject, recording, f, view.frames) for f in frames]
    args = {"div": view.overlay, "pics": ColumnDataSource({"frame": frames, "html": html})}  # shared: embedded once
    view.curves.js_on_event(Tap, CustomJS(args=args, code=_TAP_FRAME))
    view.worst.source.selected.js_on_change("indices", CustomJS(args={**args, "src": view.worst.source},
                                                                code=_PICK_WORST))
    if len(view.worst_frames):
        view.overlay.text = html[frames.index(int(view.worst_frames[0]))]
    return len(frames)


def build_report(sources: DashboardSources, path: str | Path, config: ReportConfig | None = None) -> ReportInfo:
    """Writes the report of a run's tables to ``path`` (one HTML file)."""
    from bokeh.embed import file_html
    from bokeh.layouts import column
    from bokeh.models import CustomJS, Div, Select, TabPanel, Tabs
    from bokeh.resources import INLINE

    config = config or ReportConfig()
    start = time.perf_counter()
    data = DashboardData(sources)
    drill = FrameDrill(data, config.overlay)
    dataset, facts = pages.dataset_view(data)
    product = facts["product"]
    subjects, recordings = pages.subject_tables(data, product)
    chosen = recordings.head(config.max_recordings)
    views_, keys, n_frames = [], [], 0
    for sid, rid in zip(chosen.get("subject_id", []), chosen.get("recording_id", []), strict=True):
        view = pages.recording_view(data, drill, sid, rid, product, config.page)
        if view is None:
            continue
        n_frames += _wire_recording(view, drill, sid, rid, config.page.sampled_frames)
        view.layout.visible = not views_
        views_.append(view.layout)
        keys.append(f"{sid}/{rid}")
    select = Select(title="Recording (worst first)", options=keys, value=keys[0] if keys else "",
                    name="recording-select")
    select.js_on_change("value", CustomJS(args={"select": select, "layouts": views_}, code=_SHOW_RECORDING))
    from workflows.dashboard import views

    subject_table = views.data_table(subjects, "subjects")
    recordings = recordings.assign(in_report=[f"{s}/{r}" in keys for s, r in
                                              zip(recordings.get("subject_id", []), recordings.get("recording_id", []), strict=True)])
    recording_table = views.data_table(recordings, "recordings")
    phone = "".join(pages.phone_pictures_html(data, s) for s in subjects.get("subject_id", [])[: config.page.phone_subjects])
    note = Div(text="<p>Worst first: <code>worst_metric</code> is where the row is furthest on the bad side of the "
                    "others (in spreads, <code>worst_z</code>; docs/qa-report.md). Click a column to sort, a row to open "
                    "its recording.</p>")
    tabs = Tabs(tabs=[
        TabPanel(title="Dataset", child=dataset),
        TabPanel(title="Subjects", child=column(note, Div(text="<h3>Subjects</h3>"), subject_table,
                                                Div(text="<h3>Recordings</h3>"), recording_table,
                                                Div(text=phone, name="phone-pictures"), sizing_mode="stretch_width")),
        TabPanel(title="Recording", child=column(select, *views_, sizing_mode="stretch_width")),
    ], sizing_mode="stretch_width", name="views")
    for table, first, second in ((subject_table, "subject_id", ""), (recording_table, "subject_id", "recording_id")):
        table.source.selected.js_on_change("indices", CustomJS(
            args={"src": table.source, "select": select, "tabs": tabs, "field": first, "field2": second},
            code=_PICK_ROW))
    page = file_html(column(Div(text=f"<h1>{config.title}</h1><p>run output {sources.out}</p>"), tabs,
                            sizing_mode="stretch_width"), INLINE, config.title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return ReportInfo(path, path.stat().st_size, time.perf_counter() - start, tuple(keys), n_frames)


def report_from_args(args: Any) -> int:
    """``pgt report``: builds the report and prints where it is."""
    from pipeline import storage_options

    sources = DashboardSources(out=args.out, labels=args.labels or "", metrics=args.metrics or "",
                               trivial_metrics=args.trivial_metrics or "", captures=args.captures or "",
                               truth=args.truth or "", storage_options=storage_options.from_args(args) or None)
    html = args.html or str(Path(args.out) / "qa" / "report.html")
    info = build_report(sources, html, ReportConfig(max_recordings=args.max_recordings))
    print(f"wrote {info.path} ({info.size_bytes / 1e6:.1f} MB, {len(info.recordings)} recording(s), "
          f"{info.frames} frame picture(s), {info.seconds:.1f} s)")
    return 0
