"""Orchestration backbone: keys, caching, invalidation, failures, retries, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from distributed import Client, LocalCluster

from pipeline.artifacts import PAUSE_ENV, PAUSE_FLAG_ENV, ArtifactStore
from pipeline.cluster import gpu_resources
from pipeline.dag import RunSummary, run_chain
from pipeline.errors import ConfigError, StageError, StorageError
from pipeline.runlog import OutputLayout, read_json, read_stage_log
from pipeline.serialize import StageOutput
from pipeline.stage import Chain, Stage, StageConfig, content_key
from pipeline.status import status
from storage import delta
from tests.dag_stages import AConfig, BConfig, DagTestConfig, build_chain, make_captures

pytestmark = pytest.mark.timeout(300)  # a scheduling bug must fail, not hang the suite

REPO = Path(__file__).resolve().parents[1]
N_UNITS_PER_SUBJECT = 3  # a, b, d (+ one dataset unit c)


@pytest.fixture(scope="module")
def client():
    """One small threaded cluster shared by the module (fast; keys carry the output tag)."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as cl:
        yield cl


def _run(caps: list[Path], out: Path | str, client: Client, cfg: DagTestConfig | None = None,
         chain: Chain | None = None, **kw: Any) -> RunSummary:
    kw.setdefault("report", False)
    return run_chain(caps, str(out), cfg or DagTestConfig(), chain=chain or build_chain(),
                     client=client, progress=False, **kw)


def _starts(out: Path | str, run_id: str) -> Counter[str]:
    return Counter(e["stage"] for e in read_stage_log(str(out), run_id) if e["event"] == "start")


def _records(out: Path) -> list[dict]:
    rows = delta.read_rows(OutputLayout(str(out)).table("records")).to_pylist()
    return sorted(rows, key=lambda r: (r["subject_id"], r["index"]))


def _canon(value: Any) -> Any:
    if isinstance(value, pa.Table):
        return value.to_pylist()
    if isinstance(value, StageOutput):
        return {"arrays": _canon(dict(value.arrays)), "meta": value.meta,
                "tables": {k: t.to_pylist() for k, t in value.tables.items()}}
    if isinstance(value, dict):
        return {k: _canon(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return (str(value.dtype), value.tolist())
    return value


def _artifacts(out: Path | str) -> dict[tuple[str, str], Any]:
    store = ArtifactStore(f"{out}/artifacts")
    return {(st, key): _canon(store.load(st, key)) for st, key in store.committed()}


# -- contract ----------------------------------------------------------------------------
def test_stage_contract_validation() -> None:
    with pytest.raises(ConfigError):
        Chain((Stage(name="b", version="1", fn=len, inputs=("a",)),))
    with pytest.raises(ConfigError):
        Stage(name="Bad Name", version="1", fn=len)
    view = StageConfig({"a.scale": 2.0})
    assert view["a.scale"] == 2.0
    with pytest.raises(KeyError, match="not declared"):
        view["b.offset"]


def test_artifact_roundtrip_and_commit_protocol(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "art"))
    values = [None, {"v": np.arange(3.0)}, pa.table({"x": [1, 2]}), {"k": [1, "two"]},
              StageOutput(arrays={"a": np.eye(2)}, meta={"m": 1},
                          tables={"t": pa.table({"y": [3]})})]
    for i, v in enumerate(values):
        store.commit("s", f"k{i}", v, {"note": i})
        assert _canon(store.load("s", f"k{i}")) == _canon(v)
    # parts without a marker do not count
    (tmp_path / "art" / "s" / "half").mkdir()
    (tmp_path / "art" / "s" / "half" / "arrays.npz").write_bytes(b"junk")
    assert not store.is_committed("s", "half")
    assert ("s", "half") not in set(store.committed())
    # corruption is detected; object arrays are refused (no pickle)
    parts = tmp_path / "art" / "s" / "k1" / store.marker("s", "k1")["dir"]
    (parts / "arrays.npz").write_bytes(b"junk")
    with pytest.raises(StorageError, match="corrupt"):
        store.load("s", "k1")
    with pytest.raises(StageError):
        store.commit("s", "obj", {"o": np.array([object()])}, {})


# -- keys and caching ----------------------------------------------------------------------
def test_keys_are_deterministic(tmp_path: Path, client: Client) -> None:
    caps = make_captures(tmp_path / "caps", 2)
    s1 = _run(caps, tmp_path / "o1", client)
    s2 = _run(caps, tmp_path / "o2", client)
    assert s1.keys == s2.keys and len(s1.keys) == 2 * N_UNITS_PER_SUBJECT + 1
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in s1.keys.values())
    s3 = _run(caps, tmp_path / "o3", client, chain=build_chain(b_version="2"))
    changed = {uid[0] for uid in s1.keys if s1.keys[uid] != s3.keys[uid]}
    assert changed == {"b", "c", "d"}  # a version bump invalidates b and what depends on it
    st = build_chain()["a"]
    assert content_key(st, {"a.scale": 1.0}, {"capture": "fp"}, "s") == \
        content_key(st, {"a.scale": 1.0}, {"capture": "fp"}, "s")
    assert content_key(st, {"a.scale": 1.0}, {"capture": "fp"}, "s") != \
        content_key(st, {"a.scale": 1.5}, {"capture": "fp"}, "s")


