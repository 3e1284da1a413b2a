"""Data access of the QA dashboard: where the tables are, and the queries over them.

Aggregates run in DuckDB over a pyarrow dataset of each Delta table's current files
(lazy scans with filter and column pushdown), so nothing loads a whole table: the
metrics table (long format, one row per level x subject x recording x metric) is
queried per level, the label table only for per-subject frame counts, and the frames
of one recording are read on demand (:meth:`DashboardData.recording_frames`).

Label sources are generic (source, round) groups. The truth (``ground_truth``, or
``truth``) and the trivial labellers (``trivial_*``) are references; "the product's
labels" are the non-reference group with the highest round, the newest scored first
on a tie (:func:`product_group`); with none, the dashboard shows the truth, else what is there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipeline.runlog import OutputLayout
from pipeline.storage_options import sibling_url
from storage import delta

#: Label sources that are the truth, never the product.
TRUTH_SOURCES = ("ground_truth", "truth")
#: Prefix of the trivial labellers' sources (stages/metrics_trivial.py).
TRIVIAL_PREFIX = "trivial_"
#: SPEC §5.1 metrics (higher is better, in [0, 1]), in the order the views list them.
NO_TRUTH_METRICS = ("semantic_accuracy", "neutralness", "smoothness", "eye_closure", "mouth_closure")

Group = tuple[str, int]
#: Frame counts a scan found, per (label table, subject): (that subject's files, rows).
_SCANNED: dict[tuple[str, str], tuple[frozenset[str], pd.DataFrame]] = {}


@dataclass(frozen=True)
class DashboardSources:
    """Where a run's tables and files are.

    Attributes:
        out: the run's output root (``runs/``, ``artifacts/``, ``tables/``); its status,
            run and failure tables feed the coverage and failure views.
        labels: label table URI; empty = ``<out>/tables/labels``.
        metrics: metrics table URI (workflows/metrics.py); empty = beside the labels.
        trivial_metrics: the trivial labellers' metrics table; empty = beside the metrics.
        captures: folder of capture folders (HMC images and segments of the drill-down);
            empty = the capture paths the run records hold.
        truth: synthetic ``ground_truth/`` folder (true curves, phone pictures); empty = none.
        storage_options: object-store options of the tables.
    """

    out: str
    labels: str = ""
    metrics: str = ""
    trivial_metrics: str = ""
    captures: str = ""
    truth: str = ""
    storage_options: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def labels_uri(self) -> str:
        return self.labels or OutputLayout(self.out).table("labels")

    @property
    def metrics_uri(self) -> str:
        return self.metrics or sibling_url(self.labels_uri, "metrics")

    @property
    def trivial_metrics_uri(self) -> str:
        return self.trivial_metrics or sibling_url(self.metrics_uri, "trivial_metrics")

    def table(self, name: str) -> str:
        """URI of one of the run's own tables (``failures``, ``runs``)."""
        return OutputLayout(self.out).table(name)


def is_reference(source: str) -> bool:
    """Whether a label source is the truth or a trivial labeller (never "the product")."""
    return source in TRUTH_SOURCES or source.startswith(TRIVIAL_PREFIX)


def product_group(groups: pd.DataFrame) -> Group | None:
    """The product's (source, round): the non-reference group with the highest round,
    the newest ``computed_at`` first on a tie; else the truth; else a trivial labeller;
    None when empty.

    Args:
        groups: rows of (label_source, label_round, computed_at).
    """
    if groups.empty:
        return None
    own = groups[~groups["label_source"].map(is_reference)]
    truth = groups[groups["label_source"].isin(TRUTH_SOURCES)]
    pick = own if not own.empty else truth if not truth.empty else groups
    pick = pick.sort_values(["label_round", "computed_at"], ascending=False)
    row = pick.iloc[0]
    return str(row["label_source"]), int(row["label_round"])


def lower_is_better(metric: str) -> bool:
    """Errors and MAEs fall as labels improve; the SPEC §5.1 scores rise."""
    base = metric.split("/", 1)[0]
    return base not in NO_TRUTH_METRICS and "ratio" not in base


