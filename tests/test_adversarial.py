"""The capture boundary against malformed and hostile captures (tests/adversarial_cases.py).

For every case, ``pgt validate`` exits 1 with a message naming the offending file, no
traceback, no leaked file content, in bounded time and memory. Then one backfill over all
cases plus a good capture (run once, in a child process whose peak memory is measured)
gives exactly one failure row per bad capture naming its file, completes the good one, and
``pgt status`` agrees with the failures table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.runlog import read_stage_log
from pipeline.status import status
from storage import delta
from storage.validate import validate_capture
from tests.adversarial_cases import (
    CASES,
    SECRET,
    Case,
    build_case,
    build_outside,
    build_template,
)
from workflows.cli import main
from workflows.config import RunConfig

CASE_SECONDS = 10.0  # per case, validate alone (the slowest takes well under a second)
CASE_TRACED_MIB = 64  # Python/NumPy allocations while validating one case
BACKFILL_RSS_MIB = 512  # peak resident memory of the whole backfill process (measured: 251)
DUP = "dup-subject"


def printable(text: str) -> str:
    """How messages show a path whose bytes are not UTF-8 (``\\xNN``)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class Suite:
    root: Path
    good: Path
    cases: dict[str, Path]
    dup_twin: Path  # a second, identical capture declaring the subject id "dup-subject"


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Suite:
    base = tmp_path_factory.mktemp("adversarial").resolve()
    template = build_template(base / "template")
    outside = build_outside(base, template)
    captures = base / "captures"
    captures.mkdir()
    good = build_case(captures, template, outside, Case("good-subject", lambda r, o: None, ""))
    cases = {c.name: build_case(captures, template, outside, c) for c in CASES}
    (base / "elsewhere").mkdir()
    twin = build_case(base / "elsewhere", template, outside, Case(DUP, lambda r, o: None, ""))
    return Suite(base, good, cases, twin)


def _expected_path(suite: Suite, case: Case) -> str:
    return printable(str(suite.cases[case.name] / case.relpath))


def test_suite_is_large_and_the_template_is_valid(suite: Suite) -> None:
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)
    assert validate_capture(suite.good) == []
    assert validate_capture(suite.dup_twin) == []


@pytest.mark.parametrize("case", [c for c in CASES if c.alone_invalid], ids=lambda c: c.name)
def test_validate_names_the_file(suite: Suite, case: Case, capsys: pytest.CaptureFixture) -> None:
    root = suite.cases[case.name]
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        code = main(["validate", os.fsdecode(root)])
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out, err = capsys.readouterr()
    assert code == 1, out + err
    assert "Traceback" not in err
    assert _expected_path(suite, case) in err, err[:2000]
    assert case.phrase.lower() in err.lower(), err[:2000]
    assert SECRET not in out + err
    assert seconds < CASE_SECONDS
    assert peak < CASE_TRACED_MIB << 20, f"{peak / 2**20:.0f} MiB traced"


_RUNNER = """
import json, resource, sys
from workflows.chain import STAGES
from workflows.config import RunConfig
from pipeline.stage import Chain
from workflows.label import backfill
s = backfill(sys.argv[1], sys.argv[2], RunConfig(), chain=Chain((STAGES[0],)), workers=1,
             processes=False, progress=False, report=False)
# VmHWM is this program's own peak: ru_maxrss would also count the pytest process's pages
# this one shared between fork and exec (all the test modules' imports).
try:
    hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
except (OSError, IndexError):
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"run_id": s.run_id, "counts": s.counts, "rss_kib": hwm}))
"""


@pytest.fixture(scope="module")
def backfilled(suite: Suite) -> tuple[Path, dict]:
    """One backfill (the validate stage) over every case, the good capture and the twin."""
    listing = suite.root / "captures.txt"
    paths = [suite.good, suite.dup_twin, *suite.cases.values()]
    listing.write_bytes(b"".join(os.fsencode(p) + b"\n" for p in paths))
    out = suite.root / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(listing), str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def _owner(message: str, suite: Suite) -> str | None:
    """The case whose capture folder a failure message starts with."""
    for name, root in [*suite.cases.items(), ("dup-twin", suite.dup_twin)]:
        prefix = printable(str(root))
        if message.startswith(prefix) and message[len(prefix)] in "/:":
            return name
    return None


