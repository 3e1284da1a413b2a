"""Output layout and the append-only stage execution log.

``OUT/`` (a local folder or fsspec URL)::

    artifacts/<stage>/<key>/...          committed artifacts (pipeline.artifacts)
    tables/failures, tables/runs, ...    Delta tables (storage.delta)
    runs/<run_id>/run.json               run record (rewritten at the end of the run)
    runs/<run_id>/plan.json              planned units with keys and final states
    runs/<run_id>/stage-log.jsonl        one JSON line per execution event
    runs/<run_id>/dask-report.html       Dask performance report

The stage log is written by the workers themselves (so a killed driver cannot lose
what a worker did): on a local filesystem each event is a single ``O_APPEND`` write of
one line, which POSIX keeps whole between concurrent writers; on object stores, which
cannot append, each event is its own object under ``stage-log.d/``.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pipeline.artifacts import atomic_write, filesystem, is_local

LOG_NAME = "stage-log.jsonl"
LOG_DIR = "stage-log.d"
_MAX_TEXT = 2000


@dataclass(frozen=True)
class OutputLayout:
    """Where a run's outputs live.

    Attributes:
        out: the output root (folder or URL).
        tables_uri: Delta tables root; defaults to ``<out>/tables``.
    """

    out: str
    tables_uri: str | None = None

    @property
    def artifacts(self) -> str:
        """Artifact store root."""
        return f"{self.out.rstrip('/')}/artifacts"

    @property
    def tables(self) -> str:
        """Delta tables root (absolute path when local)."""
        if self.tables_uri:
            return self.tables_uri.rstrip("/")
        fs, path = filesystem(f"{self.out.rstrip('/')}/tables")
        return path if is_local(fs) else f"{self.out.rstrip('/')}/tables"

    def table(self, name: str) -> str:
        """URI of one Delta table."""
        return f"{self.tables}/{name}"

    @property
    def runs(self) -> str:
        """Folder of run records."""
        return f"{self.out.rstrip('/')}/runs"

    def run_dir(self, run_id: str) -> str:
        """Folder of one run's record, plan, log and report."""
        return f"{self.runs}/{run_id}"


def _short(text: Any) -> Any:
    return text[:_MAX_TEXT] if isinstance(text, str) else text


class StageLog:
    """Appends execution events of one run.

    Args:
        run_dir: the run's folder (URL or path).
        storage_options: fsspec options.
    """

    def __init__(self, run_dir: str, storage_options: dict[str, Any] | None = None) -> None:
        self.run_dir = run_dir
        self.storage_options = dict(storage_options or {})
        self._fs, self._path = filesystem(run_dir, storage_options)
        self._made = False

    def __getstate__(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["run_dir"], state["storage_options"])

    def append(self, event: str, **fields: Any) -> None:
        """Writes one event line with time, pid and host added."""
        record = {"event": event, "time": time.time(), "pid": os.getpid(),
                  "host": socket.gethostname(), **{k: _short(v) for k, v in fields.items()}}
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        if is_local(self._fs):
            if not self._made:
                os.makedirs(self._path, exist_ok=True)
                self._made = True
            fd = os.open(f"{self._path}/{LOG_NAME}", os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                         0o644)
            try:
                os.write(fd, line)  # one write(2) per line: whole under O_APPEND
            finally:
                os.close(fd)
        else:
            name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
            self._fs.pipe_file(f"{self._path}/{LOG_DIR}/{name}", line)


def read_stage_log(out: str, run_id: str | None = None,
                   storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every logged event of one run (or of all runs), ordered by time.

    A torn last line (the writer was killed mid-write) is ignored.
    """
    layout = OutputLayout(out)
    fs, runs = filesystem(layout.runs, storage_options)
    fs.invalidate_cache(runs)  # other processes add runs and events: no stale listing
    try:
        run_dirs = [f"{runs}/{run_id}"] if run_id else fs.ls(runs, detail=False)
    except FileNotFoundError:
        return []
    events: list[dict[str, Any]] = []
    for d in run_dirs:
        chunks: list[bytes] = []
        if fs.exists(f"{d}/{LOG_NAME}"):
            chunks.append(fs.cat_file(f"{d}/{LOG_NAME}"))
        fs.invalidate_cache(f"{d}/{LOG_DIR}")
        if fs.exists(f"{d}/{LOG_DIR}"):
            chunks.extend(fs.cat_file(p) for p in sorted(fs.ls(f"{d}/{LOG_DIR}", detail=False)))
        for chunk in chunks:
            for line in chunk.decode().splitlines():
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
    events.sort(key=lambda e: e.get("time", 0.0))
    return events


def write_json(url: str, value: Any, storage_options: dict[str, Any] | None = None) -> None:
    """Atomically writes a JSON document (temporary name + rename)."""
    fs, path = filesystem(url, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    atomic_write(fs, path, json.dumps(value, indent=1, sort_keys=True, default=str).encode())


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """Reads a JSON document written by :func:`write_json`."""
    fs, path = filesystem(url, storage_options)
    return json.loads(fs.cat_file(path))
