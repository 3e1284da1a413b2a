"""HMC part of the generator: the fast IR renderer against the reference one, the
simulated keypoint detector's statistics, and the ``alt`` generator variant."""

from __future__ import annotations

import filecmp
from dataclasses import replace
from functools import lru_cache

import numpy as np
import pytest

from rigs.camera import rig_cameras
from rigs.definition import load_default_rig_definition
from rigs.face_model import load_ict_face_model
from rigs.raycast import Scene, make_gbuffer, vertex_normals
from rigs.rig import BlendshapeRig
from stages.synthesis.generate import HMC_LANDMARK_IDS, generate_subject
from stages.synthesis.hmc import default_hmc_rig
from stages.synthesis.ir import IrRenderer, SensorNoise, ir_albedo
from stages.synthesis.keypoints import KeypointDetector, detect_keypoints, draw_bias, near_border
from stages.synthesis.performance import hmc_timeline
from stages.synthesis.presets import ScriptTiming, get_preset
from stages.synthesis.texture import load_default_texture
from stages.synthesis.truth import SubjectTruth
from stages.synthesis.variants import VARIANTS
from storage.capture import Capture
from storage.validate import validate_capture

SIZE = 96  # image side of the render checks: every camera, ~92k rays per frame


@lru_cache(maxsize=1)
def _posed_frames() -> list[np.ndarray]:
    """Three posed generic-rig meshes in the headset frame: rest, jaw open + smile, a turned head."""
    model, d = load_ict_face_model(), load_default_rig_definition()
    rig = BlendshapeRig.generic(model, d)
    b = np.zeros(d.size, np.float32)
    open_smile = b.copy()
    open_smile[d.index("jawOpen")], open_smile[d.index("mouthSmile_L")] = 0.6, 0.8
    from scipy.spatial.transform import Rotation

    turned = Rotation.from_euler("xyz", [2.0, -3.0, 1.5], degrees=True).apply(rig.pose(b)) + [0.002, -0.001, 0.001]
    return [rig.pose(b), rig.pose(open_smile), turned.astype(np.float32)]


def _reference_radiance(cameras, texture, triangles, vertices) -> dict[str, np.ndarray]:
    """The renderer as it was before the speed-up (commit 5ea8c46), radiance before noise:
    one cast per camera, full-image g-buffers, float64 shading."""
    scene = Scene(vertices, triangles)
    normals = vertex_normals(vertices, triangles)
    out = {}
    for name, cam in cameras.items():
        origins, dirs = cam.pixel_rays()
        g = make_gbuffer(cam, origins, dirs, scene.cast(origins, dirs))
        n = g.interpolate(triangles, normals)
        n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-9)
        albedo = ir_albedo(texture.albedo(g, triangles))
        cos = np.clip(-(n * dirs).sum(-1), 0, 1)
        dist = np.where(g.hit, g.distance, 1.0)
        vignette = ((dirs @ cam.R_world_from_camera)[..., 2] ** 4).astype(np.float32)
        radiance = albedo * (0.15 + 0.85 * cos) * (0.05 / dist) ** 2 * 0.8 * vignette
        out[name] = np.where(g.hit, radiance, 0.01)
    return out


