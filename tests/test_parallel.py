"""stages/parallel.py: how many worker processes a stage uses, and the ordered map.

The map over real worker processes is exercised by the fusion and texture tests, which
compare its results bit for bit with the serial ones.
"""

from __future__ import annotations

import multiprocessing

from stages.parallel import available_cores, process_map, worker_count


def _scaled(shared: int, x: int) -> int:
    return shared * x


def _count_in_child(queue) -> None:
    queue.put(worker_count(0, 10))


def test_worker_count_follows_the_request_the_items_and_the_affinity() -> None:
    assert available_cores() >= 1
    assert worker_count(0, 100) == available_cores()
    assert worker_count(0, 1) == 1  # never more processes than items
    assert worker_count(3, 2) == 2
    assert worker_count(1, 100) == 1
    assert worker_count(5, 100) == 5  # an explicit request is honoured (oversubscription is the caller's choice)


def test_a_daemonic_process_runs_the_items_itself() -> None:
    """Python forbids a daemonic process (Dask's default worker) to start children."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_count_in_child, args=(queue,), daemon=True)
    child.start()
    child.join(30)
    assert queue.get(timeout=5) == 1


def test_serial_map_keeps_the_order_and_passes_the_shared_value() -> None:
    assert list(process_map(_scaled, [3, 1, 2], 1, shared=10)) == [30, 10, 20]
    assert list(process_map(_scaled, [], 0, shared=10)) == []


def test_engine_gives_each_worker_its_share_of_the_cores(monkeypatch) -> None:
    """Two embedded workers on this machine's cores run stages serially (no
    oversubscription); one worker gives a stage every core; a share the caller set caps
    it; the variable is restored."""
    from pipeline.cluster import STAGE_CORES_ENV, cpu_count, open_client, stage_cores_share
    from stages.parallel import available_cores

    monkeypatch.setenv(STAGE_CORES_ENV, "1000")
    for workers in (1, 2):
        with open_client(workers=workers, processes=False):
            assert available_cores() == max(1, cpu_count() // workers)
    assert available_cores() == 1000
    monkeypatch.setenv(STAGE_CORES_ENV, "1")
    with open_client(workers=1, processes=False):
        assert available_cores() == 1
    assert stage_cores_share(1, "x") == stage_cores_share(1, None) == cpu_count()
    assert stage_cores_share(4 * cpu_count(), None) == 1
    monkeypatch.delenv(STAGE_CORES_ENV)
    assert available_cores() == cpu_count()
