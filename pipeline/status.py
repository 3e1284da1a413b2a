"""``pgt status OUT``: done, failed, skipped and pending work of the latest run, from storage.

The latest run is the one with the newest ``started`` in ``runs/*/run.json``. Its
``plan.json`` gives each planned unit's key; a committed artifact makes a unit ``done``
whatever the run's fate, a ``fail`` event in the stage log (or the final plan) makes it
``failed``, and everything else of the run's subjects x stages is ``pending`` (e.g. work
a crashed run never reached). Captures refused before any stage (unsafe or duplicate
subject ids, unusable folders) count as ``failed`` units of the stage ``capture``, so the
failed units agree with the run's rows in the failures table.

Stages also record what they left out *inside* a unit that succeeded: a frame without a
face, an expression whose burst could not be fused. By convention such a stage returns a
``rows`` table with a ``status`` column (``"rejected"`` marks a left-out record) and a
``reason`` column; ``status`` reads that one part of each done unit (never the arrays beside
it) and reports the rejected records per stage (:attr:`StatusReport.rejections`).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.artifacts import ArtifactStore, filesystem
from pipeline.errors import StorageError
from pipeline.runlog import OutputLayout, read_json, read_stage_log

STATES = ("done", "failed", "skipped", "pending")
#: Columns that say which record of a unit a rejection is about, when a rows table has them.
RECORD_COLUMNS = ("expression", "recording", "frame_index", "camera")
#: How much of the rejected records ``status`` reads and prints.
RejectionDetail = Literal["none", "summary", "all"]


@dataclass(frozen=True)
class UnitStatus:
    """State of one unit in the latest run."""

    stage: str
    subject: str | None
    state: str
    key: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class Rejection:
    """A record a done unit left out (a row of its ``rows`` table with status ``rejected``).

    Attributes:
        stage: the stage.
        subject: the subject.
        record: which record, e.g. ``{"expression": "smile", "frame_index": 2}``.
        reason: why, as the stage wrote it.
    """

    stage: str
    subject: str | None
    record: dict[str, Any]
    reason: str
    code: str = ""
    """The stage's short code of the kind of rejection, when its rows have a ``code`` column."""

    def kind(self) -> str:
        """What the summary groups by: the code, else the reason's leading clause."""
        return self.code or _reason_kind(self.reason)

    def where(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.record.items())


@dataclass(frozen=True)
class StatusReport:
    """Summary of an output folder.

    Attributes:
        out: the output root.
        run_id: latest run, or ``None`` when no run exists.
        run_status: ``running`` (or crashed) / ``finished``.
        units: every unit of the latest run.
        rejections: the records done units left out (empty unless asked for).
        records: stage -> number of records in the done units' ``rows`` tables (the
            denominators of the rejection counts; only stages whose rows have ``status``).
    """

    out: str
    run_id: str | None
    run_status: str
    units: tuple[UnitStatus, ...] = ()
    rejections: tuple[Rejection, ...] = ()
    records: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        """stage -> state -> number of units."""
        out: dict[str, Counter[str]] = {}
        for u in self.units:
            out.setdefault(u.stage, Counter())[u.state] += 1
        return {st: {s: c.get(s, 0) for s in STATES} for st, c in out.items()}

    def by_subject(self) -> dict[str | None, dict[str, str]]:
        """subject -> stage -> state (``None`` holds dataset stages)."""
        out: dict[str | None, dict[str, str]] = {}
        for u in self.units:
            out.setdefault(u.subject, {})[u.stage] = u.state
        return out

    def to_text(self, detail: RejectionDetail = "summary") -> str:
        """A markdown summary: counts per stage, every failed unit, then the rejected
        records: per stage and reason when ``detail`` is ``"summary"``, one line each
        when ``"all"``."""
        if self.run_id is None:
            return f"{self.out}: no runs"
        lines = [f"run {self.run_id} ({self.run_status})", "",
                 "| stage | " + " | ".join(STATES) + " |",
                 "|---|" + "---:|" * len(STATES)]
        for stage, c in self.counts().items():
            lines.append(f"| {stage} | " + " | ".join(str(c[s]) for s in STATES) + " |")
        bad = [u for u in self.units if u.state == "failed"]
        if bad:
            lines += ["", "failed:"]
            lines += [f"- {u.stage} / {u.subject or 'dataset'}: {u.reason}" for u in bad]
        if detail != "none" and self.records:
            lines += ["", "rejected records (inside done units):", "",
                      "| stage | records | rejected | most common reasons |", "|---|---:|---:|---|"]
            for stage, n in self.records.items():
                mine = [r for r in self.rejections if r.stage == stage]
                common = Counter(r.kind() for r in mine).most_common(3)
                text = "; ".join(f"{why} ({c})" for why, c in common)
                lines.append(f"| {stage} | {n} | {len(mine)} | {text} |")
            if detail == "all" and self.rejections:
                lines += ["", "rejected:"]
                lines += [f"- {r.stage} / {r.subject or 'dataset'} / {r.where()}: {r.reason}"
                          for r in self.rejections]
        return "\n".join(lines)


