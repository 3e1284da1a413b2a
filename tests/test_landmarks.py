"""Landmark detectors, face masks and the landmarks stage's rejection records."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.stage import StageConfig
from stages.landmarks import (
    FACE_OVAL,
    FaceAlignmentDetector,
    MediaPipeDetector,
    PrecomputedDetector,
    crop_square,
    decode_heatmaps,
    detect_landmarks_for_capture,
    face_mask,
    fan_crop,
    heatmap_to_image,
    make_detector,
    normalized_to_pixels,
)
from storage.capture import Capture
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


# --- MediaPipe: detector misses and the pixel-centre convention ------------------------------


def test_a_frame_the_face_detector_misses_is_rejected(tiny_subject, monkeypatch):
    """The mesh alone finds the face, but without a face detection there is no score: the
    frame is rejected with its reason instead of getting a confidence that passes."""
    import mediapipe as mp

    capture = Capture.open(tiny_subject[0])
    rgb = capture.read_phone_frame(capture.phone_expressions[0], 0).rgb
    detector = MediaPipeDetector()
    assert detector.detect(rgb).found, "the face is found when the detector sees it"
    monkeypatch.setattr(mp.solutions.face_detection.FaceDetection, "process",
                        lambda self, image: SimpleNamespace(detections=None))
    det = detector.detect(rgb)
    detector.close()
    assert not det.found and det.confidence == 0.0
    assert "face detection found no face" in det.reason


def test_normalized_to_pixels_keeps_centres_at_integers():
    xy = normalized_to_pixels(np.array([[0.0, 0.0], [0.25, 0.5], [1.0, 1.0]]), 200, 100)
    np.testing.assert_allclose(xy, [[0, 0], [50, 50], [200, 100]])
    assert xy.dtype == np.float32


def test_mediapipe_pixel_centre_convention(tiny_subject):
    """An image enlarged s times by pixel replication moves a point at pixel-centre
    coordinate x to s x + (s - 1) / 2. If the detector's pixels were off by c from the
    OpenCV centre convention, the enlarged detections would be off by c (1 - 1/s) after
    mapping back: c is fitted over faces, scales and landmarks, and must be ~0 (an
    edge-convention reading of MediaPipe's coordinates would give c = -0.5 or +0.5)."""
    capture = Capture.open(tiny_subject[0])
    detector = MediaPipeDetector()
    offsets = []
    for expression in capture.phone_expressions:
        # 2x cubic first: at 240 x 320 the face is small and MediaPipe's sub-pixel output jitters.
        base = cv2.resize(capture.read_phone_frame(expression, 0).rgb, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
        a = detector.detect(base)
        for s in (2, 3):
            b = detector.detect(cv2.resize(base, None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST))
            assert a.found and b.found
            residual = (b.points - (s - 1) / 2) / s - a.points
            offsets.append(float(residual.mean()) / (1 / s - 1))
    detector.close()
    print(f"MediaPipe pixel-centre offset: {np.mean(offsets):+.3f} px (sd {np.std(offsets):.3f}, n={len(offsets)})")
    assert len(offsets) >= 8
    assert abs(np.mean(offsets)) < 0.2, offsets


# --- precomputed landmark files ----------------------------------------------------------------


def test_precomputed_files_with_the_wrong_point_count_are_rejected_by_name(tmp_path):
    made = make_capture(tmp_path / "cap", phone_size=(48, 64), n_phone_frames=2)
    root = tmp_path / "landmarks"
    rng = np.random.default_rng(1)
    for e in made.expressions:
        (root / e).mkdir(parents=True)
        for i in range(2):
            np.savez(root / e / f"{i:06d}.npz", points=rng.uniform(5, 40, (478, 2)).astype(np.float32), confidence=np.float32(0.9))
    bad = root / made.expressions[1] / "000001.npz"
    np.savez(bad, points=rng.uniform(5, 40, (68, 2)).astype(np.float32), confidence=np.float32(0.9))
    out = detect_landmarks_for_capture(str(made.root), None, _config(detector="precomputed", precomputed_dir=str(root)))
    rows = out.tables["rows"].to_pylist()
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert len(rows) == 4 and len(rejected) == 1
    assert str(bad) in rejected[0]["reason"] and "(478, 2)" in rejected[0]["reason"] and "(68, 2)" in rejected[0]["reason"]
    assert out.arrays[f"points_{made.expressions[1]}"].shape == (2, 478, 2)
    # A confidence that is not one number in [0, 1] is rejected too.
    np.savez(bad, points=rng.uniform(5, 40, (478, 2)).astype(np.float32), confidence=np.float32(1.5))
    det = PrecomputedDetector(root).detect(np.zeros((4, 4, 3), np.uint8), (made.expressions[1], 1))
    assert not det.found and str(bad) in det.reason and "confidence" in det.reason


# --- face-alignment: crop from a detection, sub-pixel decode -------------------------------------


def _gaussian_heatmaps(peaks: np.ndarray, size: int = 64, sigma: float = 1.5) -> np.ndarray:
    """(P, size, size) Gaussians peaking at ``peaks`` (P, 2), heatmap-edge coordinates."""
    centres = np.arange(size) + 0.5  # cell j's centre
    gx = np.exp(-((centres[None] - peaks[:, :1]) ** 2) / (2 * sigma**2))
    gy = np.exp(-((centres[None] - peaks[:, 1:]) ** 2) / (2 * sigma**2))
    return gy[:, :, None] * gx[:, None, :]


def test_decode_heatmaps_is_fans_quarter_cell_rule_at_cell_centres():
    rng = np.random.default_rng(3)
    peaks = rng.uniform(2, 62, (200, 2))
    peaks[:10] = np.floor(peaks[:10]) + 0.5  # exactly on a cell centre: no shift
    got, values = decode_heatmaps(_gaussian_heatmaps(peaks))
    cell = np.floor(peaks)
    expected = cell + 0.5 + 0.25 * np.sign(peaks - cell - 0.5)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert np.abs(got - peaks).max() <= 0.25 + 1e-9, "never more than a quarter cell off"
    assert np.abs(got - peaks).mean() < 0.15
    assert values.min() > 0.85
    # On the border a neighbour is missing: the cell centre, unmoved.
    edge, _ = decode_heatmaps(_gaussian_heatmaps(np.array([[0.2, 63.9]])))
    np.testing.assert_array_equal(edge, [[0.5, 63.5]])


def test_heatmap_to_image_maps_cell_centres_to_pixel_centres():
    # A 64-cell heatmap over a 128-px crop starting at pixel edge (10, 20): cell j covers
    # pixels 10 + 2j and 11 + 2j, whose centres are at 10 + 2j and 11 + 2j; the cell's
    # centre lies between them, at 10.5 + 2j.
    got = heatmap_to_image(np.array([[0.5, 0.5], [3.5, 10.5]]), 10.0, 20.0, 128.0, 64)
    np.testing.assert_allclose(got, [[10.5, 20.5], [16.5, 40.5]])


def test_crop_square_samples_pixel_centres():
    img = np.zeros((40, 60, 3), np.uint8)
    img[25, 37] = 255
    same = crop_square(img, 30.0, 20.0, 16.0, 16)  # an integer crop at scale 1 is a copy
    np.testing.assert_array_equal(same, img[20:36, 30:46])
    outside = crop_square(img, 50.0, 30.0, 20.0, 10)  # partly outside the image: black there
    assert outside.shape == (10, 10, 3) and outside[-1, -1].max() == 0


def test_fan_crop_is_faces_square_around_the_box():
    left, top, side = fan_crop(np.array([100.0, 50.0, 200.0, 170.0]))
    assert side == pytest.approx(200 * 220 / 195)
    assert left + side / 2 == pytest.approx(150.0)
    assert top + side / 2 == pytest.approx(110.0 - 0.12 * 120)


class _PeakModel:
    """Source of a TorchScript stand-in for FAN: each heatmap is the crop's brightness,
    4 x 4 average-pooled (256 -> 64), so every landmark sits on the brightest spot."""

    @staticmethod
    def save(path) -> None:
        import torch

        class PeakNet(torch.nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                g = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 4)
                return g.repeat(1, 68, 1, 1)

        torch.jit.script(PeakNet()).save(str(path))


def test_face_alignment_crops_the_detected_face_off_centre(tmp_path):
    """A bright spot inside a face box near the right edge of a 640 x 480 frame, outside
    the frame's centre square: the detector crops around the box and the decoded points
    land on the spot to within a quarter heatmap cell."""
    weights = tmp_path / "fan.pt"
    _PeakModel.save(weights)
    h, w = 480, 640
    spot = np.array([598.3, 371.6])  # pixel-centre coordinates
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-((xx - spot[0]) ** 2 + (yy - spot[1]) ** 2) / (2 * 6.0**2))
    rgb = np.repeat((255 * blob).round().astype(np.uint8)[..., None], 3, axis=2)
    box = np.array([540.0, 300.0, 640.0, 430.0])
    detector = FaceAlignmentDetector(weights, face_box=lambda image: box)
    det = detector.detect(rgb)
    assert det.found and det.points.shape == (68, 2) and det.scheme == "multipie68"
    _, _, side = fan_crop(box)
    cell = side / 64
    err = np.abs(det.points - spot).max()
    assert err <= 0.25 * cell + 0.1, (err, cell)
    # No detection, no crop: the frame is rejected with its reason.
    none = FaceAlignmentDetector(weights, face_box=lambda image: None).detect(rgb)
    assert not none.found and "no face detection" in none.reason


def test_face_alignment_refuses_a_file_that_is_not_torchscript(tmp_path):
    bad = tmp_path / "fan.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a TorchScript model"):
        FaceAlignmentDetector(bad, face_box=lambda image: None)