def test_rerun_is_a_full_cache_hit(tmp_path: Path, client: Client) -> None:
    caps = make_captures(tmp_path / "caps", 3)
    out = tmp_path / "out"
    first = _run(caps, out, client)
    assert first.counts == {"done": 10, "cached": 0, "failed": 0, "skipped": 0}
    records = _records(out)
    second = _run(caps, out, client)
    assert second.counts == {"done": 0, "cached": 10, "failed": 0, "skipped": 0}
    assert _starts(out, second.run_id) == Counter()
    assert _records(out) == records and len(records) == 15
    runs = delta.read_rows(OutputLayout(str(out)).table("runs"))
    assert sorted(runs.column("run_id").to_pylist()) == sorted([first.run_id, second.run_id])


def test_config_change_invalidates_only_dependents(tmp_path: Path, client: Client) -> None:
    caps = make_captures(tmp_path / "caps", 3)
    out = tmp_path / "out"
    _run(caps, out, client)
    s = _run(caps, out, client, cfg=DagTestConfig(b=BConfig(offset=1)))
    assert _starts(out, s.run_id) == Counter({"b": 3, "c": 1, "d": 3})
    assert {r["value"] for r in _records(out)} == {float(v) + 1 for v in range(25)
                                                   if v % 10 < 5}
    s = _run(caps, out, client, cfg=DagTestConfig(b=BConfig(offset=1), unused="changed"))
    assert _starts(out, s.run_id) == Counter()
    s = _run(caps, out, client, cfg=DagTestConfig(a=AConfig(scale=2.0), b=BConfig(offset=1)))
    assert _starts(out, s.run_id) == Counter({"a": 3, "b": 3, "c": 1, "d": 3})


# -- failures and retries ------------------------------------------------------------------
def test_failure_is_isolated(tmp_path: Path, client: Client) -> None:
    caps = make_captures(tmp_path / "caps", 3, fail=(1,))
    out = tmp_path / "out"
    s = _run(caps, out, client, retries=1)
    assert s.counts == {"done": 7, "cached": 0, "failed": 1, "skipped": 2}
    assert s.states[("b", "subj001")] == "skipped" and s.states[("d", "subj001")] == "skipped"
    fails = delta.read_rows(OutputLayout(str(out)).table("failures")).to_pylist()
    assert len(fails) == 1
    f = fails[0]
    assert (f["subject"], f["stage"], f["error_type"], f["run_id"], f["attempt"]) == \
        ("subj001", "a", "ValueError", s.run_id, 2)
    assert "injected failure in subj001" in f["message"]
    c = ArtifactStore(f"{out}/artifacts").load("c", s.keys[("c", None)])
    assert c["subjects"] == ["subj000", "subj002"]  # the barrier went on without subj001
    assert {r["subject_id"] for r in _records(out)} == {"subj000", "subj002"}
    rep = status(str(out))
    assert rep.by_subject()["subj001"] == {"a": "failed", "b": "skipped", "d": "skipped"}
    assert rep.counts()["a"] == {"done": 2, "failed": 1, "skipped": 0, "pending": 0}


