"""Trivial but real stages and fake captures for the orchestration tests (not product code).

Chain: ``a`` (capture -> arrays) -> ``b`` (capture + a -> rows, published to table
``records``) -> ``c`` (dataset barrier over every subject's b) -> ``d`` (b + c per subject).

Fault injection lives in the fake capture folders, so it travels to any worker:
``FAIL`` makes stage ``a`` raise; ``FLAKY`` holds the path of a counter file and makes
``a`` fail on its first attempt only. ``$DAG_TEST_SLEEP`` slows every stage down.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.serialize import StageOutput
from pipeline.stage import Chain, Publish, Stage, StageConfig


@dataclass(frozen=True)
class AConfig:
    """Settings of stage a."""

    scale: float = 1.0
    """Multiplier applied to the values read from the capture."""


@dataclass(frozen=True)
class BConfig:
    """Settings of stage b."""

    offset: int = 0
    """Added to every published value."""


@dataclass(frozen=True)
class DagTestConfig:
    """Root config of the test chain."""

    a: AConfig = field(default_factory=AConfig)
    """Stage a."""
    b: BConfig = field(default_factory=BConfig)
    """Stage b."""
    unused: str = "x"
    """Read by no stage: changing it must invalidate nothing."""


def _nap() -> None:
    time.sleep(float(os.environ.get("DAG_TEST_SLEEP", "0")))


def _subject(capture: str) -> str:
    return json.loads(Path(capture, "capture.json").read_text())["subject_id"]


def stage_a(capture: str, config: StageConfig) -> dict[str, np.ndarray]:
    """Reads ``data.txt`` (numbers) and hashes it."""
    _nap()
    folder = Path(capture)
    if (folder / "FAIL").exists():
        raise ValueError(f"injected failure in {folder.name}")
    if (folder / "FLAKY").exists():
        counter = Path((folder / "FLAKY").read_text().strip())
        n = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(n + 1))
        if n == 0:
            raise RuntimeError("flaky first attempt")
    raw = (folder / "data.txt").read_bytes()
    values = np.array([float(x) for x in raw.split()], dtype=np.float64)
    return {"digest": np.frombuffer(hashlib.sha256(raw).digest(), dtype=np.uint8).copy(),
            "values": values * config["a.scale"]}


def stage_b(capture: str, a: dict[str, np.ndarray], config: StageConfig) -> StageOutput:
    """Per-value rows (published) plus a sum."""
    _nap()
    subject = _subject(capture)
    vals = a["values"] + config["b.offset"]
    rows = pa.table({"subject_id": pa.array([subject] * len(vals), pa.string()),
                     "index": pa.array(np.arange(len(vals), dtype=np.int32)),
                     "value": pa.array(vals, pa.float64())})
    return StageOutput(arrays={"values": vals}, meta={"subject_id": subject,
                                                     "sum": float(vals.sum())},
                       tables={"rows": rows})


def stage_c(b: dict[str, StageOutput]) -> dict:
    """Dataset barrier: total over every subject."""
    _nap()
    return {"subjects": sorted(b), "total": float(sum(o.meta["sum"] for o in b.values()))}


def stage_d(b: StageOutput, c: dict) -> StageOutput:
    """Per subject again, after the barrier: share of the total, and per-value records
    in which odd values are rejected (the ``rows`` convention ``pgt status`` reads)."""
    _nap()
    total = c["total"] or 1.0
    values = b.arrays["values"]
    odd = values % 2 == 1
    rows = pa.table({
        "subject_id": pa.array([b.meta["subject_id"]] * len(values), pa.string()),
        "frame_index": pa.array(np.arange(len(values), dtype=np.int32)),
        "status": pa.array(np.where(odd, "rejected", "ok").tolist(), pa.string()),
        "code": pa.array(np.where(odd, "odd", "").tolist(), pa.string()),
        "reason": pa.array([f"odd value: {v:g} is not even" if o else "" for v, o in zip(values, odd, strict=True)],
                           pa.string()),
    })
    return StageOutput(arrays={"share": np.array([b.meta["sum"] / total])}, tables={"rows": rows})


def build_chain(gpu_b: bool = False, b_version: str = "1") -> Chain:
    """The four-stage test chain."""
    return Chain((
        Stage(name="a", version="1", fn=stage_a, inputs=("capture",),
              config_fields=("a.scale",), outputs=("digest", "values")),
        Stage(name="b", version=b_version, fn=stage_b, inputs=("capture", "a"),
              config_fields=("b.offset",), resources="gpu" if gpu_b else "cpu",
              publish=Publish(table="records")),
        Stage(name="c", version="1", fn=stage_c, inputs=("b",), scope="dataset"),
        Stage(name="d", version="1", fn=stage_d, inputs=("b", "c")),
    ))


def make_captures(root: Path, n: int, *, fail: tuple[int, ...] = (),
                  flaky: dict[int, Path] | None = None) -> list[Path]:
    """``n`` tiny capture folders ``subj000..``; indices in ``fail`` fail stage a."""
    out = []
    for i in range(n):
        folder = root / f"subj{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "capture.json").write_text(json.dumps(
            {"format": "hmc-pgt-capture", "format_version": 1, "subject_id": folder.name}))
        (folder / "data.txt").write_text(" ".join(str(i * 10 + k) for k in range(5)))
        if i in fail:
            (folder / "FAIL").write_text("")
        if flaky and i in flaky:
            (folder / "FLAKY").write_text(str(flaky[i]))
        out.append(folder)
    return out
