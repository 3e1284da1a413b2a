"""Phone-only synthetic subjects and the phone burst's head-turn range."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.errors import ConfigError
from stages.synthesis.generate import generate_subject
from stages.synthesis.phone import FACE_CENTRE, phone_camera
from stages.synthesis.presets import PHONE_ONLY_HMC, get_preset
from storage.capture import Capture
from storage.validate import validate_capture


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_phone_only_subject_is_valid_and_its_phone_part_is_the_full_subjects(tmp_path) -> None:
    """Two prompts x 2 frames; the full subject's HMC part made small so the test is quick."""
    config = replace(get_preset("tiny"), prompts=("neutral", "jaw_drop_max"), hmc_size=64, fps=10.0)
    full = generate_subject(config, 5, 0, tmp_path / "full", progress=False)
    only = generate_subject(replace(config, phone_only=True), 5, 0, tmp_path / "only", progress=False)
    assert full == only
    cap_dir = tmp_path / "only" / "captures" / only
    assert validate_capture(cap_dir, deep=True) == []
    cap = Capture.open(cap_dir)
    assert len(cap.recordings) == 1 and len(cap.rig.cameras) == 10
    rec = cap.recording(cap.recordings[0])
    assert rec.frame_count == 60 and cap.rig.cameras[0].intrinsics.width == PHONE_ONLY_HMC["size"]
    for part in ("captures/{}/phone", "ground_truth/{}/phone"):
        a, b = _files(tmp_path / "full" / part.format(full)), _files(tmp_path / "only" / part.format(only))
        assert a and a == b
    for name in ("identity.npz", "rig.npz", "expressions.npz"):
        truth = "ground_truth/{}/" + name
        assert (tmp_path / "full" / truth.format(full)).read_bytes() == (tmp_path / "only" / truth.format(only)).read_bytes()


def _yaw_pitch(cam) -> tuple[float, float]:
    d = (cam.t_world_from_camera - FACE_CENTRE) / np.linalg.norm(cam.t_world_from_camera - FACE_CENTRE)
    return np.degrees(np.arctan2(d[0], d[2])), np.degrees(np.arcsin(d[1]))


def test_head_turn_range() -> None:
    """The defaults draw exactly what the fixed +-18 / +-10 degrees drew (same stream);
    +-40 / +-20 spreads the views that far and no further."""
    a = phone_camera(480, 60.0, np.random.default_rng(3), (0.3, 0.38))
    b = phone_camera(480, 60.0, np.random.default_rng(3), (0.3, 0.38), 18.0, 10.0)
    assert np.array_equal(a.R_world_from_camera, b.R_world_from_camera)
    rng = np.random.default_rng(4)
    angles = np.array([_yaw_pitch(phone_camera(480, 60.0, rng, (0.3, 0.38), 40.0, 20.0)) for _ in range(300)])
    assert np.abs(angles[:, 0]).max() <= 40.0 + 1e-6 and np.abs(angles[:, 0]).max() > 35.0
    assert np.abs(angles[:, 1]).max() <= 20.0 + 1e-6 and np.abs(angles[:, 1]).max() > 17.0
    with pytest.raises(ConfigError, match="phone_yaw_deg"):
        replace(get_preset("standard"), phone_yaw_deg=95.0)
