"""Concurrent and duplicate commits of one artifact key (pipeline/artifacts.py).

Two processes commit DIFFERENT bytes to the same keys, released together by a barrier,
round after round: every key must load as exactly one writer's complete output, both
writers must agree on the winner, and the loser's copy must be gone.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.artifacts import MARKER, STALE_TMP_S, ArtifactStore, put_if_absent
from pipeline.serialize import StageOutput

ROUNDS = 50
pytestmark = pytest.mark.timeout(120)


def _value(writer: int, rnd: int) -> StageOutput:
    """Writer-specific bytes in every part, so a mix of two writers is detectable."""
    rng = np.random.default_rng(writer * 1000 + rnd)
    return StageOutput(arrays={"x": rng.normal(size=4096), "w": np.full(64, writer)},
                       meta={"writer": writer, "round": rnd, "pad": "w" * (writer * 50)})


def _writer(root: str, writer: int, barrier, results) -> None:
    store = ArtifactStore(root)
    won = []
    for rnd in range(ROUNDS):
        barrier.wait(timeout=60)
        marker = store.commit("s", f"k{rnd:03d}", _value(writer, rnd), {"writer": writer})
        won.append(marker["writer"])
    results.put((writer, won))


def test_two_processes_committing_different_bytes_always_load_one_whole_artifact(tmp_path: Path):
    root = str(tmp_path / "art")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(root, w, barrier, results)) for w in (1, 2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=100) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    store = ArtifactStore(root)
    winners = []
    for rnd in range(ROUNDS):
        key = f"k{rnd:03d}"
        loaded = store.load("s", key)
        w = loaded.meta["writer"]
        expect = _value(w, rnd)
        assert store.marker("s", key)["writer"] == w
        assert loaded.meta == dict(expect.meta)
        np.testing.assert_array_equal(loaded.arrays["x"], expect.arrays["x"])
        np.testing.assert_array_equal(loaded.arrays["w"], expect.arrays["w"])
        assert got[1][rnd] == got[2][rnd] == w  # both writers report the same winner
        folder = tmp_path / "art" / "s" / key
        assert sorted(p.name for p in folder.iterdir()) == [MARKER, store.marker("s", key)["dir"]]
        winners.append(w)
    print("winners of writer 1 / 2:", winners.count(1), winners.count(2))


def test_put_if_absent_has_one_winner(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    path = f"{store.root}/m"
    assert put_if_absent(store.fs, path, b"first")
    assert not put_if_absent(store.fs, path, b"second")
    assert Path(path).read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left
    mem = ArtifactStore(f"memory://race-{os.getpid()}")
    assert put_if_absent(mem.fs, f"{mem.root}/m", b"a")
    assert not put_if_absent(mem.fs, f"{mem.root}/m", b"b")
    assert mem.fs.cat_file(f"{mem.root}/m") == b"a"


def test_sweep_spares_a_live_writers_staging_and_removes_stale_ones(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    folder = tmp_path / "s" / "k"
    live = folder / f"data.{time.time_ns():019d}.{'a' * 12}"  # another writer, mid-staging
    stale_ns = time.time_ns() - int((STALE_TMP_S + 60) * 1e9)
    stale = folder / f"data.{stale_ns:019d}.{'b' * 12}"  # a writer killed hours ago
    for d in (live, stale):
        d.mkdir(parents=True)
        (d / "arrays.npz").write_bytes(b"partial")
    marker = store.commit("s", "k", {"v": np.arange(3)}, {})
    assert live.is_dir() and (live / "arrays.npz").read_bytes() == b"partial"
    assert not stale.exists()
    np.testing.assert_array_equal(store.load("s", "k")["v"], np.arange(3))
    assert (folder / marker["dir"] / "arrays.npz").is_file()
