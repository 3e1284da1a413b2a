"""A backfill through separately started ``dask scheduler`` and ``dask worker`` processes
(docs/scaling.md, "An existing scheduler") gives the same tables as the embedded run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.artifacts import ArtifactStore
from pipeline.runlog import read_stage_log
from storage import delta
from tests.cli_runner import QUICK_RUN
from tests.cli_runner import run_pgt as _pgt
from workflows.chain import STAGES

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[1]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """``python -m dask ARGS`` in its own process group, importing this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "dask", *args], cwd=log.parent, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """Ends the process and its children (the worker's nanny starts the worker process)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):  # whatever of the group is left
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """``(address, worker process)`` of a scheduler and one single-threaded worker, on
    127.0.0.1, started like on a cluster's head and compute nodes."""
    from distributed import Client

    folder = tmp_path_factory.mktemp("dask-cluster")
    info = folder / "scheduler.json"
    procs = [_start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                     "--scheduler-file", str(info)], folder / "scheduler.log")]
    try:
        deadline = time.monotonic() + 120
        while not info.is_file() and time.monotonic() < deadline:
            assert procs[0].poll() is None, (folder / "scheduler.log").read_text()[-2000:]
            time.sleep(0.2)
        address = json.loads(info.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        procs.append(_start(["worker", address, "--host", "127.0.0.1", "--nworkers", "1",
                             "--nthreads", "1", "--no-dashboard", "--local-directory",
                             str(folder)], folder / "worker.log"))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
        yield address, procs[1]
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _rows(table_uri: str) -> list[dict]:
    """The table's rows without run-specific columns (run ids, times), in a fixed order."""
    table = delta.read_rows(table_uri)
    keep = [c for c in table.column_names if c != "run_id" and not c.endswith(("_at", "time"))]
    return sorted(table.select(keep).to_pylist(), key=repr)


def test_backfill_through_a_separate_scheduler_matches_the_embedded_run(scheduler, tiny_root,
                                                                         tmp_path):
    address, worker = scheduler
    captures = str(tiny_root / "captures")
    remote, embedded = tmp_path / "remote", tmp_path / "embedded"
    text = _pgt("backfill", captures, "--out", str(remote), "--scheduler", address, "--quiet", *QUICK_RUN)
    assert f"done {len(STAGES)}, failed 0" in text, text
    _pgt("backfill", captures, "--out", str(embedded), "--workers", "1", "--quiet", *QUICK_RUN)

    # the work ran in the separately started worker (a child of its nanny), not here
    worker_pids = {p.pid for p in psutil.Process(worker.pid).children(recursive=True)}
    ran = {e["pid"] for e in read_stage_log(str(remote)) if e.get("stage") == "landmarks"}
    assert ran and ran <= worker_pids, (ran, worker_pids)

    assert sorted(ArtifactStore(f"{remote}/artifacts").committed()) == \
        sorted(ArtifactStore(f"{embedded}/artifacts").committed())
    landmarks = _rows(f"{remote}/tables/landmarks")
    assert landmarks and landmarks == _rows(f"{embedded}/tables/landmarks")
