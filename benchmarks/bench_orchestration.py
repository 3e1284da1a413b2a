"""Orchestration overhead: thousands of subjects through trivial stages.

Run: ``.venv/bin/python -m benchmarks.bench_orchestration [--quick] [--subjects N]``.

Measures, for a fresh run and for a fully cached rerun: capture fingerprinting, graph
build (first planning pass: content keys, cache checks, ``client.submit``), execution
wall time and time per task, and the scheduler's resident memory (sampled every 0.5 s
through ``client.run_on_scheduler``). Writes ``benchmarks/results/orchestration.json``
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from pipeline.cluster import default_n_workers, open_client
from pipeline.dag import run_chain
from pipeline.stage import Chain, Stage, StageConfig

RESULTS = Path(__file__).parent / "results" / "orchestration.json"


def trivial_a(capture: str, config: StageConfig) -> dict[str, np.ndarray]:
    """Reads a few bytes from the capture."""
    data = Path(capture, "data.txt").read_bytes()
    return {"x": np.frombuffer(data, dtype=np.uint8).astype(np.float32) * config["scale"]}


def trivial_b(a: dict[str, np.ndarray]) -> dict:
    """Reduces a's array to a number."""
    return {"sum": float(a["x"].sum())}


def trivial_total(b: dict[str, dict]) -> dict:
    """Dataset barrier over every subject."""
    return {"n": len(b), "total": sum(v["sum"] for v in b.values())}


CHAIN = Chain((
    Stage(name="a", version="1", fn=trivial_a, config_fields=("scale",)),
    Stage(name="b", version="1", fn=trivial_b, inputs=("a",)),
    Stage(name="total", version="1", fn=trivial_total, inputs=("b",), scope="dataset"),
))


def _rss(dask_scheduler=None) -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _make_captures(root: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        d = root / f"s{i:05d}"
        d.mkdir(parents=True)
        (d / "capture.json").write_text(json.dumps({"subject_id": d.name}))
        (d / "data.txt").write_text(f"subject {i}")
        out.append(d)
    return out


class _Sampler:
    """Peak scheduler RSS while a run is in flight."""

    def __init__(self, client) -> None:
        self.client, self.peak, self._stop = client, 0, threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # the sampler must never break the run
                self.peak = max(self.peak, self.client.run_on_scheduler(_rss))
            self._stop.wait(0.5)

    def __enter__(self) -> _Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def _one_run(client, caps, out: str, label: str) -> dict:
    before = client.run_on_scheduler(_rss)
    with _Sampler(client) as sampler:
        s = run_chain(caps, out, {"scale": 2.0}, chain=CHAIN, client=client,
                      progress=False, report=False)
    after = client.run_on_scheduler(_rss)
    tasks = s.counts["done"] + s.counts["failed"]
    units = sum(s.counts.values())
    return {"label": label, "units": units, "executed": tasks, "cached": s.counts["cached"],
            "failed": s.counts["failed"], **{f"{k}_s": round(v, 3) for k, v in s.timings.items()},
            "per_task_ms": round(1000 * s.timings["execute"] / tasks, 3) if tasks else None,
            "per_unit_plan_ms": round(1000 * s.timings["plan"] / max(units, 1), 4),
            "scheduler_rss_before_mb": round(before / 2**20, 1),
            "scheduler_rss_peak_mb": round(max(sampler.peak, after) / 2**20, 1),
            "scheduler_rss_after_mb": round(after / 2**20, 1)}


def _median_row(runs: list[dict], label: str) -> dict:
    """Median of every numeric column over repeated runs (a fresh cluster each time)."""
    row: dict = {"label": f"{label} (median of {len(runs)})"}
    for k in runs[0]:
        if k != "label":
            vals = [x[k] for x in runs if x[k] is not None]
            row[k] = round(float(np.median(vals)), 3) if vals else None
    return row


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and writes the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="500 subjects instead of 5,000")
    ap.add_argument("--subjects", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--workdir", default=None, help="folder for the fake captures and outputs")
    ap.add_argument("--repeats", type=int, default=3, help="fresh + cached runs, each into a new output")
    args = ap.parse_args(argv)
    n = args.subjects or (500 if args.quick else 5000)
    workers = default_n_workers(args.workers)
    with tempfile.TemporaryDirectory(prefix="pgt-bench-", dir=args.workdir) as tmp:
        caps = _make_captures(Path(tmp) / "caps", n)
        out = str(Path(tmp) / "out")
        runs = []
        for r in range(args.repeats):
            with open_client(workers=workers, processes=True) as client:
                runs += [_one_run(client, caps, f"{out}{r}", "fresh"), _one_run(client, caps, f"{out}{r}", "cached")]
    rows = [_median_row([x for x in runs if x["label"] == label], label) for label in ("fresh", "cached")]
    result = {"subjects": n, "workers": workers, "cpus": os.cpu_count(), "repeats": args.repeats,
              "python": platform.python_version(), "time": time.time(), "medians": rows, "runs": runs}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    cols = ["label", "units", "executed", "cached", "fingerprint_s", "plan_s", "execute_s",
            "total_s", "per_task_ms", "scheduler_rss_before_mb", "scheduler_rss_peak_mb",
            "scheduler_rss_after_mb"]
    print(f"{n} subjects, {workers} worker processes, {os.cpu_count()} CPUs\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
