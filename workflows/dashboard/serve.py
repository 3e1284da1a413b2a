"""``pgt dashboard OUT``: the report's views served live on localhost with Panel.

Each browser session gets its own app. Any recording opens on demand (its frames are
read from the label table when picked) and any frame's overlay is drawn when clicked.
Every ``refresh_s`` the app compares the tables' Delta versions and, when one changed
(a backfill committed labels, metrics or failures), rebuilds the dataset view and the
tables: the page follows a live backfill without a reload.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workflows.dashboard import pages, views
from workflows.dashboard.data import DashboardData, DashboardSources
from workflows.dashboard.drill import FrameDrill
from workflows.dashboard.overlay import OverlayConfig


@dataclass(frozen=True)
class ServeConfig:
    """How the dashboard is served.

    Attributes:
        port: TCP port on 127.0.0.1.
        refresh_s: seconds between checks of the tables' versions.
        page: the views' options.
        overlay: how drill-down pictures are drawn.
    """

    port: int = 5006
    refresh_s: float = 5.0
    page: pages.PageConfig = field(default_factory=pages.PageConfig)
    overlay: OverlayConfig = field(default_factory=OverlayConfig)


class DashboardApp:
    """One session's dashboard: the views, their callbacks and the refresh.

    Args:
        sources: the run's tables.
        config: options.
    """

    def __init__(self, sources: DashboardSources, config: ServeConfig) -> None:
        import panel as pn

        self.config = config
        self.data = DashboardData(sources)
        self.drill = FrameDrill(self.data, config.overlay)
        self.versions: dict[str, int | None] = {}
        self.product = None
        self.dataset = pn.Column(sizing_mode="stretch_width")
        self.tables = pn.Column(sizing_mode="stretch_width")
        self.select = pn.widgets.Select(name="Recording (worst first)", options=[], width=320)
        self.subject_pictures = pn.pane.HTML("", sizing_mode="stretch_width")
        self.pictures_button = pn.widgets.Button(name="Phone-chain pictures of this subject", width=320)
        self.pictures_button.on_click(lambda event: self.show_pictures())
        self.recording = pn.Column(sizing_mode="stretch_width")
        self.status = pn.pane.HTML("", sizing_mode="stretch_width")
        self.tabs = pn.Tabs(("Dataset", self.dataset), ("Subjects", self.tables),
                            ("Recording", pn.Column(self.select, self.recording, self.pictures_button, self.subject_pictures,
                                                    sizing_mode="stretch_width")),
                            sizing_mode="stretch_width", dynamic=False)
        self.select.param.watch(lambda event: self.show_recording(event.new), "value")
        self.refresh(force=True)
        self.layout = pn.Column(pn.pane.HTML("<h1>hmc-pgt QA dashboard</h1>"), self.status, self.tabs,
                                sizing_mode="stretch_width")

    def refresh(self, force: bool = False) -> bool:
        """Rebuilds the dataset view and the tables when a table gained a version."""
        versions = self.data.versions()
        if not force and versions == self.versions:
            return False
        import panel as pn

        self.versions = versions
        layout, facts = pages.dataset_view(self.data)
        self.product = facts["product"]
        self.dataset.objects = [pn.pane.Bokeh(layout, sizing_mode="stretch_width")]
        subjects, recordings = pages.subject_tables(self.data, self.product)
        subject_table, recording_table = views.data_table(subjects, "subjects"), views.data_table(recordings, "recordings")
        self._on_row(subject_table, subjects, with_recording=False)
        self._on_row(recording_table, recordings, with_recording=True)
        self.tables.objects = [pn.pane.HTML("<p>Worst first (<code>worst_metric</code>, <code>worst_z</code>: where "
                                            "the row is furthest on the bad side of the others). Click a row to open it.</p>"),
                               pn.pane.Bokeh(subject_table, sizing_mode="stretch_width"),
                               pn.pane.Bokeh(recording_table, sizing_mode="stretch_width")]
        keys = [f"{s}/{r}" for s, r in zip(recordings.get("subject_id", []), recordings.get("recording_id", []), strict=True)]
        current = self.select.value
        self.select.options = keys
        if current in keys:
            self.show_recording(current)
        elif keys:
            self.select.value = keys[0]
        shown = ", ".join(f"{k} v{v}" for k, v in versions.items() if v is not None)
        self.status.object = f"<p>Tables: {shown}. Checked every {self.config.refresh_s:g} s.</p>"
        return True

    def _on_row(self, table: Any, frame: Any, with_recording: bool) -> None:
        """A click on a row opens that subject's worst recording (or that recording)."""

        def opened(attr: str, old: Any, new: list[int]) -> None:
            if not new:
                return
            row = frame.iloc[new[0]]
            key = f"{row['subject_id']}/{row['recording_id']}" if with_recording else str(row["subject_id"])
            hit = next((o for o in self.select.options if o == key or o.startswith(key + "/")), None)
            if hit:
                self.select.value = hit
                self.tabs.active = 2

        table.source.selected.on_change("indices", opened)

    def show_recording(self, key: str) -> None:
        """Builds the recording view of ``subject/recording`` (frames read now)."""
        import panel as pn
        from bokeh.events import Tap

        if not key or self.product is None:
            self.recording.objects = []
            return
        subject, recording = key.split("/", 1)
        view = pages.recording_view(self.data, self.drill, subject, recording, self.product, self.config.page)
        if view is None:
            self.recording.objects = [pn.pane.HTML(f"<p>{key}: no labels.</p>")]
            return
        index = view.frames.labels.frame_index

        def show_frame(frame: int) -> None:
            view.overlay.text = pages.overlay_html(self.drill, subject, recording, frame, view.frames)

        def tapped(event: Any) -> None:
            show_frame(int(index[abs(index - event.x).argmin()]))

        def picked(attr: str, old: Any, new: list[int]) -> None:
            if new:
                show_frame(int(view.worst.source.data["frame"][new[0]]))

        view.curves.on_event(Tap, tapped)
        view.worst.source.selected.on_change("indices", picked)
        if len(view.worst_frames):
            show_frame(int(view.worst_frames[0]))
        self.recording.objects = [pn.pane.Bokeh(view.layout, sizing_mode="stretch_width")]
        self.subject_pictures.object = ""

    def show_pictures(self) -> None:
        """The phone-chain pictures of the shown subject (drawn on request: seconds each)."""
        if self.select.value:
            self.subject_pictures.object = pages.phone_pictures_html(self.data, self.select.value.split("/", 1)[0])


