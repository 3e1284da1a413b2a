"""Cameras against OpenCV: both lens models, wide-angle lenses, exact inverses, rig.json."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from pipeline.errors import CaptureError, ModelError, PgtError
from rigs.camera import Camera, PinholeIntrinsics
from rigs.lens import Lens, LensInversionError, inversion_problem
from storage.capture import Capture
from storage.capture_types import HmcCamera, HmcRig
from storage.capture_writer import CaptureWriter
from storage.hmc_schema import parse_rig, rig_to_json
from storage.validate import validate_capture
from tests.capture_factory import make_capture

W = H = 400
#: The issue's headset lens: strong barrel distortion at f = 150 px on 400 x 400.
BARREL = PinholeIntrinsics(W, H, 150.0, 150.0, 199.5, 199.5)
BARREL_K = np.array([-0.3, 0.1, 0.0, 0.0, 0.0])
#: A fisheye with a ~190 degree diagonal field of view (corners 95 degrees off axis).
FISHEYE = PinholeIntrinsics(W, H, 178.0, 176.0, 201.0, 198.0)
FISHEYE_K = np.array([-0.02, 0.003, -0.0005, 0.0001])
EXACT = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 1000, 1e-15)
PIXELS = np.stack(np.meshgrid(np.arange(W, dtype=float), np.arange(H, dtype=float)), -1)


def _cv2_project(cam: Camera, points: np.ndarray) -> np.ndarray:
    """OpenCV's projection of world points through ``cam`` (its pose as rvec, tvec)."""
    r_cw = cam.R_world_from_camera.T
    rvec = Rotation.from_matrix(r_cw).as_rotvec()
    tvec = -r_cw @ cam.t_world_from_camera
    obj = points.reshape(-1, 1, 3).astype(np.float64)
    if cam.model == "opencv_fisheye":
        pix, _ = cv2.fisheye.projectPoints(obj, rvec, tvec, cam.K, cam.distortion)
    else:
        pix, _ = cv2.projectPoints(obj, rvec, tvec, cam.K, cam.distortion)
    return pix.reshape(*points.shape[:-1], 2)


def _posed(intr: PinholeIntrinsics, k: np.ndarray, model: str = "opencv") -> Camera:
    rot = Rotation.from_rotvec([0.3, -0.5, 0.2]).as_matrix()
    return Camera(intr, k, rot, np.array([0.05, -0.02, 0.1]), model)


@pytest.mark.parametrize(
    "k",
    [BARREL_K, np.array([0.3, 0.0, 0.0, 0.0, 0.0]), np.array([-0.3, 0.1, 0.004, -0.006, 0.002])],
    ids=["barrel", "positive-k1", "barrel-tangential"],
)
def test_opencv_pixel_rays_reproject_exactly_through_opencv(k: np.ndarray) -> None:
    # Today's fixed-point undistortion got 18.5 % of these rays wrong by up to 265 px
    # (barrel) and overflowed to NaN on 16 % (positive k1).
    cam = _posed(BARREL, k)
    origins, dirs = cam.pixel_rays()
    assert np.isfinite(dirs).all()
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=-1), 1.0, atol=1e-12)
    points = origins + 0.3 * dirs
    ours, depth = cam.project(points)
    assert (depth > 0).all()
    assert np.abs(ours - PIXELS).max() < 1e-6
    assert np.abs(_cv2_project(cam, points) - PIXELS).max() < 1e-6


def test_opencv_undistort_matches_opencv_where_its_iteration_converges() -> None:
    # A wide-angle lens with tangential terms that OpenCV's own iteration can invert.
    intr = PinholeIntrinsics(W, H, 190.0, 188.0, 203.0, 196.0)
    k = np.array([-0.12, 0.015, 0.002, -0.003, 0.0005])
    cam = Camera(intr, k)
    dirs, valid = cam.unproject()
    assert valid.all()
    ref = cv2.undistortPointsIter(PIXELS.reshape(-1, 1, 2), intr.K, k, None, None, EXACT)
    ref = ref.reshape(H, W, 2)
    np.testing.assert_allclose(dirs[..., :2] / dirs[..., 2:], ref, atol=1e-9)
    # Projection of arbitrary points in front of a posed camera, against cv2.projectPoints.
    posed = _posed(intr, k)
    rng = np.random.default_rng(0)
    cam_pts = np.c_[rng.uniform(-1.0, 1.0, (500, 2)), np.ones(500)] * rng.uniform(0.05, 2.0, (500, 1))
    world = cam_pts @ posed.R_world_from_camera.T + posed.t_world_from_camera
    np.testing.assert_allclose(posed.project(world)[0], _cv2_project(posed, world), atol=1e-9)


def test_fisheye_matches_opencv_fisheye_and_round_trips_past_90_degrees() -> None:
    cam = _posed(FISHEYE, FISHEYE_K, "opencv_fisheye")
    origins, dirs = cam.pixel_rays()
    local = dirs @ cam.R_world_from_camera  # camera-frame directions
    theta = np.degrees(np.arctan2(np.hypot(local[..., 0], local[..., 1]), local[..., 2]))
    assert 94.0 < theta.max() < 96.0  # a ~190 degree diagonal field of view
    ours, _ = cam.project(origins + 0.2 * dirs)
    assert np.abs(ours - PIXELS).max() < 1e-6  # exact over the whole image, corners included
    # OpenCV's fisheye functions work on X/Z, so compare where Z is well positive.
    front = theta < 80.0
    assert np.abs(_cv2_project(cam, (origins + 0.2 * dirs)[front]) - PIXELS[front]).max() < 1e-6
    ref = cv2.fisheye.undistortPoints(
        PIXELS[front].reshape(-1, 1, 2), cam.K, FISHEYE_K, criteria=EXACT
    ).reshape(-1, 2)
    np.testing.assert_allclose(local[front][:, :2] / local[front][:, 2:], ref, atol=1e-9)
    # Projection of arbitrary points, against cv2.fisheye.projectPoints.
    rng = np.random.default_rng(1)
    cam_pts = np.c_[rng.uniform(-3.0, 3.0, (500, 2)), np.ones(500)] * rng.uniform(0.05, 2.0, (500, 1))
    world = cam_pts @ cam.R_world_from_camera.T + cam.t_world_from_camera
    np.testing.assert_allclose(cam.project(world)[0], _cv2_project(cam, world), atol=1e-9)


