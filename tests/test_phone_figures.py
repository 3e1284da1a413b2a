"""workflows/phone_figures.py on the tiny subject, with truth-built stand-ins for the artifacts."""

from __future__ import annotations

import numpy as np
import pytest

from rigs.raycast import vertex_normals
from stages.geometry_eval import face_region, place
from stages.synthesis.truth import SubjectTruth
from storage.capture import Capture
from workflows.phone_figures import (
    camera_from_pose,
    error_colours,
    fit_error_figure,
    frontal_camera,
    fused_figure,
    mask_figure,
    true_face_mask,
)


@pytest.fixture(scope="module")
def subject(tiny_subject):
    capture_dir, truth_dir = tiny_subject
    cap, truth = Capture.open(capture_dir), SubjectTruth.open(truth_dir)
    ex = truth.expressions()
    e = "jaw_drop_max"
    return cap, truth, e, ex["vertices"][[str(p) for p in ex["prompts"]].index(e)]


def test_true_face_region_holds_the_true_landmarks(subject) -> None:
    """The ray-cast true face part covers the visible true MediaPipe landmarks inside the
    oval (measured on frame 0 of jaw_drop_max: 100 % before the true rig gained
    person-specific style, 89.5 % since, seed 11); the IoU of the mask with itself is 1 and
    with nothing 0."""
    cap, truth, e, verts = subject
    intr, gt = cap.phone_intrinsics(e), truth.phone(e)
    mask = true_face_mask(verts, truth.rig.model, camera_from_pose(intr, gt["head_in_camera"][0]))
    assert mask.shape == (intr.height, intr.width) and 0.05 < mask.mean() < 0.8
    from stages.landmarks import FACE_OVAL

    inner = np.setdiff1d(np.arange(468), list(FACE_OVAL))  # the oval itself sits on the silhouette
    px = np.round(gt["landmarks_2d"][0][inner]).astype(int)
    vis = gt["visible"][0][inner]
    px, vis = px[vis], vis[vis]
    assert mask[px[:, 1], px[:, 0]].mean() > 0.85
    rgb = cap.read_phone_frame(e, 0).rgb
    img, iou = mask_figure(rgb, mask, mask)
    assert iou == 1.0 and img.shape == (intr.height, 2 * intr.width, 3)
    assert mask_figure(rgb, np.zeros_like(mask), mask)[1] == 0.0


def test_fused_scan_and_truth_render_alike_when_the_scan_is_the_truth(subject) -> None:
    """A "fused scan" that is the true mesh placed by the reference pose renders pixel for
    pixel as the true mesh does: scan and truth use one camera and one placement."""
    cap, truth, e, verts = subject
    pose = truth.phone(e)["head_in_camera"][1]
    intr = cap.phone_intrinsics(e)
    tri = truth.rig.model.triangles
    img = fused_figure(place(verts, pose), tri, verts, pose, tri, intr)
    w = intr.width
    assert img.shape == (intr.height, 2 * w, 3)
    left, right = img[40:, :w], img[40:, w:]  # below the labels
    assert (left != left[0, 0]).any() and np.array_equal(left, right)


def test_fit_error_colours_match_known_errors(subject) -> None:
    """A stand-in fit: the true mesh with a 2 mm bump (vertices within 12 mm of the nose
    tip pushed along their normals). The returned errors are 2 mm on the bump and ~0
    elsewhere (the rigid alignment moves the rest by < 0.1 mm, measured 0.03), and the
    rendered pixels there have the colour bar's colours for 2 mm and for 0 mm."""
    _, truth, _, verts = subject
    model = truth.rig.model
    verts = verts.astype(np.float64)
    region = face_region(model)
    tip = region[np.argmax(verts[region, 2])]
    bump = region[np.linalg.norm(verts[region] - verts[tip], axis=1) < 0.012]
    est = verts.copy()
    est[bump] += vertex_normals(verts, model.triangles)[bump] * 0.002
    img, err = fit_error_figure(est, verts, model)
    assert np.isnan(err[np.setdiff1d(np.arange(len(verts)), region)]).all()
    assert np.median(err[bump]) == pytest.approx(2.0, abs=0.1)
    rest = np.setdiff1d(region, bump)
    assert np.median(err[rest]) < 0.1
    cam = frontal_camera(verts[region])
    assert img.shape[0] == cam.height and img.shape[1] == 2 * cam.width + 90

    def colour_at(vertex: int) -> np.ndarray:
        ((x, y),), _ = cam.project(verts[vertex][None])
        return img[int(round(y)), int(round(x))].astype(float)

    assert np.abs(colour_at(tip) - error_colours(np.array([err[tip]]))[0] * 255).max() < 12
    assert np.abs(colour_at(tip) - error_colours(np.array([2.0]))[0] * 255).max() < 20
    cheek = rest[np.argmin(np.linalg.norm(verts[rest] - (verts[tip] + [0.045, 0.0, -0.03]), axis=1))]
    assert np.abs(colour_at(cheek) - error_colours(np.array([0.0]))[0] * 255).max() < 12


def test_true_albedo_in_uv_and_the_texture_figure(subject) -> None:
    """Texels of triangles the photo does not reach (weight 0 at every corner) and whose
    corners share one part colour get exactly that colour, tinted and sRGB-encoded, as the
    phone renderer draws it; the figure puts baked above true at one scale."""
    from rigs.uv_raster import rasterize_uv
    from stages.synthesis.texture import load_default_texture
    from workflows.phone_figures import texture_figure, true_albedo_uv

    _, truth, _, _ = subject
    model = truth.rig.model
    tex = load_default_texture()
    tri = np.flatnonzero(~model.part_triangle_mask("eyeball_left", "eyeball_right"))
    raster = rasterize_uv(model.uv, model.triangle_uv, 128, 4, tri)
    tint = np.asarray(truth.meta["tint"], np.float32)
    img = true_albedo_uv(raster, model, tint)
    assert img.shape == (128, 512, 3)
    corners = model.triangles[raster.triangle]  # (k, 3)
    flat = (tex.vertex_weight[corners].max(1) == 0) & (np.ptp(tex.vertex_albedo[corners], axis=1).max(1) == 0)
    assert flat.sum() > 100
    expected = (np.clip(tex.vertex_albedo[corners[flat, 0]] * tint, 0, 1) ** (1 / 2.2) * 255 + 0.5).astype(np.uint8)
    got = img.reshape(-1, 3)[raster.texel[flat]]
    assert np.abs(got.astype(int) - expected).max() <= 1
    baked = np.zeros((128, 512, 4), np.uint8)
    baked[..., :3], baked[:64, ..., 3] = img, 255  # top half "seen"
    fig = texture_figure(baked, img)
    assert fig.shape == (256, 512, 3)
    assert np.array_equal(fig[128 + 40:], img[40:]) and (fig[80:128] == 40).all()