def make_app(sources: DashboardSources, config: ServeConfig) -> Any:
    """A new session's page, with its refresh scheduled."""
    import panel as pn

    app = DashboardApp(sources, config)
    pn.state.add_periodic_callback(app.refresh, period=int(config.refresh_s * 1000))
    return app.layout


def serve(sources: DashboardSources, config: ServeConfig | None = None, *, block: bool = True) -> Any:
    """Serves the dashboard on ``127.0.0.1:config.port``.

    Args:
        sources: the run's tables.
        config: options.
        block: serve until interrupted; else return the server thread at once (it has
            ``.stop()``; the port is ``server.port`` once started).
    """
    import panel as pn

    config = config or ServeConfig()
    return pn.serve({"/": lambda: make_app(sources, config)}, port=config.port, address="127.0.0.1",
                    show=False, threaded=not block, title="hmc-pgt QA dashboard",
                    websocket_origin=[f"127.0.0.1:{config.port}", f"localhost:{config.port}"],
                    start=True)


def dashboard_from_args(args: Any) -> int:
    """``pgt dashboard``: serves until interrupted."""
    from pipeline import storage_options

    sources = DashboardSources(out=args.out, labels=args.labels or "", metrics=args.metrics or "",
                               trivial_metrics=args.trivial_metrics or "", captures=args.captures or "",
                               truth=args.truth or "", storage_options=storage_options.from_args(args) or None)
    print(f"serving the QA dashboard of {args.out} on http://127.0.0.1:{args.port}/ (Ctrl-C stops)")
    serve(sources, ServeConfig(port=args.port, refresh_s=args.refresh))
    return 0
