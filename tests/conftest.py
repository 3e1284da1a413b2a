"""Shared fixtures: synthetic subjects are generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SEED = 11
#: Iterations of the ``rig`` stage in the tests of the engine and storage around the chain
#: (crash safety, failure isolation, object stores, a remote cluster): what they check does
#: not depend on how far the personal rig's fit runs (tests/test_rigging_stage.py and the
#: demo test run it to the default's end). Measured on the tiny subject's fitted meshes: the
#: default (at most 20) ran 19 iterations, ~170 CPU-s a subject, 3/4 of the chain's CPU,
#: while the objective was lowest after 3 (0.0135 against 0.0162 at 19; 24 CPU-s, mean
#: residuals the same to 0.005 mm).
QUICK_RIG_ITERATIONS = 3
#: Run options of those same tests (``--set`` form): the rig stops early and the
#: self-supervision trains a few steps of a small network at low resolution (its labels'
#: accuracy is tested in tests/test_selfsup_stage.py and measured by the benchmark).
QUICK_SETTINGS = {
    "rig.max_iterations": str(QUICK_RIG_ITERATIONS),
    "selfsup.resolution": "24", "selfsup.steps": "4", "selfsup.keypoint_warmup_steps": "2", "selfsup.batch_size": "2",
    "selfsup.network_width": "4", "selfsup.appearance_frames": "3", "selfsup.appearance_steps": "4",
    "selfsup.checkpoint_every": "2", "selfsup.inference_batch": "64",
}


def quick_config():
    """The RunConfig of :data:`QUICK_SETTINGS`."""
    from pipeline.config import with_overrides
    from workflows.config import RunConfig

    return with_overrides(RunConfig(), QUICK_SETTINGS)


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


@pytest.fixture(scope="session")
def tiny_true_fusion(tiny_subject):
    """The tiny subject's scans fused from its true landmarks (every frame kept, Poisson
    depth 8), shared by the fit and refine tests: ``(capture, truth, landmarks output,
    FusedScans)``. Read-only: tests that change a part copy it first."""
    from stages.face_mask import FaceMaskConfig, refine_masks
    from stages.fusion import FusionConfig, fuse_scans
    from stages.synthesis.truth import SubjectTruth
    from storage.capture import Capture
    from tests.phone_standins import true_landmarks_output

    capture_dir, truth_dir = tiny_subject
    cap, truth = Capture.open(capture_dir), SubjectTruth.open(truth_dir)
    landmarks = true_landmarks_output(cap, truth, {})
    scans = fuse_scans(cap, landmarks, refine_masks(cap, landmarks, FaceMaskConfig()), FusionConfig(poisson_depth=8))
    return cap, truth, landmarks, scans


@pytest.fixture(scope="session")
def dashboard_sources(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """The QA dashboard's inputs on the tiny subject (tests/dashboard_data.py): a run of
    the validate stage with one broken capture (a failure record), and label and metrics
    tables holding the truth, the trivial labellers and a stand-in labeller's two rounds."""
    from tests.dashboard_data import dashboard_sources

    return dashboard_sources(tiny_root, tmp_path_factory.mktemp("dashboard"))
