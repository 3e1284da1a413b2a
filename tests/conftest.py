"""Shared fixtures: synthetic subjects are generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SEED = 11


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataset with one subject: OUT/captures/<id> and OUT/ground_truth/<id>."""
    from stages.synthesis.generate import generate
    from stages.synthesis.presets import get_preset

    out = tmp_path_factory.mktemp("tiny")
    generate(get_preset("tiny"), 1, TINY_SEED, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_subject(tiny_root: Path) -> tuple[Path, Path]:
    """(capture folder, ground-truth folder) of the tiny subject."""
    (capture,) = sorted((tiny_root / "captures").iterdir())
    return capture, tiny_root / "ground_truth" / capture.name