def _column(table: Any, name: str) -> list:
    """A column's values, or empty strings when the table has no such column."""
    return table.column(name).to_pylist() if name in table.column_names else [""] * table.num_rows


def _reason_kind(reason: str) -> str:
    """The reason's leading clause (before any measured values), for grouping."""
    return reason.split(":", 1)[0].strip()[:80] or "(no reason)"


def latest_run(out: str, storage_options: dict[str, Any] | None = None
               ) -> dict[str, Any] | None:
    """The newest run record under ``out``, or ``None``."""
    fs, runs = filesystem(OutputLayout(out).runs, storage_options)
    fs.invalidate_cache(runs)  # other processes write runs: no stale cached listing
    try:
        dirs = fs.ls(runs, detail=False)
    except FileNotFoundError:
        return None
    best: dict[str, Any] | None = None
    for d in dirs:  # listed paths lack the protocol: read them through ``fs`` itself
        try:
            rec = json.loads(fs.cat_file(f"{d}/run.json"))
        except (FileNotFoundError, ValueError):
            continue
        if best is None or (rec["started"], rec["run_id"]) > (best["started"], best["run_id"]):
            best = rec
    return best


def _rejections(store: ArtifactStore, units: list[UnitStatus]
                ) -> tuple[list[Rejection], dict[str, int]]:
    """The rejected rows of every done unit that has a ``rows`` table."""
    import pyarrow.parquet as pq

    found: list[Rejection] = []
    records: dict[str, int] = {}
    for u in units:
        if u.state != "done" or u.key is None:
            continue
        _, data = store.load_part(u.stage, u.key, "table.rows.parquet")
        if data is None:
            continue
        table = pq.read_table(io.BytesIO(data))
        if "status" not in table.column_names:
            continue  # rows that are not records of kept and rejected work
        records[u.stage] = records.get(u.stage, 0) + table.num_rows
        cols = [c for c in RECORD_COLUMNS if c in table.column_names]
        reasons, codes = (_column(table, name) for name in ("reason", "code"))
        listed = {c: table.column(c).to_pylist() for c in cols}
        for i, state in enumerate(table.column("status").to_pylist()):
            if state == "rejected":
                found.append(Rejection(u.stage, u.subject, {c: listed[c][i] for c in cols},
                                       str(reasons[i] or ""), str(codes[i] or "")))
    return found, records


def status(out: str, *, storage_options: dict[str, Any] | None = None,
           rejections: bool = True) -> StatusReport:
    """Summarises the latest run's work per subject and stage from storage alone.

    Args:
        out: the output root.
        storage_options: fsspec options of an object store.
        rejections: also read each done unit's ``rows`` table (one small part per
            unit) for the records it left out.
    """
    out = str(out)
    rec = latest_run(out, storage_options)
    if rec is None:
        return StatusReport(out=out, run_id=None, run_status="none")
    layout = OutputLayout(out)
    run_id = rec["run_id"]
    store = ArtifactStore(layout.artifacts, storage_options)
    try:
        plan = read_json(f"{layout.run_dir(run_id)}/plan.json", storage_options)
    except (FileNotFoundError, StorageError, ValueError):
        plan = []
    fails = {e["key"]: f"{e.get('error_type')}: {e.get('message')}"
             for e in read_stage_log(out, run_id, storage_options) if e["event"] == "fail"}
    planned = {(p["stage"], p["subject"]): p for p in plan}
    units: list[UnitStatus] = []
    subjects = sorted(rec.get("subjects") or {})
    for st in rec["chain"]:
        for subject in (subjects if st["scope"] == "subject" else [None]):
            p = planned.get((st["name"], subject))
            key = p["key"] if p else None
            if key and store.is_committed(st["name"], key):
                state, reason = "done", ""
            elif p and p["state"] in ("failed", "skipped"):
                state, reason = p["state"], p["reason"]
            elif key and key in fails:
                state, reason = "failed", fails[key]
            else:
                state, reason = "pending", ""
            units.append(UnitStatus(st["name"], subject, state, key, reason))
    # Captures refused before any stage ran: one failure row each in the failures table.
    for f in rec.get("capture_failures") or []:
        units.append(UnitStatus("capture", f["subject"], "failed", None,
                                f"{f['error_type']}: {f['message']}"))
    found, records = _rejections(store, units) if rejections else ([], {})
    return StatusReport(out=out, run_id=run_id, run_status=rec.get("status", "running"),
                        units=tuple(units), rejections=tuple(found), records=records)
