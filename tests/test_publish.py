"""Published tables hold what the run says they hold (issue 6, item 1), and failure rows
survive a driver crash (item 2).

Uses the light DAG test chain of ``tests/dag_stages.py``: stage ``b`` publishes its rows
to the table ``records``, whose values are ``data + offset``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, LocalCluster

from pipeline.artifacts import PAUSE_ENV, PAUSE_FLAG_ENV
from pipeline.dag import RunSummary, run_chain
from pipeline.errors import StorageError
from pipeline.records import KEY_COLUMN, STAGE_COLUMN, VERSION_COLUMN
from storage import delta
from tests.dag_stages import BConfig, DagTestConfig, build_chain, make_captures

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]
A, B = DagTestConfig(), DagTestConfig(b=BConfig(offset=100))


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as cl:
        yield cl


def _run(caps: list[Path], out: Path, client: Client, cfg: DagTestConfig = A,
         **kw: Any) -> RunSummary:
    return run_chain(caps, str(out), cfg, chain=build_chain(), client=client, progress=False,
                     report=False, **kw)


def _rows(table: Path | str) -> list[dict]:
    return sorted(delta.read_rows(str(table)).to_pylist(),
                  key=lambda r: (r["subject_id"], r["index"]))


def _expected(caps: list[Path], s: RunSummary, offset: int) -> list[dict]:
    """The rows run ``s`` planned: data + offset, with b's key and version."""
    out = []
    for i, cap in enumerate(caps):
        key = s.keys[("b", cap.name)]
        out += [{"subject_id": cap.name, "index": k, "value": float(i * 10 + k + offset),
                 STAGE_COLUMN: "b", VERSION_COLUMN: "1", KEY_COLUMN: key} for k in range(5)]
    return out


def _writes(table: Path) -> int:
    """Data-changing commits of a table (compaction commits left out)."""
    return sum(1 for h in delta.history(str(table)) if h.get("operation") != "OPTIMIZE")


def test_config_a_b_a_leaves_a_rows(tmp_path: Path, client: Client) -> None:
    caps = make_captures(tmp_path / "caps", 3)
    out, table = tmp_path / "out", tmp_path / "out" / "tables" / "records"
    first = _run(caps, out, client, A)
    assert _rows(table) == _expected(caps, first, 0)
    second = _run(caps, out, client, B)
    assert _rows(table) == _expected(caps, second, 100)
    writes = _writes(table)
    third = _run(caps, out, client, A)
    assert third.ok and third.counts["done"] == 0  # every artifact is cached...
    assert _rows(table) == _expected(caps, first, 0)  # ...and the table holds A again
    assert _writes(table) == writes + 1  # three subjects republished in ONE commit
    fourth = _run(caps, out, client, A)  # nothing to republish: no commit at all
    assert fourth.counts["cached"] == 10 and _writes(table) == writes + 1


def test_new_tables_location_or_deleted_table_is_rewritten(tmp_path: Path, client: Client) -> None:
    caps = make_captures(tmp_path / "caps", 2)
    out = tmp_path / "out"
    first = _run(caps, out, client)
    elsewhere = tmp_path / "elsewhere"
    moved = _run(caps, out, client, tables_uri=str(elsewhere))
    assert moved.counts["done"] == 0
    assert _rows(elsewhere / "records") == _expected(caps, first, 0)
    shutil.rmtree(out / "tables" / "records")
    again = _run(caps, out, client)
    assert again.counts["done"] == 0
    assert _rows(out / "tables" / "records") == _expected(caps, first, 0)


def test_rows_of_a_subject_that_now_fails_are_retracted(tmp_path: Path, client: Client) -> None:
    caps = make_captures(tmp_path / "caps", 3)
    out, table = tmp_path / "out", tmp_path / "out" / "tables" / "records"
    first = _run(caps, out, client)
    before = delta.table_version(str(table))
    (caps[1] / "FAIL").write_text("")  # the capture changed, and stage a now fails on it
    s = _run(caps, out, client, retries=0)
    assert s.states[("a", "subj001")] == "failed" and s.states[("b", "subj001")] == "skipped"
    expect = [r for r in _expected(caps, first, 0) if r["subject_id"] != "subj001"]
    assert _rows(table) == expect  # subj001's old rows no longer stand in as current
    old = delta.read_rows(str(table), version=before, filters={"subject_id": "subj001"})
    assert old.num_rows == 5  # still readable by time travel
    (caps[1] / "FAIL").unlink()
    s = _run(caps, out, client)
    assert _rows(table) == _expected(caps, s, 0)
    manifest = caps[2] / "capture.json"  # unreadable before any stage: an unsafe id
    manifest.write_text(manifest.read_text().replace('"subj002"', '"../subj002"'))
    s = _run(caps, out, client)
    assert [(f.subject, f.stage) for f in s.failures] == [("subj002", "capture")]
    assert {r["subject_id"] for r in _rows(table)} == {"subj000", "subj001"}


def test_a_table_without_provenance_columns_is_refused_before_running(tmp_path: Path,
                                                                     client: Client) -> None:
    caps = make_captures(tmp_path / "caps", 1)
    import pyarrow as pa

    delta.append_rows(str(tmp_path / "out" / "tables" / "records"),
                      pa.table({"subject_id": ["subj000"], "index": pa.array([0], pa.int32()),
                                "value": [0.0]}))
    with pytest.raises(StorageError, match="provenance columns"):
        _run(caps, tmp_path / "out", client)
    assert not (tmp_path / "out" / "artifacts").exists()


def test_failure_rows_survive_a_driver_crash(tmp_path: Path) -> None:
    caps = make_captures(tmp_path / "caps", 2, fail=(0,))
    out, flag = tmp_path / "out", tmp_path / "flag"
    env = {**os.environ, "PYTHONPATH": str(REPO), PAUSE_ENV: "marker:c",
           PAUSE_FLAG_ENV: str(flag)}
    cmd = [sys.executable, "-m", "tests.dag_runner", str(out), *map(str, caps)]
    with open(tmp_path / "run.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log,
                                start_new_session=True)
        try:  # c runs after subj000's failure resolved; kill the driver while it waits
            t0 = time.monotonic()
            while not flag.exists():
                assert proc.poll() is None and time.monotonic() - t0 < 120, \
                    (tmp_path / "run.log").read_text()[-2000:]
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    rows = delta.read_rows(str(out / "tables" / "failures")).to_pylist()
    assert [(r["subject"], r["stage"], r["error_type"]) for r in rows] == \
        [("subj000", "a", "ValueError")]
    assert not delta.exists(str(out / "tables" / "runs"))  # the run never finished
