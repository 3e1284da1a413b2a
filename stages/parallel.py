"""A stage's independent items (a subject's expressions) spread over worker processes.

Processes, not threads: Open3D's Poisson reconstruction and normal estimation hold the
GIL for their whole call (measured: a Python thread gets no time while they run), so
threads would run them one after the other. Workers are started with ``spawn`` (a clean
interpreter: forking a process that holds torch, Open3D or Dask threads can deadlock).
A daemonic process may not have children (Python's rule, and Dask's default for its
workers), so there the items run in this process; :func:`pipeline.cluster.open_client`
starts its embedded workers non-daemonic for this reason.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any, TypeVar

from pipeline.cluster import STAGE_CORES_ENV, cpu_count

T = TypeVar("T")
R = TypeVar("R")


def available_cores() -> int:
    """Cores a stage may use: the engine's share per worker (``PGT_STAGE_CORES``, set by
    :func:`pipeline.cluster.open_client` so concurrent workers do not oversubscribe the
    machine), else this process's CPU affinity; at least 1."""
    share = os.environ.get(STAGE_CORES_ENV, "")
    if share.isdigit() and int(share) > 0:
        return int(share)
    return cpu_count()


def worker_count(requested: int, items: int) -> int:
    """Processes to use: ``requested`` (0 = :func:`available_cores`), at most one per item,
    and 1 inside a daemonic process (which may not start children)."""
    n = available_cores() if requested == 0 else requested
    if multiprocessing.current_process().daemon:
        return 1
    return max(1, min(n, items))


#: What the pool's initializer handed this worker process (see :func:`process_map`).
_shared: Any = None


def _set_shared(value: Any) -> None:
    global _shared
    _shared = value


def _call(fn: Callable[[Any, T], R], item: T) -> R:
    return fn(_shared, item)


def process_map(fn: Callable[[Any, T], R], items: Sequence[T], workers: int, shared: Any = None) -> Iterator[R]:
    """``fn(shared, x)`` for each of ``items``, in order, over ``worker_count(workers, len(items))``
    processes; results are yielded as they come (in order), so few are held at once.

    Args:
        fn: a module-level function (the workers import it by reference).
        items: picklable arguments, one call each.
        workers: requested processes, 0 = one per available core, 1 = this process only.
        shared: a picklable value every call reads (sent once to each worker process,
            not with every item).

    Yields:
        The results in the order of ``items``; an exception in a call is raised here.
    """
    n = worker_count(workers, len(items))
    if n <= 1:
        for x in items:
            yield fn(shared, x)
        return
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_set_shared, initargs=(shared,)) as pool:
        yield from pool.map(partial(_call, fn), items)