def _reference_image(radiance: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    if rng is not None:
        radiance = radiance + rng.normal(size=radiance.shape) * np.sqrt(0.0004 + 0.004 * np.clip(radiance, 0, None))
    return (np.clip(radiance, 0, 1) ** (1 / 2.2) * 255 + 0.5).astype(np.uint8)


def _renderer(variant: str = "default", size: int = SIZE) -> IrRenderer:
    v = VARIANTS[variant]
    return IrRenderer(rig_cameras(default_hmc_rig(size)), load_default_texture(), load_ict_face_model().triangles,
                      v.shading, v.noise, pattern_rng=np.random.default_rng(0))


def _compare_with_reference(renderer: IrRenderer, seed: int | None) -> tuple[int, int, int]:
    """(pixels that differ, pixels, largest difference) over every camera of three poses."""
    differing = total = largest = 0
    for verts in _posed_frames():
        images, _ = renderer.render(verts, None if seed is None else np.random.default_rng(seed))
        reference = _reference_radiance(renderer.cameras, renderer.texture, renderer.triangles, verts)
        rng = None if seed is None else np.random.default_rng(seed)
        for name, image in images.items():
            diff = np.abs(image.astype(int) - _reference_image(reference[name], rng))
            differing, total, largest = differing + int((diff > 0).sum()), total + diff.size, max(largest, int(diff.max()))
            assert (image > 60).mean() > 0.2, f"{name} sees the face"
    return differing, total, largest


def test_fast_renderer_matches_the_reference():
    """Every camera, three poses, without noise and with the same noise seed: the batched
    renderer gives the reference's pixels. It shades in float32 where the reference mixed
    in float64, so a pixel whose value sits on a rounding boundary could move by one grey
    level; measured: no pixel differs (the noise stream is the reference's: one float64
    standard normal per pixel, cameras in rig order)."""
    renderer = _renderer()
    for seed in (None, 5):
        differing, total, largest = _compare_with_reference(renderer, seed)
        assert largest <= 1 and differing / total < 1e-4, (seed, differing / total, largest)


def test_fast_renderer_keeps_the_noise_statistics():
    """Per camera, mean and standard deviation of the noisy image and of its noise (noisy
    minus noise-free) match the reference noise model's over 4 draws of other seeds.
    Bounds: std within 3 % (its standard error is ~0.4 % at 37k pixels per camera), image
    mean within 0.3 grey levels."""
    renderer = _renderer()
    verts = _posed_frames()[1]
    clean, _ = renderer.render(verts, None)
    reference = _reference_radiance(renderer.cameras, renderer.texture, renderer.triangles, verts)
    rng_new, rng_ref = np.random.default_rng(1), np.random.default_rng(2)
    new = {n: [] for n in clean}
    ref = {n: [] for n in clean}
    for _ in range(4):
        images, _ = renderer.render(verts, rng_new)
        for name in clean:
            new[name].append(images[name].astype(float))
            ref[name].append(_reference_image(reference[name], rng_ref).astype(float))
    for name, base in clean.items():
        a, b = np.stack(new[name]), np.stack(ref[name])
        assert abs(a.mean() - b.mean()) < 0.3, name
        assert a.std() == pytest.approx(b.std(), rel=0.03), name
        assert (a - base).std() == pytest.approx((b - base).std(), rel=0.03), name
    # The comparison can fail: 1.5 x the read noise (0.03) is seen.
    louder = IrRenderer(renderer.cameras, renderer.texture, renderer.triangles,
                        noise=SensorNoise(read_std=0.03))
    images, _ = louder.render(verts, np.random.default_rng(1))
    ratios = [(images[n].astype(float) - clean[n]).std() / (np.stack(ref[n]) - clean[n]).std() for n in clean]
    assert min(ratios) > 1.05, ratios


def _detector_case(detector: KeypointDetector, frames: int = 4000, points: int = 40, width: int = 200):
    """Truth pixels away from the border, all visible, at ``width`` x ``width``."""
    rng = np.random.default_rng(7)
    truth = np.broadcast_to(rng.uniform(40, width - 40, (points, 2)), (frames, points, 2)).copy()
    visible = np.ones((frames, points), bool)
    bias = draw_bias(detector, rng, 1, points, width)[0]
    pts, conf = detect_keypoints(truth, visible, bias, width, width, detector, rng)
    return truth, bias, pts, conf


@pytest.mark.parametrize("variant", ["default", "alt"])
def test_keypoint_bias_noise_and_outliers_follow_the_config(variant):
    """4000 frames x 40 points at 200 px width (figures scale by 0.5 from 400 px).
    Outliers lie >= outlier_px[0] * 0.5 >= 7.5 px from the truth; inliers within
    bias + 6 sigma of noise < 7.5 px (bias <= 3.5 x 0.5 x 3 sigma). The per-point median
    offset estimates the bias (standard error ~ 1.25 sigma / sqrt(4000) < 0.03 px);
    the inlier spread about it is noise_px (standard error < 1 %); the outlier rate is
    binomial over 160k points (bound: 5 standard errors)."""
    det = VARIANTS[variant].keypoints
    scale = 0.5
    truth, bias, pts, conf = _detector_case(det)
    assert np.isfinite(pts).all() and (conf >= det.confidence[0]).all() and (conf <= det.confidence[1]).all()
    err = pts - truth
    gross = np.linalg.norm(err - bias[None], axis=-1) > det.outlier_px[0] * scale - 0.5
    rate = gross.mean()
    assert abs(rate - det.outlier_rate) < 5 * np.sqrt(det.outlier_rate * (1 - det.outlier_rate) / gross.size), rate
    assert np.abs(np.median(err, axis=0) - bias).max() < 0.15
    inlier = err[~gross] - np.broadcast_to(bias, err.shape)[~gross]
    assert inlier.std() == pytest.approx(det.noise_px * scale, rel=0.03)
    assert bias.std() == pytest.approx(det.bias_px * scale, rel=0.25)  # 80 draws
    outliers = np.linalg.norm(err[gross], axis=-1)
    assert outliers.max() <= det.outlier_px[1] * scale + 1e-3


def test_keypoints_drop_at_the_border_and_where_occluded():
    det = KeypointDetector()
    width = height = 200
    margin = det.border_margin_px * width / 400  # 3 px
    truth = np.array([[[100.0, 100.0], [margin - 0.6, 100.0], [100.0, height - 0.5 - margin + 0.1], [margin, 50.0], [60.0, 60.0]]])
    visible = np.array([[True, True, True, True, False]])
    pts, conf = detect_keypoints(truth, visible, np.zeros((5, 2)), width, height, replace(det, outlier_rate=0.0), np.random.default_rng(0))
    assert list(np.isfinite(pts[0, :, 0])) == [True, False, False, True, False]
    assert list(conf[0] > 0) == [True, False, False, True, False]
    assert near_border(truth[0], width, height, margin).tolist() == [False, True, True, False, False]


def test_tiny_subject_keypoints_against_the_truth(tiny_subject):
    """The tiny subject's keypoints (160 px: figures x 0.4): hidden points and points at the
    border are missing (NaN, confidence 0), every other visible point is found, and the
    median error is that of bias plus noise: both Gaussian per axis with sigma 0.8 and
    0.6 px, so the error norm is Rayleigh with sigma 1.0 px, median 1.18 px."""
    capture_dir, truth_dir = tiny_subject
    truth = SubjectTruth.open(truth_dir).hmc("rec000")
    rec = Capture.open(capture_dir).recording("rec000")
    det = KeypointDetector()
    names = [str(n) for n in truth["cameras"]]
    errors, occluded_checked = [], 0
    for name in ("eye_left", "eye_right", "mouth_left", "mouth_right", "glabella"):
        c = names.index(name)
        pts, conf = rec.keypoints(name)
        true_px, visible = truth["landmarks_2d"][c], truth["visible"][c]
        assert pts.shape == true_px.shape and pts.shape[1] == len(HMC_LANDMARK_IDS)
        border = near_border(true_px, 160, 160, det.border_margin_px * 0.4)
        found = np.isfinite(pts[..., 0])
        np.testing.assert_array_equal(found, visible & ~border)
        np.testing.assert_array_equal(conf > 0, found)
        hidden_inside = ~visible & ~border
        occluded_checked += int(hidden_inside.sum())
        errors.append(np.linalg.norm(pts[found] - true_px[found], axis=-1))
    assert occluded_checked > 100, "some points are hidden by the face itself"
    errors = np.concatenate(errors)
    assert 0.9 < np.median(errors) < 1.5, np.median(errors)
    assert 0.003 < (errors > 15 * 0.4 - 2).mean() < 0.03  # 1 % outliers


def test_alt_variant_differs_where_it_should():
    """Shading and noise: the alt renderer's images of the same mesh differ in level and
    spread. Slip: two jumps and more drift. Identity: scaled and skewed draws of the same
    stream (checked on the subject below). Keypoints: larger errors (tested above)."""
    verts = _posed_frames()[0]
    default, alt = _renderer("default"), _renderer("alt")
    a, _ = default.render(verts, None)
    b, _ = alt.render(verts, None)
    diff = np.mean([np.abs(a[n].astype(int) - b[n]).mean() for n in a])
    assert diff > 5
    # Fixed-pattern noise: the alt sensor's noise-free background varies by column.
    bg = b["gt_boom_left"].astype(float)
    assert np.std(bg.mean(0)) > 0.5 and np.std(a["gt_boom_left"].astype(float).mean(0)) < np.std(bg.mean(0))
    d = load_default_rig_definition()
    timing = get_preset("tiny").script
    t0 = hmc_timeline(d, np.random.default_rng(5), ["jaw_drop_max"], timing, slip=VARIANTS["default"].slip)
    t1 = hmc_timeline(d, np.random.default_rng(5), ["jaw_drop_max"], timing, slip=VARIANTS["alt"].slip)
    np.testing.assert_array_equal(t0.b, t1.b)  # the performance is the same draw
    jumps = lambda t: int((np.linalg.norm(np.diff(t.head_t, axis=0), axis=1) > 2e-4).sum())  # noqa: E731
    assert jumps(t0) == 1 and jumps(t1) == 2


MICRO = replace(
    get_preset("tiny"), name="micro", prompts=("neutral", "jaw_drop_max"), phone_frames_per_prompt=1, phone_width=160,
    hmc_size=48, hmc_peaks_per_recording=1, fps=12.0,
    script=ScriptTiming(neutral_s=1.0, peak_s=0.5, eye_event_s=0.25, mouth_closed_s=0.25, speech_s=0.4, rest_s=0.1),
)


def test_alt_subject_is_deterministic_valid_and_has_its_identity_style(tmp_path):
    config = replace(MICRO, variant="alt")
    sid = generate_subject(config, 21, 0, tmp_path / "a", progress=False)
    generate_subject(config, 21, 0, tmp_path / "b", progress=False)
    a, b = tmp_path / "a" / "captures" / sid, tmp_path / "b" / "captures" / sid
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert len(files) > 100
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors
    assert validate_capture(a, deep=True) == []
    truth = SubjectTruth.open(tmp_path / "a" / "ground_truth" / sid)
    assert truth.meta["variant"] == "alt"
    style = VARIANTS["alt"].identity
    z = np.random.default_rng([21, 0]).normal(0.0, 1.0, 100)  # the default's identity draw
    expected = style.scale * (z + style.skew * (z**2 - 1) / 2)
    identity = np.load(tmp_path / "a" / "ground_truth" / sid / "identity.npz")["identity"]
    np.testing.assert_allclose(identity, expected, rtol=1e-5, atol=1e-6)


def test_cli_rejects_an_unknown_variant(tmp_path, capsys):
    from workflows.cli import main

    assert main(["synth", "--preset", "tiny", "--variant", "bogus", "--out", str(tmp_path / "x"), "--quiet"]) == 1
    assert "unknown generator variant 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