def test_backfill_fails_each_bad_capture_once(suite: Suite, backfilled: tuple[Path, dict]) -> None:
    out, result = backfilled
    rows = [r for r in delta.read_rows(str(out / "tables" / "failures")).to_pylist()
            if r["run_id"] == result["run_id"]]  # fmt: skip
    by_case: dict[str, list[dict]] = {}
    for r in rows:
        by_case.setdefault(_owner(r["message"], suite) or "?", []).append(r)
    assert "?" not in by_case, [r["message"][:300] for r in by_case["?"]]
    for case in CASES:
        got = by_case.get(case.name, [])
        assert len(got) == 1, (case.name, [r["message"][:300] for r in got])
        assert _expected_path(suite, case) in got[0]["message"], (case.name, got[0]["message"][:600])
    assert len(by_case["dup-twin"]) == 1
    dup_rows = by_case[DUP] + by_case["dup-twin"]
    for r in dup_rows:  # each names both folders
        assert str(suite.cases[DUP]) in r["message"] and str(suite.dup_twin) in r["message"]
    assert len(rows) == len(CASES) + 1
    for r in rows:
        assert SECRET not in r["message"] and SECRET not in (r["traceback"] or "")
    assert result["rss_kib"] < BACKFILL_RSS_MIB << 10, f"{result['rss_kib'] >> 10} MiB peak"


def test_backfill_completes_the_good_capture_and_status_agrees(
    suite: Suite, backfilled: tuple[Path, dict]
) -> None:
    out, result = backfilled
    report = status(str(out))
    assert report.run_id == result["run_id"] and report.run_status == "finished"
    assert report.by_subject()["good-subject"] == {"validate": "done"}
    rows = [r for r in delta.read_rows(str(out / "tables" / "failures")).to_pylist()
            if r["run_id"] == result["run_id"]]  # fmt: skip
    failed = [u for u in report.units if u.state == "failed"]
    assert len(failed) == len(rows) == result["counts"]["failed"]
    assert sum(c["failed"] for c in report.counts().values()) == len(rows)
    assert report.counts()["capture"]["failed"] == sum(r["stage"] == "capture" for r in rows) > 0
    text = report.to_text()
    assert "(finished)" in text and SECRET not in text
    run_dir = out / "runs" / result["run_id"]
    for name in ("run.json", "plan.json", "stage-log.jsonl"):
        assert SECRET not in (run_dir / name).read_text()


def test_every_backfill_unit_ends_in_bounded_time(backfilled: tuple[Path, dict]) -> None:
    out, result = backfilled
    events = read_stage_log(str(out), result["run_id"])
    started = {e["key"]: e["time"] for e in events if e["event"] == "start"}
    ended = [e for e in events if e["event"] in ("finish", "fail")]
    assert len(ended) == len(started) > len(CASES) // 2
    slowest = max(e["time"] - started[e["key"]] for e in ended)
    assert slowest < CASE_SECONDS


# ------------------------------------------------------------------------------ policy


def test_symlinks_inside_the_capture_are_followed(suite: Suite, tmp_path: Path) -> None:
    """Policy: a symlink is fine when it resolves inside the capture folder."""
    root = tmp_path / "good-subject"
    shutil.copytree(suite.good, root, symlinks=True)
    frame = root / "hmc/rec000/eye_left/000001.png"
    frame.unlink()
    frame.symlink_to("000000.png")
    shared = root / "shared-eye-right"
    (root / "hmc/rec000/eye_right").rename(shared)
    (root / "hmc/rec000/eye_right").symlink_to(Path("../..") / shared.name)
    assert validate_capture(root) == []


def test_a_run_that_dies_is_not_left_running(suite: Suite, tmp_path: Path, monkeypatch) -> None:
    from pipeline import dag
    from pipeline.stage import Chain
    from workflows.chain import STAGES

    def boom(self) -> None:
        raise RuntimeError("planner exploded")

    monkeypatch.setattr(dag._Run, "loop", boom)
    with pytest.raises(RuntimeError, match="planner exploded"):
        dag.run_chain([suite.good], tmp_path / "out", RunConfig(), chain=Chain((STAGES[0],)),
                      workers=1, processes=False, progress=False, report=False)  # fmt: skip
    report = status(str(tmp_path / "out"))
    assert report.run_status == "failed"
    assert "(failed)" in report.to_text()