@pytest.mark.parametrize(
    "intr, k, model, t_max",
    [
        (BARREL, np.array([-0.5, 0.0, 0.0, 0.0, 0.0]), "opencv", np.sqrt(2 / 3)),
        (FISHEYE, np.array([-0.2, 0.0, 0.0, 0.0]), "opencv_fisheye", np.sqrt(1 / 0.6)),
    ],
)
def test_non_invertible_lens_raises_a_clear_error_or_gives_a_mask(
    intr: PinholeIntrinsics, k: np.ndarray, model: str, t_max: float
) -> None:
    cam = Camera(intr, k, model=model)
    assert cam.lens.t_max == pytest.approx(t_max, rel=1e-12)  # g'(t) = 1 + 3 k1 t^2 = 0
    with pytest.raises(LensInversionError, match=f"invertible region of the {model} lens"):
        cam.pixel_rays()
    assert issubclass(LensInversionError, ModelError) and issubclass(LensInversionError, PgtError)
    dirs, valid = cam.unproject()
    assert valid[H // 2, W // 2] and not valid[0, 0]
    assert np.isnan(dirs[~valid]).all() and np.isfinite(dirs[valid]).all()
    # The valid pixels are exact, and they are exactly those below the fold radius.
    rho = np.hypot((PIXELS[..., 0] - intr.cx) / intr.fx, (PIXELS[..., 1] - intr.cy) / intr.fy)
    np.testing.assert_array_equal(valid, rho < cam.lens.rho_max)
    assert np.abs(cam.project(dirs[valid])[0] - PIXELS[valid]).max() < 1e-6
    assert "not invertible over the image" in inversion_problem(cam.lens, intr)


def test_lens_rejects_wrong_coefficients() -> None:
    with pytest.raises(ModelError, match="needs 4 finite coefficients"):
        Lens("opencv_fisheye", np.zeros(5))
    with pytest.raises(ModelError, match="needs 5 finite coefficients"):
        Camera(BARREL, np.array([0.1, np.nan, 0, 0, 0]))
    with pytest.raises(ModelError, match="unknown lens model"):
        Lens("kb8", np.zeros(4))


# ------------------------------------------------------------------------------- rig.json


def _fisheye_rig() -> HmcRig:
    cam = Camera.look_at(
        np.zeros(3), np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0]),
        width=64, height=64, focal=28.0, distortion=FISHEYE_K, model="opencv_fisheye",
    )  # fmt: skip
    return HmcRig("fisheye-1", 30.0, (
        HmcCamera("eye_left", "embedded", True, cam.intrinsics, cam.distortion,
                  cam.R_world_from_camera, cam.t_world_from_camera, "opencv_fisheye"),
    ))  # fmt: skip


def test_fisheye_rig_round_trips_through_the_writer(tmp_path: Path) -> None:
    rig = _fisheye_rig()
    path = CaptureWriter(tmp_path / "subj", "subj").write_rig(rig)
    obj = json.loads(path.read_text())
    assert obj["cameras"][0]["model"] == "opencv_fisheye" and len(obj["cameras"][0]["distortion"]) == 4
    assert parse_rig(obj, path) == rig


def test_rig_json_lens_model_is_validated_and_loaded(tmp_path: Path) -> None:
    made = make_capture(tmp_path)
    rig_path = made.layout.rig
    obj = json.loads(rig_path.read_text())
    assert all("model" in c for c in obj["cameras"])  # the writer states the model
    del obj["cameras"][1]["model"]  # existing captures have none: opencv by default
    obj["cameras"][0].update(model="opencv_fisheye", distortion=FISHEYE_K.tolist())
    rig_path.write_text(json.dumps(obj))
    assert validate_capture(made.root, deep=False) == []
    rig = Capture.open(made.root).rig
    assert rig.cameras[0].model == "opencv_fisheye"
    np.testing.assert_array_equal(rig.cameras[0].distortion, FISHEYE_K)
    assert rig.cameras[1].model == "opencv" and rig.cameras[1] == made.rig.cameras[1]

    name = obj["cameras"][0]["name"]
    bad = {
        "coefficient count": (dict(distortion=[0.0] * 5), '"distortion" must be 4 finite numbers'),
        "unknown model": (dict(model="kb"), 'field "model" must be one of opencv, opencv_fisheye'),
        "not invertible": (dict(distortion=[-0.5, 0, 0, 0]), "lens is not invertible over the image"),
    }
    for case, (edit, message) in bad.items():
        broken = json.loads(json.dumps(obj))
        broken["cameras"][0].update(edit)
        rig_path.write_text(json.dumps(broken))
        errors = [e for e in validate_capture(made.root, deep=False) if Path(e.path) == rig_path]
        assert len(errors) == 1, case
        assert f"cameras[0] ({name})" in errors[0].problem and message in errors[0].problem, case
        with pytest.raises(CaptureError, match="rig.json") as info:
            parse_rig(broken, rig_path)
        assert info.value.path == str(rig_path) and message in info.value.problem, case
    assert rig_to_json(rig)["cameras"][0]["distortion"] == FISHEYE_K.tolist()
