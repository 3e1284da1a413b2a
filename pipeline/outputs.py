"""Reading what runs left in an output root: the artifact of a stage for a subject.

A run's ``plan.json`` lists its units with their artifact keys and final states. The
newest run that finished a ``(stage, subject)`` unit (done, or cached from an earlier
run) names the artifact a later job should read, e.g. ``pgt metrics --run OUT`` taking
each subject's personal rig from the run that labelled it.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.artifacts import ArtifactStore, filesystem
from pipeline.errors import StorageError
from pipeline.runlog import OutputLayout, read_stage_log

FINISHED_STATES = ("done", "cached")


def finished_units(out: str, run_id: str | None = None, storage_options: dict[str, Any] | None = None
                   ) -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    """The finished units of an output root and the subjects' capture paths.

    Runs are read newest first (run ids sort by time) and the newest run that finished a
    unit wins. A unit is finished when the run's plan says done or cached, or, for a run
    killed before it wrote its final plan, when its stage log records the commit. With
    ``run_id`` only that run is read.

    Returns:
        ``(stage, subject) -> artifact key``, and ``subject -> capture path`` as the newest
        run that names the subject recorded it.

    Raises:
        StorageError: when the output root has no runs, or the given run does not exist.
    """
    layout = OutputLayout(out)
    fs, runs = filesystem(layout.runs, storage_options)
    fs.invalidate_cache(runs)
    if run_id:
        run_dirs = [f"{runs}/{run_id}"]
        if not fs.exists(run_dirs[0]):
            raise StorageError(f"{out}: no run {run_id} (looked for {run_dirs[0]})")
    else:
        try:
            run_dirs = sorted(fs.ls(runs, detail=False), reverse=True)
        except FileNotFoundError:
            raise StorageError(f"{out}: not an output root of pgt label/backfill (no runs/ folder)") from None
    keys: dict[tuple[str, str], str] = {}
    captures: dict[str, str] = {}
    for run_dir in run_dirs:
        found: dict[tuple[str, str], str] = {}
        record = json.loads(fs.cat_file(f"{run_dir}/run.json")) if fs.exists(f"{run_dir}/run.json") else {}
        if fs.exists(f"{run_dir}/plan.json"):  # final states once the run has finished
            for unit in json.loads(fs.cat_file(f"{run_dir}/plan.json")):
                if unit.get("state") in FINISHED_STATES and unit.get("key"):
                    found[(unit["stage"], unit["subject"])] = unit["key"]
        if record.get("status") != "finished":  # killed: its plan still says planned; the
            # workers' own log says what it committed before it died
            for event in read_stage_log(out, run_dir.rstrip("/").rsplit("/", 1)[-1], storage_options):
                if event.get("event") == "finish" and event.get("committed") and event.get("key"):
                    found.setdefault((event["stage"], event["subject"]), event["key"])
        for unit, key in found.items():
            keys.setdefault(unit, key)
        for subject, capture in record.get("subjects", {}).items():
            captures.setdefault(subject, capture)
    return keys, captures


class RunOutputs:
    """The finished artifacts of an output root, loaded on demand.

    Args:
        out: output root of ``pgt label`` / ``pgt backfill`` (folder or URL).
        run_id: read only this run (default: the newest run that finished each unit).
        storage_options: fsspec options of ``out``.
    """

    def __init__(self, out: str, run_id: str | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.out = out
        self.keys, self.captures = finished_units(out, run_id, storage_options)
        self.store = ArtifactStore(OutputLayout(out).artifacts, storage_options)

    def subjects(self, stage: str) -> list[str]:
        """Subjects with a finished unit of ``stage``, sorted."""
        return sorted(s for (st, s) in self.keys if st == stage)

    def has(self, stage: str, subject: str) -> bool:
        """True when a run finished ``stage`` for ``subject``."""
        return (stage, subject) in self.keys

    def load(self, stage: str, subject: str) -> Any:
        """The committed artifact of ``(stage, subject)``.

        Raises:
            StorageError: naming the output root, stage and subject when no run finished it.
        """
        key = self.keys.get((stage, subject))
        if key is None:
            done = ", ".join(self.subjects(stage)) or "none"
            raise StorageError(f"{self.out}: no finished {stage} unit for subject {subject} "
                               f"(subjects with one: {done})")
        return self.store.load(stage, key)
