"""``pgt status OUT``: done, failed, skipped and pending work of the latest run, from storage.

The latest run is the one with the newest ``started`` in ``runs/*/run.json``. Its
``plan.json`` gives each planned unit's key; a committed artifact makes a unit ``done``
whatever the run's fate, a ``fail`` event in the stage log (or the final plan) makes it
``failed``, and everything else of the run's subjects x stages is ``pending`` (e.g. work
a crashed run never reached). Captures refused before any stage (unsafe or duplicate
subject ids, unusable folders) count as ``failed`` units of the stage ``capture``, so the
failed units agree with the run's rows in the failures table.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pipeline.artifacts import ArtifactStore, filesystem
from pipeline.errors import StorageError
from pipeline.runlog import OutputLayout, read_json, read_stage_log

STATES = ("done", "failed", "skipped", "pending")


@dataclass(frozen=True)
class UnitStatus:
    """State of one unit in the latest run."""

    stage: str
    subject: str | None
    state: str
    key: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class StatusReport:
    """Summary of an output folder.

    Attributes:
        out: the output root.
        run_id: latest run, or ``None`` when no run exists.
        run_status: ``running`` (or crashed) / ``finished``.
        units: every unit of the latest run.
    """

    out: str
    run_id: str | None
    run_status: str
    units: tuple[UnitStatus, ...] = ()

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

    def to_text(self) -> str:
        """A markdown summary: counts per stage, then every failed unit."""
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
        return "\n".join(lines)


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


def status(out: str, *, storage_options: dict[str, Any] | None = None) -> StatusReport:
    """Summarises the latest run's work per subject and stage from storage alone."""
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
    return StatusReport(out=out, run_id=run_id, run_status=rec.get("status", "running"),
                        units=tuple(units))
