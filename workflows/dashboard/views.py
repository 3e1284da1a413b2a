"""The dashboard's views as Bokeh models and small HTML tables, shared by the offline
report (:mod:`.report`) and the served dashboard (:mod:`.serve`).

Every builder is a pure function of query results (pandas frames, arrays); wiring
(JavaScript in the report, Python callbacks when served) is the caller's.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from workflows.dashboard.data import NO_TRUTH_METRICS, Group, badness, is_reference, lower_is_better

#: Segment kinds (storage/capture_types.Segment) and the colour of their bands.
SEGMENT_COLOURS = {"neutral": "#9e9e9e", "peak": "#1f77b4", "eye_closure": "#2ca02c", "wink": "#98df8a",
                   "mouth_closed": "#d62728", "speech": "#ff7f0e"}
#: Metrics shown in the trend plot when present (the rest are in the tables).
TREND_METRICS = (*NO_TRUTH_METRICS, "active_mae", "amplitude_ratio")
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
STATE_COLOURS = {"done": "#2ca02c", "failed": "#d62728", "skipped": "#ff7f0e", "pending": "#c7c7c7"}


def group_key(group: Group) -> str:
    """``source:round``, the id of a group in the page (tests find cells by it)."""
    return f"{group[0]}:{group[1]}"


def group_label(group: Group) -> str:
    return f"{group[0]} r{group[1]}"


def fmt(value: Any) -> str:
    """A metric value as the views print it (4 decimals; n/a when it does not apply)."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{float(value):.4f}"