def test_retry_after_one_failure(tmp_path: Path, client: Client) -> None:
    counter = tmp_path / "counter"
    caps = make_captures(tmp_path / "caps", 2, flaky={0: counter})
    out = tmp_path / "out"
    s = _run(caps, out, client, retries=1)
    assert s.ok and counter.read_text() == "2"
    key = s.keys[("a", "subj000")]
    events = [(e["event"], e["attempt"]) for e in read_stage_log(str(out), s.run_id)
              if e.get("key") == key]
    assert events == [("start", 1), ("fail", 1), ("start", 2), ("finish", 2)]
    counter.unlink()
    s0 = _run(caps, tmp_path / "out0", client, retries=0)
    assert [(f.stage, f.subject, f.error_type, f.attempt) for f in s0.failures] == \
        [("a", "subj000", "RuntimeError", 1)]


# -- stores, resources, records ----------------------------------------------------------
def test_memory_store(tmp_path: Path, client: Client) -> None:
    caps = make_captures(tmp_path / "caps", 2)
    out = f"memory://pgt-{uuid.uuid4().hex[:8]}"
    s1 = _run(caps, out, client, tables_uri=str(tmp_path / "tables"))
    assert s1.ok and len(list(ArtifactStore(f"{out}/artifacts").committed())) == 7
    assert Counter(e["event"] for e in read_stage_log(out, s1.run_id))["finish"] == 7
    s2 = _run(caps, out, client, tables_uri=str(tmp_path / "tables"))
    assert s2.counts["cached"] == 7 and _starts(out, s2.run_id) == Counter()


def test_gpu_stage_never_waits_for_a_missing_gpu(tmp_path: Path, client: Client) -> None:
    caps = make_captures(tmp_path / "caps", 2)
    assert gpu_resources(client) is None  # no worker offers a GPU: run on CPU workers
    assert _run(caps, tmp_path / "o1", client, chain=build_chain(gpu_b=True)).ok
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0",
                      resources={"GPU": 1}) as cluster, Client(cluster) as gpu_client:
        assert gpu_resources(gpu_client) == {"GPU": 1}
        assert _run(caps, tmp_path / "o2", gpu_client, chain=build_chain(gpu_b=True)).ok


def test_existing_scheduler_address(tmp_path: Path) -> None:
    caps = make_captures(tmp_path / "caps", 2)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster:
        s = run_chain(caps, str(tmp_path / "out"), DagTestConfig(), chain=build_chain(),
                      scheduler_address=cluster.scheduler_address, progress=False,
                      report=False)
    assert s.ok and s.counts["done"] == 7


def test_run_record_report_and_status(tmp_path: Path, client: Client) -> None:
    caps = make_captures(tmp_path / "caps", 2)
    out = tmp_path / "out"
    assert status(str(out)).run_id is None
    s = _run(caps, out, client, report=True)
    run_dir = Path(s.run_dir)
    assert (run_dir / "dask-report.html").stat().st_size > 1000
    rec = read_json(str(run_dir / "run.json"))
    assert rec["status"] == "finished" and rec["counts"]["done"] == 7
    assert {c["name"] for c in rec["chain"]} == {"a", "b", "c", "d"}
    assert rec["config"]["b"] == {"offset": 0}
    rep = status(str(out))
    assert rep.run_id == s.run_id and all(u.state == "done" for u in rep.units)
    assert "| a | 2 | 0 | 0 | 0 |" in rep.to_text()
    # d's rows: values 0..4 and 10..14, the odd ones rejected: 2 per subject, 10 records
    rejected = sorted((r.subject, r.record["frame_index"]) for r in rep.rejections)
    assert rejected == [("subj000", 1), ("subj000", 3), ("subj001", 1), ("subj001", 3)]
    assert {r.stage for r in rep.rejections} == {"d"} and rep.records == {"d": 10}
    assert "| d | 10 | 4 | odd (4) |" in rep.to_text()  # grouped by the rows' code
    assert "- d / subj000 / frame_index=3: odd value: 3 is not even" in rep.to_text("all")
    assert "rejected records" not in rep.to_text("none")
    assert status(str(out), rejections=False).rejections == ()


