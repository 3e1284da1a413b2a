"""Landmark detectors, face masks and the landmarks stage's rejection records."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.stage import StageConfig
from stages.landmarks import (
    FACE_OVAL,
    MediaPipeDetector,
    PrecomputedDetector,
    detect_landmarks_for_capture,
    face_mask,
    make_detector,
)
from tests.capture_factory import make_capture
from workflows.config import RunConfig


def _config(**overrides) -> StageConfig:
    lm = RunConfig().landmarks
    values = {f"landmarks.{k}": getattr(lm, k) for k in ("detector", "weights", "precomputed_dir", "min_confidence")}
    values.update({f"landmarks.{k}": v for k, v in overrides.items()})
    return StageConfig(values)


def test_no_face_is_a_rejection_not_an_error():
    det = MediaPipeDetector().detect(np.full((320, 240, 3), 128, np.uint8))
    assert not det.found and "no face" in det.reason and det.confidence == 0
    assert det.points.shape == (0, 2)


def test_mediapipe_on_a_real_photograph():
    rgb = cv2.imread("../shared/data/aflw-test.jpg")
    if rgb is None:
        pytest.skip("shared data not present")
    det = MediaPipeDetector().detect(rgb[:, :, ::-1].copy())
    assert det.found and det.points.shape == (478, 2) and 0.5 < det.confidence <= 1
    # The photo's face lies in its centre third.
    centre = det.points[:468].mean(0)
    assert 150 < centre[0] < 300 and 150 < centre[1] < 330


def test_face_mask_is_the_filled_oval_hull():
    t = np.linspace(0, 2 * np.pi, len(FACE_OVAL), endpoint=False)
    points = np.zeros((478, 2), np.float32)
    points[list(FACE_OVAL)] = np.c_[100 + 40 * np.cos(t), 120 + 60 * np.sin(t)]
    mask = face_mask(points, (240, 200))
    assert mask[120, 100] and not mask[10, 10]
    assert mask.sum() == pytest.approx(np.pi * 40 * 60, rel=0.03)


def test_precomputed_landmarks_are_read_and_missing_files_rejected(tmp_path):
    (tmp_path / "smile").mkdir()
    pts = np.random.default_rng(0).uniform(0, 100, (478, 2)).astype(np.float32)
    np.savez(tmp_path / "smile" / "000001.npz", points=pts, confidence=np.float32(0.7))
    det = PrecomputedDetector(tmp_path)
    got = det.detect(np.zeros((4, 4, 3), np.uint8), ("smile", 1))
    assert got.found and got.confidence == pytest.approx(0.7)
    np.testing.assert_array_equal(got.points, pts)
    missing = det.detect(np.zeros((4, 4, 3), np.uint8), ("smile", 2))
    assert not missing.found and "000002.npz" in missing.reason


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("nope", {}, "unknown landmark detector 'nope'"),
    ("face_alignment", {}, "needs landmarks.weights"),
    ("face_alignment", {"weights": "/no/such/fan.zip"}, "/no/such/fan.zip: face-alignment weights file not found"),
    ("precomputed", {}, "needs landmarks.precomputed_dir"),
])
def test_detector_config_errors_name_the_problem(name, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_detector(name, **kwargs)


def test_stage_records_every_frame_with_its_reason(tmp_path):
    made = make_capture(tmp_path, phone_size=(96, 128), n_phone_frames=2)  # noise: no faces
    out = detect_landmarks_for_capture(str(made.root), None, _config())
    rows = out.tables["rows"].to_pylist()
    assert len(rows) == 2 * len(made.expressions)
    assert {r["status"] for r in rows} == {"rejected"}
    assert all("no face" in r["reason"] and r["mask_pixels"] == 0 for r in rows)
    for e in made.expressions:
        assert np.isnan(out.arrays[f"points_{e}"]).all()
        assert out.arrays[f"mask_{e}"].shape == (2, 96 * 128 // 8)
    assert out.meta["rejected"] == len(rows)


def test_stage_rejects_low_confidence_detections(tiny_subject):
    capture, _ = tiny_subject
    out = detect_landmarks_for_capture(str(capture), None, _config(min_confidence=1.01))
    rows = out.tables["rows"].to_pylist()
    assert rows and all(r["status"] == "rejected" and "below 1.01" in r["reason"] for r in rows)
