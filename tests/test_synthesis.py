"""The synthetic capture generator: determinism, validity, truth and image alignment."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from benchmarks.bench_face_model import PhoneFrame, detection_errors, preset_frames
from rigs.camera import Camera, rig_cameras
from rigs.face_model import load_ict_face_model
from rigs.rig import BlendshapeRig
from stages.synthesis.generate import (
    generate_subject,
    landmark_points,
)
from stages.synthesis.phone import (
    DEPTH_NOISE_K,
    FLYING_PIXEL_RATE,
    HOLE_SEED_RATE,
    truedepth,
)
from stages.synthesis.presets import get_preset
from stages.synthesis.subject import make_subject
from stages.synthesis.truth import SubjectTruth
from storage.capture import Capture
from storage.label_table import LabelTable
from storage.validate import validate_capture
from tests.conftest import TINY_SEED

#: Bound on MediaPipe's median distance from the embedded landmarks, in mm on the face.
#: Measured (docs/face-model.md): ~2.3-2.8 mm median over tiny and standard frames; the
#: embedding is a registration of two different templates, so mm-level disagreement in
#: the definition of points (face contour, lip lines) is expected.
EMBEDDING_MEDIAN_MM = 4.0


def _phone_camera(capture: Capture, truth: SubjectTruth, prompt: str, k: int) -> Camera:
    intr = capture.phone_intrinsics(prompt)
    pose = truth.phone(prompt)["head_in_camera"][k]
    r, t = pose[:, :3], pose[:, 3]
    return Camera(intr, np.zeros(5), r.T, -r.T @ t)


def test_same_seed_gives_identical_bytes(tiny_root: Path, tmp_path: Path):
    generate_subject(get_preset("tiny"), TINY_SEED, 0, tmp_path, progress=False)
    for sub, at_least in (("captures", 1000), ("ground_truth", 10)):
        a, b = tiny_root / sub, tmp_path / sub
        # The Delta label table names its files by UUID; its rows are compared below.
        files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and "labels" not in p.parts)
        files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and "labels" not in p.parts)
        assert files_a == files_b and len(files_a) >= at_least
        _, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files_a], shallow=False)
        assert not mismatch and not errors, mismatch[:5]
    rows_a = LabelTable(str(tiny_root / "ground_truth" / "labels")).read().sort_by([("recording_id", "ascending"), ("frame_index", "ascending")])
    rows_b = LabelTable(str(tmp_path / "ground_truth" / "labels")).read().sort_by([("recording_id", "ascending"), ("frame_index", "ascending")])
    assert rows_a.num_rows > 100 and rows_a.equals(rows_b)


def test_other_seed_differs(tiny_subject):
    capture, truth = tiny_subject
    other = make_subject("x", np.random.default_rng([TINY_SEED + 1, 0]), load_ict_face_model(), SubjectTruth.open(truth).rig.definition)
    assert not np.allclose(other.rig.neutral, SubjectTruth.open(truth).rig.neutral)


def test_tiny_capture_is_valid_and_complete(tiny_subject):
    capture_dir, _ = tiny_subject
    assert validate_capture(capture_dir) == []
    capture = Capture.open(capture_dir)
    assert len(capture.rig.cameras) == 10
    assert {c.role for c in capture.rig.cameras} == {"embedded", "gt"}
    kinds = {s.kind for r in capture.recordings for s in capture.recording(r).segments}
    assert kinds == {"neutral", "peak", "eye_closure", "wink", "mouth_closed", "speech"}
    rec = capture.recording(capture.recordings[0])
    assert rec.keypoints("eye_left") is not None and rec.keypoints("gt_eye_left") is None


def test_truth_is_consistent_and_imperfect(tiny_subject):
    capture_dir, truth_dir = tiny_subject
    truth = SubjectTruth.open(truth_dir)
    d = truth.rig.definition
    hmc = truth.hmc("rec000")
    b = hmc["b"]
    assert b.min() >= 0 and b.max() <= 1
    np.testing.assert_allclose(b[:, d.indices(d.eye_following)], d.eye_following_from_gaze(hmc["gaze"]), atol=1e-6)
    # Headset slip: drift plus a re-donning jump of millimetres.
    assert np.ptp(hmc["head_t"], axis=0).max() > 0.001
    # Natural blinks happen outside the annotated eye events.
    events = [s for s in Capture.open(capture_dir).recording("rec000").segments if s.kind in ("eye_closure", "wink")]
    outside = np.ones(len(b), bool)
    for s in events:
        outside[max(0, s.start - 5) : s.end + 5] = False
    assert b[outside, d.index("eyeBlink_L")].max() > 0.9
    # The true personal rig differs from the generic one, smoothly.
    generic = BlendshapeRig.generic(load_ict_face_model())
    k = d.index("jawOpen")
    diff = np.linalg.norm(truth.rig.deltas[k] - generic.deltas[k], axis=1)
    assert diff.max() > 0.001
    corr = np.corrcoef(truth.rig.deltas[k].ravel(), generic.deltas[k].ravel())[0, 1]
    assert corr > 0.9
    # At rest the lips touch (ICT identities part them; the generator seals them).
    assert truth.rig.inner_lip_gap(np.zeros(d.size)) < 0.0002
    # Performances only approximate the art priors.
    expr = truth.expressions()
    i = list(expr["prompts"]).index("jaw_drop_max")
    assert 0.6 <= expr["b"][i, k] <= 1.0
    assert (expr["b"][i] > 0).sum() > 1


def _project_cv2(points: np.ndarray, r_cam_from_world: np.ndarray, t_cam_from_world: np.ndarray, k: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """OpenCV's projection: the reference the capture's calibration is defined by."""
    rvec, _ = cv2.Rodrigues(np.asarray(r_cam_from_world, np.float64))
    pix, _ = cv2.projectPoints(np.asarray(points, np.float64).reshape(-1, 1, 3), rvec,
                               np.asarray(t_cam_from_world, np.float64), k, np.asarray(dist, np.float64))
    return pix.reshape(-1, 2)


def test_landmarks_match_the_capture_calibration(tiny_subject):
    """The truth's 2D landmarks are the true 3D landmarks projected by OpenCV through the
    calibration stored in the capture (phone intrinsics; HMC intrinsics, distortion and
    extrinsics from rig.json), not by the generator's own projection code."""
    capture_dir, truth_dir = tiny_subject
    capture, truth = Capture.open(capture_dir), SubjectTruth.open(truth_dir)
    errors = []
    expressions = truth.expressions()
    for i, prompt in enumerate(capture.phone_expressions):
        points = landmark_points(truth, truth.rig.pose(expressions["b"][i], expressions["gaze"][i]))
        gt = truth.phone(prompt)
        intr = capture.phone_intrinsics(prompt)
        k = np.array([[intr.fx, 0, intr.cx], [0, intr.fy, intr.cy], [0, 0, 1]])
        for f in range(capture.phone_frame_count(prompt)):
            pose = gt["head_in_camera"][f]  # x_cam = R x_head + t
            pix = _project_cv2(points, pose[:, :3], pose[:, 3], k, np.zeros(5))
            errors.append(np.abs(pix - gt["landmarks_2d"][f])[gt["visible"][f]])
    hmc = truth.hmc("rec000")
    cameras = {c.name: c for c in capture.rig.cameras}
    assert any(np.any(np.asarray(c.distortion) != 0) for c in cameras.values()), "distortion is exercised"
    for frame in (0, len(hmc["b"]) // 2, len(hmc["b"]) - 1):
        points = landmark_points(truth, truth.hmc_vertices("rec000", frame))[hmc["landmark_ids"]]
        for c, name in enumerate(hmc["cameras"]):
            cam = cameras[str(name)]
            r = np.asarray(cam.R_headset_from_camera).T
            pix = _project_cv2(points, r, -r @ np.asarray(cam.t_headset_from_camera), cam.intrinsics.K, cam.distortion)
            vis = hmc["visible"][c, frame]
            assert vis.sum() > 5
            errors.append(np.abs(pix - hmc["landmarks_2d"][c, frame])[vis])
    worst = max(e.max() for e in errors if e.size)
    assert worst < 1e-3, worst


def test_pixel_rays_and_projection_agree(tiny_subject):
    """The images are ray cast through ``Camera.pixel_rays`` and the truth's landmarks are
    projected by ``Camera.project``: images and landmarks align exactly when a point on
    the ray of pixel (u, v) projects back to (u, v). Checked for every HMC camera of the
    capture (with its lens distortion) over the whole image, and a phone camera."""
    capture_dir, _ = tiny_subject
    capture = Capture.open(capture_dir)
    cams = list(rig_cameras(capture.rig).values())
    cams.append(Camera(capture.phone_intrinsics(capture.phone_expressions[0]), np.zeros(5), np.eye(3), np.zeros(3)))
    worst = 0.0
    for cam in cams:
        v, u = np.mgrid[0 : cam.height, 0 : cam.width].astype(np.float64)
        pixels = np.stack([u, v], -1)
        origins, dirs = cam.pixel_rays()
        for depth in (0.05, 0.3):
            back, z = cam.project(origins + depth * dirs)
            assert (z > 0).all()
            worst = max(worst, float(np.abs(back - pixels).max()))
    assert worst < 1e-3, worst
    # The check can fail: rays of pixels half a pixel off do not project back.
    cam = cams[0]
    origins, dirs = cam.pixel_rays(np.array([[10.5, 20.0]]))
    back, _ = cam.project(origins + 0.1 * dirs)
    assert np.abs(back - [10.0, 20.0]).max() > 0.4


def test_depth_noise_follows_the_z_squared_law():
    """Planes at known depths through the TrueDepth model. The true depth is dithered
    uniformly over one millimetre, so the 1 mm rounding adds an independent uniform error
    of variance 1/12 mm^2, removed below. sigma(z) is fitted over 6 depths x ~40k pixels:
    the relative standard error of each sigma is ~1/sqrt(2n) = 0.4 %, so the fitted
    exponent must be 2 within 0.03 and each sigma / (k z^2) 1 within 2.5 % (>5 SE)."""
    rng = np.random.default_rng(0)
    depths = np.array([0.6, 0.9, 1.2, 1.6, 2.0, 2.5])
    shape = (200, 200)
    facing = np.zeros(shape + (3,))
    facing[..., 2] = 1.0
    sigmas = []
    for z0 in depths:
        truth_m = z0 + rng.uniform(-0.0005, 0.0005, shape)
        out = truedepth(truth_m, facing, -facing, np.ones(shape, bool), rng)
        valid = out > 0
        residual_mm = out[valid].astype(np.float64) - truth_m[valid] * 1000
        sigmas.append(np.sqrt(residual_mm.var() - 1 / 12) / 1000)
    sigmas = np.array(sigmas)
    slope, _ = np.polyfit(np.log(depths), np.log(sigmas), 1)
    assert slope == pytest.approx(2.0, abs=0.03), slope
    np.testing.assert_allclose(sigmas / (DEPTH_NOISE_K * depths**2), 1.0, atol=0.025)


def test_depth_holes_and_flying_pixels_at_the_configured_rates():
    """Vertical stripes 8 px wide alternating between 0.4 m and 2.4 m.

    Holes: away from the border (2 px) a pixel is a hole with p = 1 - (1 - s)^13 for
    seed rate s (a 13-pixel diamond); holes come in blobs, so the count's relative
    standard error is ~1/sqrt(seeds); the bound is 5 of them.
    Flying pixels: the two columns at each of the 49 stripe boundaries are discontinuity
    pixels (~39k); each flies with the configured rate, to a uniform depth between the two
    surfaces. A flying pixel is told from noise when it lies more than 6 sigma(z) from its
    own surface, so the detectable fraction is rate * (1 - 6 sigma(z) / jump); the binomial
    standard error is ~0.0025 and the bound is 5 of them. No pixel off a boundary flies.
    """
    rng = np.random.default_rng(1)
    h, w, near, far = 400, 400, 0.4, 2.4
    band = (np.arange(w) // 8) % 2
    z = np.where(band[None, :] == 0, near, far) * np.ones((h, 1))
    facing = np.zeros((h, w, 3))
    facing[..., 2] = 1.0
    grazing_normals = np.zeros((h, w, 3))
    grazing_normals[..., 0] = 1.0  # perpendicular to the view ray: |cos| = 0 < GRAZING_COS
    face = np.zeros((h, w), bool)
    face[:, :16] = True
    normals = np.where(face[..., None], grazing_normals, -facing)
    out = truedepth(z, facing, normals, face, rng).astype(np.float64) / 1000
    assert (out[:, :16] == 0).all(), "grazing face pixels are holes"
    # Holes, on the plain (non-grazing) part away from the border.
    inner = out[2:-2, 18:-2]
    p_hole = 1 - (1 - HOLE_SEED_RATE) ** 13
    seeds = HOLE_SEED_RATE * inner.size
    hole_rate = float((inner == 0).mean())
    assert abs(hole_rate / p_hole - 1) < 5 / np.sqrt(seeds), (hole_rate, p_hole)
    # Flying pixels.
    cols = np.arange(w)
    boundary = np.zeros(w, bool)
    boundary[1:] |= band[1:] != band[:-1]
    boundary[:-1] |= band[1:] != band[:-1]
    boundary[:16] = False
    own = z[0]
    sigma = DEPTH_NOISE_K * own**2
    valid = out > 0
    flying = valid & (np.abs(out - own[None, :]) > 6 * sigma[None, :])
    on_edge = valid & boundary[None, :]
    rate = FLYING_PIXEL_RATE * (1 - 6 * sigma / (far - near))
    expected = float(rate[None, :].repeat(h, 0)[on_edge].mean())
    measured = float(flying[on_edge].mean())
    n = int(on_edge.sum())
    assert n > 30000
    assert abs(measured - expected) < 5 * np.sqrt(expected * (1 - expected) / n), (measured, expected)
    assert not flying[valid & ~boundary[None, :] & (cols[None, :] >= 16)].any(), "no flying pixel off a boundary"


def test_mediapipe_finds_tiny_faces_and_embedding_agrees(tiny_subject, record_property):
    capture_dir, truth_dir = tiny_subject
    capture, truth = Capture.open(capture_dir), SubjectTruth.open(truth_dir)
    frames = []
    expressions = truth.expressions()
    for i, prompt in enumerate(capture.phone_expressions):
        gt = truth.phone(prompt)
        points = landmark_points(truth, truth.rig.pose(expressions["b"][i], expressions["gaze"][i]))
        for k in range(capture.phone_frame_count(prompt)):
            f = capture.read_phone_frame(prompt, k)
            depth = _phone_camera(capture, truth, prompt, k).to_camera(points)[:, 2]
            frames.append(PhoneFrame(f.rgb, gt["landmarks_2d"][k], gt["visible"][k], depth, f.intrinsics.fx))
    r = detection_errors(frames)
    record_property("mean_landmark_error_px", r["mean_of_frame_mean_px"])
    print(f"tiny: found {r['found']}/{len(frames)}; mean landmark error {r['mean_of_frame_mean_px']:.2f} px, "
          f"median {r['median_of_frame_median_mm']:.2f} mm")
    assert r["found"] >= 0.95 * len(frames)
    assert r["median_of_frame_median_mm"] < EMBEDDING_MEDIAN_MM


@pytest.mark.slow
def test_mediapipe_finds_standard_faces(record_property):
    frames = preset_frames("standard", 5)
    r = detection_errors(frames)
    record_property("mean_landmark_error_px", r["mean_of_frame_mean_px"])
    print("standard:", json.dumps(r))
    assert len(frames) == 240
    assert r["found"] >= 0.95 * len(frames)
    assert r["median_of_frame_median_mm"] < EMBEDDING_MEDIAN_MM


def test_parallel_generation_gives_the_same_subjects_at_the_config_fps(tmp_path):
    from dataclasses import replace

    from stages.synthesis.generate import generate
    from stages.synthesis.presets import ScriptTiming

    micro = replace(
        get_preset("tiny"), prompts=("neutral", "jaw_drop_max"), phone_frames_per_prompt=1, hmc_size=48,
        hmc_peaks_per_recording=1, fps=24.0,
        script=ScriptTiming(neutral_s=1.0, peak_s=0.4, eye_event_s=0.2, mouth_closed_s=0.2, speech_s=0.3, rest_s=0.05),
    )
    serial = generate(micro, 2, 3, tmp_path / "serial", progress=False, workers=1)
    parallel = generate(micro, 2, 3, tmp_path / "parallel", progress=False, workers=2)
    assert serial == parallel and len(set(serial)) == 2
    a, b = tmp_path / "serial" / "captures", tmp_path / "parallel" / "captures"
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors
    assert LabelTable(str(tmp_path / "parallel" / "ground_truth" / "labels")).subjects() == sorted(serial)
    # The rig's frame rate is the config's (24 Hz, not a hard-coded 30), and so are the
    # timestamps and the capture's validity.
    capture = Capture.open(a / serial[0])
    assert capture.rig.fps == 24.0
    assert validate_capture(a / serial[0]) == []
    steps = np.diff(SubjectTruth.open(tmp_path / "serial" / "ground_truth" / serial[0]).hmc("rec000")["timestamp_ns"])
    np.testing.assert_allclose(steps, 1e9 / 24, atol=1)