def metrics_table_html(dataset: pd.DataFrame, groups: Sequence[Group], product: Group | None) -> str:
    """The dataset-level metrics of every group, one row per metric, the product's column first.

    Each value cell carries ``data-metric`` and ``data-group`` (``source:round``).
    """
    if dataset.empty:
        return "<p>No metrics table yet.</p>"
    order = sorted(groups, key=lambda g: (g != product, is_reference(g[0]), g))
    metrics = list(dict.fromkeys(dataset["metric"]))
    values = {(r.metric, r.label_source, int(r.label_round)): (r.value, r.n_items) for r in dataset.itertuples()}
    head = "".join(f"<th>{html.escape(group_label(g))}{' (product)' if g == product else ''}</th>" for g in order)
    rows = []
    for m in metrics:
        arrow = "lower is better" if lower_is_better(m) else "higher is better"
        if "ratio" in m:
            arrow = "1 is best"
        cells = []
        for g in order:
            value, n = values.get((m, g[0], g[1]), (None, 0))
            cells.append(f'<td data-metric="{html.escape(m)}" data-group="{html.escape(group_key(g))}" '
                         f'title="{n} subject(s)">{fmt(value)}</td>')
        rows.append(f"<tr><th title='{arrow}'>{html.escape(m)}</th>{''.join(cells)}</tr>")
    return (f'<table class="pgt-metrics"><thead><tr><th>metric</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


TABLE_STYLE = """<style>
table.pgt-metrics, table.pgt-list {border-collapse: collapse; font: 13px sans-serif}
.pgt-metrics td, .pgt-metrics th, .pgt-list td, .pgt-list th {border: 1px solid #ccc; padding: 2px 8px}
.pgt-metrics td {text-align: right; font-family: monospace}
.pgt-metrics th:nth-child(2), .pgt-metrics td:nth-child(2) {background: #eef5ff; font-weight: bold}
</style>"""


def trend_figure(trend: pd.DataFrame, product: Group | None) -> Any:
    """Dataset-level metrics over the scorings the metrics table holds (its Delta
    versions): x = each (source, round, run) scored, oldest first, the product's groups
    (non-reference) only, or every group when there is none."""
    from bokeh.models import HoverTool
    from bokeh.plotting import figure

    fig = figure(height=260, sizing_mode="stretch_width", title="Trend across rounds and runs (dataset level)",
                 tools="pan,wheel_zoom,reset,save", y_axis_label="value")
    if trend.empty:
        return fig
    own = trend[~trend["label_source"].map(is_reference)]
    trend = own if not own.empty else trend
    keys = trend[["label_source", "label_round", "run_id", "computed_at"]].drop_duplicates()
    keys = keys.sort_values(["label_round", "computed_at"]).reset_index(drop=True)
    labels = [f"{s} r{r} {str(run)[:17]}" for s, r, run, _ in keys.itertuples(index=False)]
    index = {tuple(k): i for i, k in enumerate(keys.itertuples(index=False))}
    for i, m in enumerate(mt for mt in TREND_METRICS if mt in set(trend["metric"])):
        part = trend[trend["metric"] == m]
        x = [index[(s, r, run, c)] for s, r, run, c in
             part[["label_source", "label_round", "run_id", "computed_at"]].itertuples(index=False)]
        order = np.argsort(x)
        src = {"x": np.asarray(x)[order], "y": part["value"].to_numpy()[order],
               "scoring": [labels[j] for j in np.asarray(x)[order]], "metric": [m] * len(x)}
        colour = PALETTE[i % len(PALETTE)]
        fig.line("x", "y", source=src, color=colour, legend_label=m, line_width=2)
        fig.scatter("x", "y", source=src, color=colour, size=7)
    fig.xaxis.ticker = list(range(len(labels)))
    fig.xaxis.major_label_overrides = dict(enumerate(labels))
    fig.add_tools(HoverTool(tooltips=[("metric", "@metric"), ("value", "@y{0.0000}"), ("scored", "@scoring")]))
    fig.legend.location = "top_left"
    fig.legend.click_policy = "hide"
    fig.add_layout(fig.legend[0], "right")
    return fig


def coverage_figure(coverage: pd.DataFrame, labelled: int, n_subjects: int) -> Any:
    """Units of the latest run per stage and state, stacked; plus a ``labels`` bar:
    subjects holding the product's labels in the label table."""
    from bokeh.plotting import figure

    stages = list(dict.fromkeys(coverage["stage"])) if not coverage.empty else []
    rows = {st: {s: 0 for s in STATE_COLOURS} for st in [*stages, "labels"]}
    for r in coverage.itertuples():
        rows[r.stage][r.state] = int(r.subjects)
    rows["labels"]["done"] = labelled
    rows["labels"]["pending"] = max(n_subjects - labelled, 0)
    y = list(rows)[::-1]
    data = {"stage": y, **{s: [rows[st][s] for st in y] for s in STATE_COLOURS}}
    fig = figure(y_range=y, height=40 + 24 * len(y), width=640, title="Coverage: subjects per stage and state",
                 tools="save", x_axis_label="subjects")
    fig.hbar_stack(list(STATE_COLOURS), y="stage", height=0.7, source=data, color=list(STATE_COLOURS.values()),
                   legend_label=list(STATE_COLOURS))
    fig.legend.orientation = "horizontal"
    fig.add_layout(fig.legend[0], "below")
    return fig


def data_table(df: pd.DataFrame, name: str, height: int = 260, digits: int = 4) -> Any:
    """A sortable Bokeh DataTable of a frame (numbers to ``digits`` decimals)."""
    from bokeh.models import ColumnDataSource, DataTable, NumberFormatter, TableColumn

    df = df.reset_index(drop=True)
    cols, data = [], {}
    for c in df.columns:
        numeric = pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
        integer = pd.api.types.is_integer_dtype(df[c])
        kwargs = {"formatter": NumberFormatter(format="0" if integer else "0." + "0" * digits,
                                               nan_format="n/a")} if numeric else {}
        cols.append(TableColumn(field=str(c), title=str(c), **kwargs))
        data[str(c)] = (df[c].to_numpy() if integer else df[c].astype(float).to_numpy() if numeric
                        else df[c].astype(str).to_list())
    height = height if height else 30 + 25 * max(len(df), 1)
    return DataTable(source=ColumnDataSource(data), columns=cols, sortable=True, name=name,
                     height=min(height, 30 + 25 * max(len(df), 1)), sizing_mode="stretch_width", index_position=None)


def with_worst_metric(table: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Adds ``worst_metric`` (the metric where the row is furthest on the bad side of the
    other rows' mean, in spreads: :func:`spread_floor`) and ``worst_z``; rows sorted worst first."""
    metrics = [c for c in table.columns if c not in keys]
    if table.empty or not metrics:
        return table.assign(worst_metric=[], worst_z=[])
    bad = pd.DataFrame({m: badness(m, table[m].astype(float).to_numpy()) for m in metrics})  # NaN stays NaN
    z = (bad - bad.mean()) / pd.Series({m: spread_floor(m, bad[m]) for m in metrics})
    filled = z.fillna(-np.inf)
    worst = filled.idxmax(axis=1).where(np.isfinite(filled.max(axis=1)), "")
    out = table.assign(worst_metric=worst.to_numpy(), worst_z=filled.max(axis=1).replace(-np.inf, np.nan).to_numpy())
    lead = [k for k in keys]
    return out[[*lead, "worst_metric", "worst_z", *metrics]].sort_values("worst_z", ascending=False,
                                                                          na_position="last", ignore_index=True)


def spread_floor(metric: str, badness_values: pd.Series) -> float:
    """The spread a row's deviation is divided by: the standard deviation, but at least
    0.05 for scores and ratios in [0, 1] and 10 % of the typical value for errors, so a
    tiny difference among a few rows is not called an outlier."""
    bounded = not lower_is_better(metric) or "ratio" in metric
    floor = 0.05 if bounded else 0.1 * float(np.nanmedian(np.abs(badness_values))) if badness_values.notna().any() else 0.0
    spread = float(badness_values.std(ddof=0)) if badness_values.notna().sum() > 1 else 0.0
    return max(spread, floor) or np.nan


def curves_figure(frames: Any, truth_b: np.ndarray | None, segments: Sequence[Any], title: str,
                  top_k: int = 6, compare: np.ndarray | None = None, compare_label: str = "") -> Any:
    """Blendshape curves over frames: labels solid, the truth (or ``compare``, another
    round) dashed; segment annotations as bands. Shows the ``top_k`` bases that move
    most (largest error against the reference when there is one).

    Args:
        frames: :class:`~workflows.dashboard.data.FrameData`.
        truth_b: (T, K) the truth in the labels' order, or None.
        segments: the recording's segments.
        title: figure title.
        top_k: bases shown.
        compare: (T, K) another group's labels in the same order, when no truth.
        compare_label: its legend name.
    """
    from bokeh.plotting import figure

    labels = frames.labels
    ref, ref_name = (truth_b, "truth") if truth_b is not None else (compare, compare_label)
    score = np.nanmean(np.abs(labels.b - ref), axis=0) if ref is not None else np.zeros(len(labels.names))
    score = score + 1e-3 * np.nanmax(labels.b, axis=0) if len(labels.b) else score
    shown = np.argsort(-np.nan_to_num(score))[:top_k]
    fig = figure(height=300, sizing_mode="stretch_width", title=title, x_axis_label="frame",
                 y_axis_label="blendshape", tools="pan,xwheel_zoom,box_zoom,reset,tap,save", y_range=(-0.05, 1.1))
    segment_bands(fig, segments)
    x = labels.frame_index
    for i, k in enumerate(shown):
        colour = PALETTE[i % len(PALETTE)]
        fig.line(x, labels.b[:, k], color=colour, line_width=2, legend_label=labels.names[k])
        if ref is not None:
            fig.line(x, ref[:, k], color=colour, line_dash="dashed", line_width=1.5,
                     legend_label=f"{labels.names[k]} ({ref_name})")
    if fig.legend:
        fig.legend.click_policy = "hide"
        fig.legend.label_text_font_size = "9px"
        fig.add_layout(fig.legend[0], "right")
    return fig


def segment_bands(fig: Any, segments: Sequence[Any]) -> None:
    """Draws each segment as a vertical band with its kind (and prompt or eye) above it."""
    from bokeh.models import BoxAnnotation, Label

    for s in segments:
        colour = SEGMENT_COLOURS.get(s.kind, "#bbbbbb")
        fig.add_layout(BoxAnnotation(left=s.start, right=s.end - 1, fill_color=colour, fill_alpha=0.15,
                                     line_alpha=0))
        text = s.kind + (f": {s.prompt}" if s.prompt else "") + (f" ({s.eye})" if s.eye else "")
        fig.add_layout(Label(x=s.start, y=1.02, text=text, text_font_size="8pt", text_color=colour))


def confidence_figure(frames: Any, x_range: Any) -> Any:
    """Per-frame confidence (line) and status (frames not ``ok`` as red ticks at 0)."""
    from bokeh.plotting import figure

    labels = frames.labels
    fig = figure(height=150, sizing_mode="stretch_width", x_range=x_range, title="confidence and status",
                 tools="xpan,xwheel_zoom,reset,save", y_range=(-0.1, 1.1))
    conf = np.asarray(frames.confidence, float)
    if np.isfinite(conf).any():
        fig.line(labels.frame_index, np.nan_to_num(conf, nan=np.nan), color="#444444", legend_label="confidence")
    if labels.status is not None:
        bad = labels.status != "ok"
        fig.scatter(labels.frame_index[bad], np.zeros(int(bad.sum())), marker="dash", angle=np.pi / 2,
                    color="#d62728", size=10, legend_label=f"not ok ({int(bad.sum())})")
    return fig


def image_html(data: bytes, mime: str, caption: str, width: int | None = None) -> str:
    """An ``<img>`` with its bytes embedded as a data URI, and a caption."""
    size = f' width="{width}"' if width else ""
    src = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return (f'<figure style="margin:4px"><img src="{src}"{size} alt="{html.escape(caption)}"/>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def list_html(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain HTML table of rows (escaped)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f'<table class="pgt-list"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