def test_embedded_process_cluster(tmp_path: Path) -> None:
    caps = make_captures(tmp_path / "caps", 2)
    s = run_chain(caps, str(tmp_path / "out"), DagTestConfig(), chain=build_chain(), workers=2,
                  progress=False, report=False)
    assert s.ok and s.counts["done"] == 7
    pids = {e["pid"] for e in read_stage_log(str(tmp_path / "out")) if e["event"] == "start"}
    assert os.getpid() not in pids


# -- crash safety -------------------------------------------------------------------------
def _wait_for(cond, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() - t0 < timeout, "kill point never reached"
        time.sleep(0.01)


def _finishes(out: Path) -> int:
    return sum(1 for e in read_stage_log(str(out)) if e["event"] == "finish")


KILL_POINTS = [
    # (name, finish lines to wait for or None, pause point or None, worker processes)
    ("after-1-finish", 1, None, False),
    ("after-4-finishes-processes", 4, None, True),
    ("mid-staging-write-b", None, "staging:b", False),
    ("before-marker-c", None, "marker:c", False),
    ("after-9-finishes", 9, None, False),
    ("mid-publish", None, "publish:b", False),
]


@pytest.mark.slow
def test_crash_safety(tmp_path: Path, client: Client) -> None:
    caps = make_captures(tmp_path / "caps", 3)
    base = tmp_path / "baseline"
    ref = _run(caps, base, client)
    ref_artifacts, ref_records = _artifacts(base), _records(base)
    assert len(ref_artifacts) == 10 and len(ref_records) == 15

    for name, finishes, pause, processes in KILL_POINTS:
        out = tmp_path / name
        flag = tmp_path / f"{name}.flag"
        env = {**os.environ, "DAG_TEST_SLEEP": "0.15", "PYTHONPATH": str(REPO)}
        if pause:
            env.update({PAUSE_ENV: pause, PAUSE_FLAG_ENV: str(flag)})
        cmd = [sys.executable, "-m", "tests.dag_runner", str(out), *map(str, caps)]
        if processes:
            cmd.append("--processes")
        with open(tmp_path / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log,
                                    start_new_session=True)
            try:
                if pause:
                    _wait_for(flag.exists, proc)
                else:
                    _wait_for(lambda out=out, n=finishes: _finishes(out) >= n, proc)
            finally:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        crashed = status(str(out))
        assert crashed.run_status == "running", name
        n_committed = len(list(ArtifactStore(f"{out}/artifacts").committed()))
        if name == "mid-publish":  # all committed; the Delta commit done, marks not written
            assert n_committed == 10 and delta.exists(OutputLayout(str(out)).table("records"))
        else:  # the kill landed mid-run
            assert (finishes or 0) <= n_committed < 10, (name, n_committed)
            assert any(u.state == "pending" for u in crashed.units), name

        s = _run(caps, out, client)
        assert s.ok and s.keys == ref.keys, name
        assert _artifacts(out) == ref_artifacts, name
        assert _records(out) == ref_records, name  # no duplicate, no lost row
        assert not delta.exists(OutputLayout(str(out)).table("failures"))
        assert delta.read_rows(OutputLayout(str(out)).table("runs")).num_rows == 1
        events = read_stage_log(str(out))
        for key in {e["key"] for e in events if e["event"] == "start"}:
            mine = [e for e in events if e.get("key") == key]
            done = [e["time"] for e in mine if e["event"] == "finish"]
            assert len(done) <= 1, f"{name}: {key} committed twice"
            assert not done or not [e for e in mine
                                    if e["event"] == "start" and e["time"] > done[0]], name
        assert status(str(out)).counts() == {st: {"done": n, "failed": 0, "skipped": 0,
                                                  "pending": 0}
                                             for st, n in {"a": 3, "b": 3, "c": 1,
                                                           "d": 3}.items()}


def test_unknown_config_field_fails_fast(tmp_path: Path, client: Client) -> None:
    caps = make_captures(tmp_path / "caps", 1)
    bad = Chain((Stage(name="a", version="1", fn=len, config_fields=("nope.x",)),))
    with pytest.raises(ConfigError, match="nope.x"):
        _run(caps, tmp_path / "out", client, chain=bad)