def badness(metric: str, value: Any) -> Any:
    """A value (or an array of them) turned so that larger is worse (amplitude ratio:
    distance from 1)."""
    if "ratio" in metric.split("/", 1)[0]:
        return abs(1.0 - value)
    return value if lower_is_better(metric) else -value


class DashboardData:
    """Queries of the dashboard over one run's tables (reopened at each call, so a
    live view sees new versions).

    Args:
        sources: where the tables are.
    """

    def __init__(self, sources: DashboardSources) -> None:
        import duckdb

        self.sources = sources
        self._con = duckdb.connect()

    # --- versions ---------------------------------------------------------------------

    def _exists(self, uri: str) -> bool:
        return delta.exists(uri, storage_options=self.sources.storage_options)

    def versions(self) -> dict[str, int | None]:
        """Latest version of each table the views read (a change means: refresh)."""
        s = self.sources
        uris = {"labels": s.labels_uri, "metrics": s.metrics_uri, "trivial_metrics": s.trivial_metrics_uri,
                "failures": s.table("failures"), "runs": s.table("runs")}
        return {k: delta.table_version(u, storage_options=s.storage_options) for k, u in uris.items()}

    def _query(self, uri: str, sql: str, params: Sequence[Any] = (), version: int | None = None,
               files_of: Mapping[str, object] | None = None) -> pd.DataFrame:
        """Runs ``sql`` with the table at ``uri`` bound as ``t``; empty when no table.
        ``files_of`` (column -> values) binds only the files that may hold such rows."""
        if not self._exists(uri):
            return pd.DataFrame()
        dataset = delta.read_dataset(uri, filters=files_of, version=version, storage_options=self.sources.storage_options)
        self._con.register("t", dataset)
        try:
            return self._con.execute(sql, list(params)).df()
        finally:
            self._con.unregister("t")

    # --- metrics ----------------------------------------------------------------------

    def groups(self) -> pd.DataFrame:
        """(label_source, label_round, computed_at, run_id) of every scored group, product first."""
        sql = ("SELECT label_source, label_round, max(computed_at) AS computed_at, any_value(run_id) AS run_id "
               "FROM t GROUP BY 1, 2")
        found = [self._query(u, sql) for u in (self.sources.metrics_uri, self.sources.trivial_metrics_uri)]
        found = [f for f in found if not f.empty]
        if not found:
            return pd.DataFrame(columns=["label_source", "label_round", "computed_at", "run_id"])
        out = pd.concat(found, ignore_index=True).drop_duplicates(["label_source", "label_round"])
        product = product_group(out)
        out["is_product"] = [(s, int(r)) == product for s, r in zip(out["label_source"], out["label_round"], strict=True)]
        return out.sort_values(["is_product", "label_source", "label_round"], ascending=[False, True, True],
                               ignore_index=True)

    def product(self) -> Group | None:
        return product_group(self.groups())

    def _metrics_uri(self, source: str) -> str:
        s = self.sources
        return s.trivial_metrics_uri if source.startswith(TRIVIAL_PREFIX) else s.metrics_uri

    def dataset_metrics(self) -> pd.DataFrame:
        """Dataset-level value of every metric (per-basis ones left out) for every group:
        rows (metric, label_source, label_round, value, n_items)."""
        sql = ("SELECT metric, label_source, label_round, value, n_items FROM t "
               "WHERE level = 'dataset' AND metric NOT LIKE '%/%'")
        parts = [self._query(u, sql) for u in {self.sources.metrics_uri, self.sources.trivial_metrics_uri}]
        parts = [p for p in parts if not p.empty]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
            columns=["metric", "label_source", "label_round", "value", "n_items"])

    def level_table(self, level: str, group: Group, per_basis: bool = False) -> pd.DataFrame:
        """One group's subject- or recording-level metrics, one row per subject (and
        recording), one column per metric (null = does not apply)."""
        keys = ["subject_id"] if level == "subject" else ["subject_id", "recording_id"]
        basis = "" if per_basis else "AND metric NOT LIKE '%/%'"
        sql = (f"SELECT {', '.join(keys)}, metric, value FROM t WHERE level = ? AND label_source = ? "
               f"AND label_round = ? {basis}")
        rows = self._query(self._metrics_uri(group[0]), sql, [level, group[0], group[1]])
        if rows.empty:
            return pd.DataFrame(columns=keys)
        wide = rows.pivot_table(index=keys, columns="metric", values="value", aggfunc="first", dropna=False)
        metrics = list(dict.fromkeys(rows["metric"]))  # the table's order: SPEC §5.1 first
        return wide.reindex(columns=metrics).reset_index().sort_values(keys, ignore_index=True)

    def trend(self) -> pd.DataFrame:
        """Dataset-level values of every scoring the metrics table still holds (one point
        per group and scoring run, from every Delta version): rows (label_source,
        label_round, run_id, computed_at, metric, value), oldest first."""
        uri = self.sources.metrics_uri
        if not self._exists(uri):
            return pd.DataFrame()
        sql = ("SELECT DISTINCT label_source, label_round, run_id, computed_at, metric, value FROM t "
               "WHERE level = 'dataset' AND metric NOT LIKE '%/%'")
        versions = sorted(int(h["version"]) for h in delta.history(uri, storage_options=self.sources.storage_options))
        parts = [self._query(uri, sql, version=v) for v in versions]
        out = pd.concat(parts, ignore_index=True).drop_duplicates(
            ["label_source", "label_round", "run_id", "computed_at", "metric"])
        return out.sort_values(["computed_at", "label_round"], ignore_index=True)

    # --- labels -----------------------------------------------------------------------

    def label_history(self) -> list[dict[str, Any]]:
        """The label table's commits, oldest first: version, time (ms), run, subject, source, round."""
        uri = self.sources.labels_uri
        if not self._exists(uri):
            return []
        rows = []
        for h in delta.history(uri, storage_options=self.sources.storage_options):
            rows.append({"version": int(h["version"]), "timestamp": h.get("timestamp"),
                         **{k: h.get(f"pgt.{k}") for k in ("run_id", "subject_id", "label_source", "label_round")}})
        return sorted(rows, key=lambda r: r["version"])

    def label_counts(self) -> pd.DataFrame:
        """Frames per subject and group: rows (subject_id, label_source, label_round, frames).

        From the Delta log's per-file statistics where they settle it: a file whose
        min and max of subject_id, label_source and label_round agree holds one subject's
        rows of one group (what ``write_subject_round`` writes), so its row count is the
        answer and nothing is read. Only the subjects with other files (a compacted
        partition of several groups, bulk appends, tables without those statistics) are
        scanned, and what a scan counted is kept per subject, with that subject's files, for
        the life of the process (files never change, so a live dashboard rescans a subject
        only when its files do). A full scan of a 5,000-subject table took minutes, the log
        5 ms.
        """
        uri = self.sources.labels_uri
        keys = ["subject_id", "label_source", "label_round"]
        if not self._exists(uri):
            return pd.DataFrame(columns=[*keys, "frames"])
        stats = delta.file_statistics(uri, storage_options=self.sources.storage_options).to_pandas()
        if not all(f"{end}.{k}" in stats for k in keys for end in ("min", "max")):
            return self._count_frames(uri, None)  # no statistics to settle it
        single = pd.concat([stats[f"min.{k}"].notna() & (stats[f"min.{k}"] == stats[f"max.{k}"]) for k in keys],
                           axis=1).all(axis=1)
        bounds = stats.loc[~single, ["min.subject_id", "max.subject_id"]]
        if bounds.isna().any(axis=None):
            return self._count_frames(uri, None)
        scan = sorted(set(bounds.stack()))  # their subjects' rows are all counted by the scan
        known = stats[single].rename(columns={f"min.{k}": k for k in keys})
        known = known[~known["subject_id"].isin(scan)].groupby(keys, as_index=False)["num_records"].sum()
        parts = [known.rename(columns={"num_records": "frames"})]
        if scan:
            parts.append(self._scanned_counts(uri, stats, scan))
        out = pd.concat(parts, ignore_index=True).astype({"label_round": int, "frames": int})
        return out.sort_values(keys, ignore_index=True)

    def _scanned_counts(self, uri: str, stats: pd.DataFrame, subjects: list[str]) -> pd.DataFrame:
        """:meth:`_count_frames` of ``subjects``, from :data:`_SCANNED` where a subject's files
        are the ones counted before (only subjects whose files hold no other subject)."""
        own = stats[stats["min.subject_id"] == stats["max.subject_id"]]
        spanning = set(stats.loc[stats["min.subject_id"] != stats["max.subject_id"], ["min.subject_id", "max.subject_id"]]
                       .stack())
        files = own.groupby("min.subject_id")["path"].agg(frozenset)
        reuse = [s for s in subjects if s not in spanning and _SCANNED.get((uri, s), (None,))[0] == files.get(s)]
        todo = [s for s in subjects if s not in reuse]
        parts = [_SCANNED[(uri, s)][1] for s in reuse]
        if todo:
            counted = self._count_frames(uri, todo)
            parts.append(counted)
            for subject, rows in counted.groupby("subject_id"):
                if subject not in spanning and subject in files.index:
                    _SCANNED[(uri, subject)] = (files[subject], rows)
        return pd.concat(parts, ignore_index=True)

    def _count_frames(self, uri: str, subjects: list[str] | None) -> pd.DataFrame:
        """Frames per subject and group counted by a scan (``subjects``' files, else all)."""
        sql = ("SELECT subject_id, label_source, label_round, count(*) AS frames FROM t "
               "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")
        if subjects is None:
            return self._query(uri, sql)
        found = self._query(uri, sql, files_of={"subject_id": subjects})
        return found[found["subject_id"].isin(subjects)]

    def recording_frames(self, subject: str, recording: str, group: Group) -> Any:
        """One recording's label rows of a group, frames in order (a
        :class:`stages.metrics.RecordingLabels` plus ``confidence``), or None."""
        from stages.metrics import recordings_from_label_table
        from storage.label_table import LabelTable

        table = LabelTable(self.sources.labels_uri, self.sources.storage_options)
        if not table.exists():
            return None
        rows = table.read(subject_id=subject, recording_id=recording, label_source=group[0], label_round=group[1])
        if rows.num_rows == 0:
            return None
        rows = rows.sort_by("frame_index")
        (labels,) = recordings_from_label_table(rows)
        conf = rows.column("confidence").to_numpy(zero_copy_only=False)
        return FrameData(labels, conf.astype(float))

    # --- runs -------------------------------------------------------------------------

    def failures(self) -> pd.DataFrame:
        """The failure table: run, subject, stage, error type, message, time (newest first)."""
        sql = "SELECT run_id, subject, stage, error_type, message, time FROM t ORDER BY time DESC"
        return self._query(self.sources.table("failures"), sql)

    def coverage(self) -> pd.DataFrame:
        """Units of the latest run per stage and state (done, failed, skipped, pending):
        rows (stage, state, subjects); empty without a run."""
        from pipeline.status import status

        report = status(self.sources.out, storage_options=dict(self.sources.storage_options or {}),
                        rejections=False)
        rows = [(st, state, n) for st, counts in report.counts().items() for state, n in counts.items()]
        return pd.DataFrame(rows, columns=["stage", "state", "subjects"])

    def capture_path(self, subject: str) -> str | None:
        """The subject's capture folder: under ``captures``, else from the run records."""
        from pathlib import Path

        if self.sources.captures:
            path = Path(self.sources.captures) / subject
            return str(path) if path.is_dir() else None
        from pipeline.status import latest_run

        record = latest_run(self.sources.out, dict(self.sources.storage_options or {})) or {}
        return (record.get("subjects") or {}).get(subject)


@dataclass(frozen=True)
class FrameData:
    """One recording's labels for the recording view.

    Attributes:
        labels: the rows as arrays (stages.metrics.RecordingLabels; b is (T, K)).
        confidence: (T,) per-frame confidence (NaN where none).
    """

    labels: Any
    confidence: Any
