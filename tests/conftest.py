"""Shared fixtures: synthetic subjects are generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SEED = 11


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataset with one subject: OUT/captures/<id> and OUT/ground_truth/<id>.

    Made through the ``pgt synth`` command itself.
    """
    from workflows.cli import main

    out = tmp_path_factory.mktemp("tiny")
    assert main(["synth", "--preset", "tiny", "--subjects", "1", "--seed", str(TINY_SEED), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_subject(tiny_root: Path) -> tuple[Path, Path]:
    """(capture folder, ground-truth folder) of the tiny subject."""
    (capture,) = sorted((tiny_root / "captures").iterdir())
    return capture, tiny_root / "ground_truth" / capture.name
