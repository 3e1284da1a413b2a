"""``pipeline/`` is the engine: importing any of its modules loads no ``stages`` or ``workflows`` code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import importlib, pkgutil, sys
import pipeline
names = sorted(m.name for m in pkgutil.walk_packages(pipeline.__path__, "pipeline."))
for name in names:
    importlib.import_module(name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("stages", "workflows"))
print(len(names), ",".join(bad))
"""


def test_pipeline_never_imports_stages_or_workflows() -> None:
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": ""}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n, _, bad = proc.stdout.strip().partition(" ")
    assert int(n) >= 10  # every engine module was imported
    assert bad == "", f"pipeline modules pulled in {bad}"


def test_the_chain_imports_no_heavy_library_until_a_stage_runs() -> None:
    """Importing the chain and its config (every backfill worker does) must not load torch,
    Open3D or MediaPipe: torch alone adds ~190 MiB to each process, and a backfill whose
    captures all fail validation never fits (tests/test_adversarial.py bounds its memory)."""
    probe = ("import sys, workflows.chain, workflows.config, workflows.cli\n"
             "print(','.join(sorted(m for m in ('torch', 'open3d', 'mediapipe') if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": ""}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", f"importing the chain loaded {proc.stdout.strip()}"
