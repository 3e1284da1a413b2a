"""Dask cluster access: an embedded LocalCluster by default, or an existing scheduler.

The same code runs on any Dask deployment (dask-jobqueue, dask-kubernetes): pass the
scheduler address. GPU stages ask for ``resources={"GPU": 1}`` only when some worker
advertises a ``GPU`` resource (``dask worker --resources GPU=1``); otherwise they run on
ordinary workers, because a task asking for a resource no worker has waits forever.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
from distributed import Client, LocalCluster

#: Environment variable with each embedded worker's share of the cores (stages/parallel.py).
STAGE_CORES_ENV = "PGT_STAGE_CORES"
#: Memory budget per embedded worker used to cap the default worker count.
WORKER_MEMORY_BYTES = 4 * 1024**3


def default_n_workers(requested: int | None = None) -> int:
    """Worker count: ``requested``, else min(CPU count, total memory / 4 GiB), at least 1."""
    if requested is not None:
        return max(1, int(requested))
    by_memory = psutil.virtual_memory().total // WORKER_MEMORY_BYTES
    return max(1, min(cpu_count(), int(by_memory)))


def cpu_count() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def stage_cores_share(n_workers: int, requested: str | None = None) -> int:
    """Cores each of ``n_workers`` embedded workers' stages may use: the machine's cores
    split between them, capped by ``requested`` (the caller's ``PGT_STAGE_CORES``) when
    that is a positive integer; at least 1."""
    share = max(1, cpu_count() // max(1, n_workers))
    if requested is not None and requested.strip().isdigit() and int(requested) > 0:
        share = min(share, int(requested))
    return share


@contextmanager
def open_client(*, workers: int | None = None, scheduler_address: str | None = None,
                processes: bool = True, resources: dict[str, float] | None = None
                ) -> Iterator[Client]:
    """Yields a connected client and closes what it opened.

    Args:
        workers: embedded worker count (see :func:`default_n_workers`).
        scheduler_address: connect to this scheduler instead of starting one.
        processes: embedded workers are processes (default) or threads (tests).
        resources: resources every embedded worker advertises, e.g. ``{"GPU": 1}``.
    """
    if scheduler_address:
        client = Client(scheduler_address)
        try:
            yield client
        finally:
            client.close()
        return
    import dask

    n_workers = default_n_workers(workers)
    # Each worker's share of the cores, for stages that spread a subject's items over
    # processes (stages/parallel.py): 2 workers on 2 cores run stages serially, 1 worker
    # gives a stage both. Worker processes inherit it; thread workers read it here. A
    # share the caller set (e.g. PGT_STAGE_CORES=1 for two runs side by side) is a cap:
    # overriding it gave each run's torch 2 spinning OpenMP threads on a shared machine.
    before = os.environ.get(STAGE_CORES_ENV)
    os.environ[STAGE_CORES_ENV] = str(stage_cores_share(n_workers, before))
    try:
        # non-daemonic worker processes may start processes of their own
        with dask.config.set({"distributed.worker.daemon": False}):
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1,
                                   processes=processes, resources=resources,
                                   dashboard_address=":0", silence_logs=logging.ERROR)
        try:
            client = Client(cluster)
            try:
                yield client
            finally:
                client.close()
        finally:
            cluster.close()
    finally:
        if before is None:
            os.environ.pop(STAGE_CORES_ENV, None)
        else:
            os.environ[STAGE_CORES_ENV] = before


def worker_resources(client: Client) -> dict[str, float]:
    """Total of each resource advertised by the connected workers."""
    total: dict[str, float] = {}
    for info in client.scheduler_info(n_workers=-1).get("workers", {}).values():
        for name, amount in (info.get("resources") or {}).items():
            total[name] = total.get(name, 0.0) + float(amount)
    return total


def gpu_resources(client: Client) -> dict[str, Any] | None:
    """``{"GPU": 1}`` when some worker offers a GPU, else ``None`` (run on any worker)."""
    return {"GPU": 1} if worker_resources(client).get("GPU", 0) >= 1 else None
