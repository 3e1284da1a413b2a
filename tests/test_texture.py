"""The UV texture: the UV rasteriser, a constructed textured quad, and the tiny subject's
phone frames baked with its true meshes and poses against the true albedo."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.errors import ConfigError, StageError
from pipeline.serialize import StageOutput, decode, encode
from rigs.camera import Camera
from rigs.uv_raster import model_uv_raster, rasterize_uv, uv_to_texel
from stages.texture import ATLAS_PARTS, TextureConfig, UvTexture, sample_vertices, texture_capture
from stages.texture_bake import (
    View,
    bake,
    camera_from_pose,
    linear_to_srgb,
    mesh_depth,
    near_silhouette,
    sample_texture,
    srgb_to_linear,
)

# ------------------------------------------------------------------- the UV rasteriser


def test_rasterized_square_covers_every_texel_once_with_exact_barycentrics() -> None:
    """Two triangles tiling the unit square cover all 16 x 16 texels, each exactly once, and
    interpolating the corners' UVs with the barycentrics lands on each texel's centre."""
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float64)
    tuv = np.array([[0, 1, 2], [0, 2, 3]])
    r = rasterize_uv(uv, tuv, 16, tiles=1)
    assert r.shape == (16, 16) and np.array_equal(r.texel, np.arange(256))
    centres = uv_to_texel(r.interpolate(tuv, uv), 16)
    assert np.abs(centres - np.stack([r.cols, r.rows], 1)).max() < 1e-5
    assert (r.barycentric >= 0).all() and np.allclose(r.barycentric.sum(1), 1)
    # v grows upward: the triangle (0, 2, 3) holds the top-left half, row 0 = v near 1
    assert r.triangle[0] == 1 and r.triangle[255] == 0


def test_rasterizer_rejects_bad_input_and_clips_to_the_atlas() -> None:
    from pipeline.errors import ModelError

    with pytest.raises(ModelError, match="triangle_uv indexes past"):
        rasterize_uv(np.zeros((3, 2)), np.array([[0, 1, 3]]), 8, tiles=1)
    with pytest.raises(ModelError, match="resolution"):
        rasterize_uv(np.zeros((3, 2)), np.array([[0, 1, 2]]), 0, tiles=1)
    # a triangle spilling into a second tile is clipped to the one-tile atlas
    r = rasterize_uv(np.array([[0.5, 0], [1.5, 0], [0.5, 1]]), np.array([[0, 1, 2]]), 8, tiles=1)
    assert r.cols.max() == 7 and len(r.texel) > 0


def test_ict_atlas_leaves_out_the_eyeballs_and_is_cached() -> None:
    """At 128 texels per tile: 4 tiles for head_mouth; no texel belongs to an eyeball
    triangle (their UVs overlap the face tile), and the raster is computed once."""
    from rigs.face_model import load_ict_face_model

    model = load_ict_face_model()
    r = model_uv_raster(model, 128, ATLAS_PARTS["head_mouth"])
    assert r.shape == (128, 512) and model_uv_raster(model, 128, ATLAS_PARTS["head_mouth"]) is r
    parts = {model.part_names[p] for p in np.unique(model.vertex_part[model.triangles[r.triangle, 0]])}
    assert parts == set(ATLAS_PARTS["head_mouth"])
    assert model_uv_raster(model, 128, ATLAS_PARTS["head"]).shape == (128, 256)


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="texture.min_cos must be in"):
        TextureConfig(min_cos=0.0)
    with pytest.raises(ConfigError, match="texture.resolution must be in"):
        TextureConfig(resolution=8)
    with pytest.raises(ConfigError):
        TextureConfig(atlas="eyes")  # type: ignore[arg-type]


def test_srgb_round_trip() -> None:
    x = np.linspace(0, 1, 101)
    assert np.abs(linear_to_srgb(srgb_to_linear(x)) - x).max() < 1e-5


# ---------------------------------------------------------- a constructed textured quad


QUAD_UV = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float64)
QUAD_TRIS = np.array([[0, 1, 2], [0, 2, 3]])
#: The quad: 10 cm square in the z = 0 plane of the head frame, facing +z.
QUAD = np.array([[-0.05, -0.05, 0], [0.05, -0.05, 0], [0.05, 0.05, 0], [-0.05, 0.05, 0]], np.float64)
CHECKER_COLOURS = np.array([[0.8, 0.2, 0.1], [0.1, 0.5, 0.9]])  # linear


def checker(uv: np.ndarray, squares: int = 4) -> np.ndarray:
    """(..., 3) linear colour of a squares x squares checker over the unit square."""
    cell = (np.floor(uv[..., 0] * squares) + np.floor(uv[..., 1] * squares)).astype(int) % 2
    return CHECKER_COLOURS[cell]


def photograph(camera: Camera, vertices: np.ndarray, triangles: np.ndarray, gain: float = 1.0,
               extra: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 sRGB image of the checker quad (UV = QUAD_UV), 9-sample anti-aliased;
    an ``extra`` (vertices, triangles) occluder is drawn grey."""
    from rigs.raycast import Scene

    scene = Scene(vertices, triangles, extras=[extra] if extra is not None else [])
    h, w = camera.height, camera.width
    acc = np.zeros((h, w, 3))
    offsets = (-1 / 3, 0, 1 / 3)
    for du in offsets:
        for dv in offsets:
            v, u = np.mgrid[0:h, 0:w].astype(np.float64)
            o, d = camera.pixel_rays(np.stack([u + du, v + dv], -1))
            hit = scene.cast(o, d)
            tri, bary = hit["triangle"], hit["barycentric"]
            on = tri >= 0
            uv = np.einsum("pkc,pk->pc", QUAD_UV[triangles[tri[on]]], bary[on])
            img = np.full((h, w, 3), 0.05)
            img[hit["geometry"] == 1] = 0.5
            img[on] = checker(uv) * gain
            acc += img
    return np.round(linear_to_srgb(acc / 9) * 255).astype(np.uint8)


def quad_camera(yaw_deg: float) -> Camera:
    yaw = np.deg2rad(yaw_deg)
    pos = 0.25 * np.array([np.sin(yaw), 0.0, np.cos(yaw)])
    return Camera.look_at(pos, np.zeros(3), np.array([0, 1.0, 0]), width=200, height=200, focal=400)


def away_from_edges(r, squares: int = 4, margin_texels: float = 1.5, border: bool = True) -> np.ndarray:
    """(k,) bool texels farther than ``margin_texels`` from a checker edge (and from the
    quad's border when ``border``)."""
    uv = np.stack([(r.cols + 0.5) / r.resolution, 1 - (r.rows + 0.5) / r.resolution], 1) * squares
    lines = np.round(uv)
    if not border:
        lines = np.clip(lines, 1, squares - 1)
    return np.abs(uv - lines).min(1) * r.resolution / squares > margin_texels


def texel_uv(r) -> np.ndarray:
    return np.stack([(r.cols + 0.5) / r.resolution, 1 - (r.rows + 0.5) / r.resolution], 1)


def test_checker_quad_bakes_back_to_the_checker() -> None:
    """A 4 x 4 checker quad seen frontally and at 35 degrees (200 x 200 px, 0.25 m, f = 400 px:
    the quad spans 160 px, the 64-texel map is undersampled 2.5x) bakes back to the checker.
    Measured: every texel more than 2 texels inside the border is seen by both views (the
    silhouette margin drops the outermost ones); away from the checker edges (1.5 texels) the
    largest error is 0.0037 (linear; 8-bit quantisation level), over all seen texels 0.016
    (checker edges: the images' anti-aliasing and the bilinear look-up). Summed weight
    median 1.65."""
    r = rasterize_uv(QUAD_UV, QUAD_TRIS, 64, tiles=1)
    views = [View(i, cam, photograph(cam, QUAD, QUAD_TRIS)) for i, cam in enumerate((quad_camera(0), quad_camera(35)))]
    colour, weight, count, rows = bake(r, QUAD_TRIS, [("quad", QUAD, views)], TextureConfig(exposure_compensation=False))
    assert [row["status"] for row in rows] == ["used", "used"]
    uv = texel_uv(r)
    inner = (np.minimum(uv, 1 - uv).min(1) * 64) > 2
    assert (count[inner] == 2).all() and (weight[inner] > 0).all()
    truth = checker(uv)
    far = away_from_edges(r)
    assert far.mean() > 0.5  # 12 of every 16 texels per axis
    assert np.abs(colour[far] - truth[far]).max() < 0.01
    seen = weight > 0
    assert np.abs(colour[seen] - truth[seen]).max() < 0.05
    # the weight is cos^2 summed: 1 for the frontal view plus cos(35 deg)^2 ~ 0.67, give or take perspective
    assert 1.5 < np.median(weight) < 1.8


def test_silhouette_margin_keeps_a_slightly_too_large_mesh_off_the_background() -> None:
    """The mesh is 2 % larger than the photographed quad (its border 1 mm = 1.6 px outside
    the true one, as a fit 1 mm off would be), on a dark background. Measured: with the
    default 1-pixel silhouette margin (and with 2) every seen texel away from the interior
    checker edges is within 0.0037 of the checker; with no margin the border texels sample
    the background: error 0.80."""
    r = rasterize_uv(QUAD_UV, QUAD_TRIS, 64, tiles=1)
    cam = quad_camera(0)
    views = [View(0, cam, photograph(cam, QUAD * 0.98, QUAD_TRIS))]
    truth = checker(texel_uv(r) * 0.98 + 0.01)  # the photographed quad's UV at each texel
    far = away_from_edges(r, border=False)
    errors = {}
    for margin in (1, 0):
        colour, weight, _, _ = bake(r, QUAD_TRIS, [("quad", QUAD, views)],
                                    TextureConfig(exposure_compensation=False, silhouette_margin_px=margin))
        sel = far & (weight > 0)
        errors[margin] = np.abs(colour[sel] - truth[sel]).max()
    assert errors[1] < 0.02 and errors[0] > 0.2, errors


def test_occluded_and_grazing_texels_are_not_observed() -> None:
    """A small grey quad 3 cm in front of the checker's lower-left part hides it from the
    frontal camera: the texels behind it are unseen (their colour would be grey); seen
    texels away from the edges still match the checker. A camera at 80 degrees (cos 0.17 <
    min_cos 0.3) sees nothing."""
    r = rasterize_uv(QUAD_UV, QUAD_TRIS, 64, tiles=1)
    occ = np.array([[-0.05, -0.05, 0.03], [0.0, -0.05, 0.03], [0.0, 0.0, 0.03], [-0.05, 0.0, 0.03]])
    verts = np.concatenate([QUAD, occ])
    tris = np.concatenate([QUAD_TRIS, QUAD_TRIS + 4])
    cam = quad_camera(0)
    views = [View(0, cam, photograph(cam, QUAD, QUAD_TRIS, extra=(occ, QUAD_TRIS))),
             View(1, quad_camera(80), photograph(quad_camera(80), QUAD, QUAD_TRIS))]
    colour, weight, _, rows = bake(r, tris, [("quad", verts, views)], TextureConfig(exposure_compensation=False))
    assert rows[1]["status"] == "skipped" and "no texel visible" in rows[1]["reason"]
    uv = np.stack([(r.cols + 0.5) / 64, 1 - (r.rows + 0.5) / 64], 1)
    # the occluder covers x, y in [-5, 0] cm at 22 cm from the camera: its shadow on the quad
    # (25 cm) reaches to 25/22 * 0 = 0 and starts at -5.7 cm: UV [0, 0.5]^2 is hidden
    hidden = (uv < 0.5 - 0.03).all(1)
    assert (weight[hidden] == 0).all()
    inner = (np.minimum(uv, 1 - uv).min(1) * 64) > 2  # the silhouette margin drops the border
    visible = (uv > 0.5 + 0.03).any(1) & inner
    assert (weight[visible] > 0).all()
    far = away_from_edges(r) & visible
    truth = checker(uv)
    assert np.abs(colour[far] - truth[far]).max() < 0.02


def test_mesh_depth_is_camera_z_and_silhouettes_are_found() -> None:
    """A plane 0.3 m in front of a camera rolled 90 degrees and shifted: the cast depth is
    camera z (0.3 at every hit pixel, not the ray length), inf off the plane; pixels within
    the margin of the plane's outline are near a silhouette, the rest are not."""
    from rigs.raycast import Scene

    cam = Camera.look_at(np.array([0.01, 0.02, 0.3]), np.array([0.01, 0.02, 0.0]), np.array([1.0, 0, 0]),
                         width=80, height=60, focal=100)
    plane = np.array([[-0.05, -0.05, 0], [0.05, -0.05, 0], [0.05, 0.05, 0], [-0.05, 0.05, 0]])
    depth = mesh_depth(Scene(plane, QUAD_TRIS), cam, 0, 0, 79, 59)
    hit = np.isfinite(depth)
    assert 0.1 < hit.mean() < 0.9 and np.abs(depth[hit] - 0.3).max() < 1e-6
    near = near_silhouette(depth, 2)
    assert near[~hit].all()
    inner = hit & ~near
    assert inner.sum() > 0.5 * hit.sum()
    from scipy.ndimage import binary_erosion

    # exactly the hit pixels more than 2 pixels (Chebyshev) from any pixel that misses
    assert np.array_equal(inner, binary_erosion(hit, np.ones((5, 5)), border_value=1))


def test_exposure_compensation_removes_the_seam_between_frames() -> None:
    """Two views of the checker, the second 30 % darker (auto-exposure), each seeing only part
    of the quad alone (a yaw of -60 / +60 degrees hides nothing, so the cameras are aimed at
    opposite halves). Measured: with compensation the texels seen only by the dark view
    match the checker as the others do (ratio spread < 2 %); without, they are 30 % darker."""
    r = rasterize_uv(QUAD_UV, QUAD_TRIS, 64, tiles=1)
    left = Camera.look_at(np.array([-0.02, 0, 0.2]), np.array([-0.02, 0, 0]), np.array([0, 1.0, 0]),
                          width=200, height=120, focal=400)
    right = Camera.look_at(np.array([0.02, 0, 0.2]), np.array([0.02, 0, 0]), np.array([0, 1.0, 0]),
                           width=200, height=120, focal=400)
    views = [View(0, left, photograph(left, QUAD, QUAD_TRIS)),
             View(1, right, photograph(right, QUAD, QUAD_TRIS, gain=0.7))]
    truth = checker(np.stack([(r.cols + 0.5) / 64, 1 - (r.rows + 0.5) / 64], 1))
    far = away_from_edges(r)
    for compensate, ok in ((True, True), (False, False)):
        colour, _, count, rows = bake(r, QUAD_TRIS, [("quad", QUAD, views)],
                                      TextureConfig(exposure_compensation=compensate))
        only_right = far & (count == 1) & (r.cols > 48)
        only_left = far & (count == 1) & (r.cols < 16)
        assert only_right.sum() > 50 and only_left.sum() > 50
        ratio_r = np.median(colour[only_right] / truth[only_right])
        ratio_l = np.median(colour[only_left] / truth[only_left])
        assert bool(abs(ratio_r / ratio_l - 1) < 0.02) is ok, (compensate, ratio_r, ratio_l)
        if compensate:
            assert abs(rows[1]["gain"] - 0.7) < 0.02


def test_sample_texture_ignores_unseen_texels() -> None:
    rgb = np.zeros((2, 2, 1), np.float32)
    rgb[:, 0] = 1.0
    weight = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    vals, conf = sample_texture(rgb, weight, np.array([[0.5, 0.5], [5.0, 5.0]]))
    assert vals[0, 0] == pytest.approx(1.0) and conf[0] == pytest.approx(0.5)
    assert vals[1, 0] == 0 and conf[1] == 0


# ------------------------------------------------- the tiny subject, true meshes and poses


def truth_inputs(capture_dir, truth_dir, *, drop_expression: str, unregistered: tuple[str, int]):
    """Fusion and refine artifacts built from the truth (``tests/phone_standins.py``'s fused
    stand-in: true relative poses, frame 0 the reference): refined meshes = the true
    expression meshes with scan_from_head = the true reference camera; one expression
    rejected by refine, one frame not registered by fusion."""
    from dataclasses import replace

    from stages.refine import RefinedExpression, RefinedSubject
    from stages.synthesis.truth import SubjectTruth
    from storage.capture import Capture
    from tests.phone_standins import fused_standin

    cap, truth = Capture.open(capture_dir), SubjectTruth.open(truth_dir)
    scans = fused_standin(truth)
    e, frame = unregistered
    if e:
        f = scans.expressions[e]
        scans.expressions[e] = replace(f, frames_used=f.frames_used[f.frames_used != frame])
    ex = truth.expressions()
    refined = {}
    for e, verts in zip([str(p) for p in ex["prompts"]], ex["vertices"], strict=True):
        if e != drop_expression:
            n = len(verts)
            ref_from_head = np.r_[truth.phone(e)["head_in_camera"][0], [[0, 0, 0, 1.0]]]
            refined[e] = RefinedExpression(verts.astype(np.float32), ref_from_head, np.zeros(n, np.float32), 0.0, 0.0, 1.0)
    neutral = cap.phone_expressions[0]
    subject = RefinedSubject(cap.subject_id, neutral, ex["vertices"][0].astype(np.float32), "refined", refined,
                             {drop_expression: "test: left out"} if drop_expression else {}, cap.phone_expressions)
    return cap, truth, scans.to_output(), subject.to_output()


@pytest.fixture(scope="module")
def baked(tiny_subject):
    capture_dir, truth_dir = tiny_subject
    from storage.capture import Capture

    names = Capture.open(capture_dir).phone_expressions
    cap, truth, fusion, refine = truth_inputs(capture_dir, truth_dir, drop_expression=names[3],
                                              unregistered=(names[4], 1))
    cfg = TextureConfig(resolution=256)
    output = texture_capture(capture_dir, fusion, refine, {"texture": cfg})
    return cap, truth, cfg, output, UvTexture.from_output(decode(*encode(output)))


def true_albedo_at_texels(truth, raster, model) -> np.ndarray:
    """(k, 3) linear albedo x the subject's skin tint at the raster's texels: the
    generator's own look-up (``workflows.phone_figures.true_albedo_uv``, 8-bit sRGB) decoded
    with its 2.2 gamma."""
    from workflows.phone_figures import true_albedo_uv

    img = true_albedo_uv(raster, model, np.asarray(truth.meta["tint"], np.float32))
    return (img.reshape(-1, 3)[raster.texel] / 255.0) ** 2.2


def test_baked_texture_matches_the_true_albedo(baked) -> None:
    """Baked with the true meshes and poses (4 expressions: 3 x 2 frames + 1 frame) at 256
    texels per tile. Measured on the seen texels of the face part (seed 11, 34 933 texels):
    per-channel correlation with the true albedo R 0.917, G 0.957, B 0.969 (the frames'
    shading, 0.35 + 0.75 Lambert, varies over the face and is baked in); median
    baked / albedo 0.86-0.93 (shading and exposure). The albedo flipped upside down in UV
    correlates 0.13-0.21 (mirrored left-right still 0.62-0.84: the face is symmetric).
    Bounds: R 0.87, G 0.92, B 0.92; ratio in [0.6, 1.2]; flipped G < 0.4."""
    from rigs.face_model import load_ict_face_model

    _, truth, cfg, _, tex = baked
    model = load_ict_face_model()
    r = model_uv_raster(model, cfg.resolution, cfg.parts)
    rgb, weight = tex.image()
    flat = rgb.reshape(-1, 3)[r.texel]
    seen = weight.ravel()[r.texel] > 0
    face = model.vertex_part[model.triangles[r.triangle, 0]] == model.part_names.index("face")
    sel = seen & face
    assert sel.sum() > 25000
    albedo = true_albedo_at_texels(truth, r, model)
    corr = [np.corrcoef(flat[sel, c], albedo[sel, c])[0, 1] for c in range(3)]
    assert corr[0] > 0.87 and corr[1] > 0.92 and corr[2] > 0.92, corr
    ratio = np.median(flat[sel] / np.maximum(albedo[sel], 1e-4), 0)
    assert ((ratio > 0.6) & (ratio < 1.2)).all(), ratio
    # negative control: the same albedo flipped upside down in UV no longer matches
    flipped = (r.resolution - 1 - r.rows) * r.shape[1] + r.cols
    lookup = np.full(r.shape[0] * r.shape[1], -1)
    lookup[r.texel] = np.arange(len(r.texel))
    m = lookup[np.where(r.cols < r.resolution, flipped, r.texel)]
    both = sel & (m >= 0)
    assert np.corrcoef(flat[both, 1], albedo[m[both], 1])[0, 1] < 0.4


def test_unseen_texels_are_marked(baked) -> None:
    """Texels that face backward (the back of the head) and those inside the mouth are not
    seen: alpha 0 and confidence 0. Measured: mouth socket 0 % seen, teeth 0.05 %, back of
    head (neutral normal z < -0.5) 0 %; face part 54 % (ears, under the chin unseen)."""
    from rigs.face_model import load_ict_face_model
    from rigs.raycast import vertex_normals

    _, _, cfg, _, tex = baked
    model = load_ict_face_model()
    r = model_uv_raster(model, cfg.resolution, cfg.parts)
    seen = tex.seen.ravel()[r.texel]
    assert np.array_equal(seen, tex.weight.ravel()[r.texel] > 0)
    assert np.array_equal(seen, tex.frames.ravel()[r.texel] > 0)
    assert not (tex.seen & ~tex.covered).any()
    part = model.vertex_part[model.triangles[r.triangle, 0]]
    frac = {p: seen[part == model.part_names.index(p)].mean() for p in ("face", "mouth_socket", "teeth")}
    assert frac["mouth_socket"] < 0.02 and frac["teeth"] < 0.05 and frac["face"] > 0.45, frac
    normals = r.interpolate(model.triangles, vertex_normals(model.neutral, model.triangles))
    back = normals[:, 2] < -0.5 * np.linalg.norm(normals, axis=1)
    assert back.sum() > 1000 and not seen[back].any()
    assert (tex.rgba[..., 3][~tex.seen] == 0).all()


def test_rows_record_what_was_used_and_why_not(baked) -> None:
    cap, _, _, output, tex = baked
    names = cap.phone_expressions
    assert tex.skipped == {names[3]: "refine: test: left out"}
    rows = {(r["expression"], r["frame_index"]): r for r in tex.rows}
    assert rows[(names[4], 1)]["status"] == "skipped" and rows[(names[4], 1)]["reason"] == "not registered by fusion"
    used = [k for k, r in rows.items() if r["status"] == "used"]
    assert len(used) == 7 and all(rows[k]["texels"] > 1000 for k in used)
    assert all(0.5 < rows[k]["gain"] < 1.5 for k in used)
    assert output.tables["rows"].num_rows == 10
    assert {rows[(names[3], i)]["reason"] for i in (0, 1)} == {"expression skipped: refine: test: left out"}
    assert output.meta["coverage"] == pytest.approx(tex.coverage(), abs=1e-6)


def test_artifact_round_trip_and_png_bytes_are_reproducible(baked) -> None:
    import cv2

    _, _, cfg, output, tex = baked
    png = output.arrays["texture_png"].tobytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and tex.png() == png
    bgra = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert bgra.shape == (cfg.resolution, 4 * cfg.resolution, 4)
    assert tex.weight.dtype == np.float32 and tex.frames.dtype == np.uint16


def test_vertex_colours_follow_the_true_albedo(baked) -> None:
    """Per-vertex samples of the texture (seam vertices averaged): measured correlation of
    the true per-vertex albedo R 0.915, G 0.917, B 0.936 on 5 412 seen face vertices;
    eyeball vertices (outside the atlas) have confidence 0."""
    from rigs.face_model import load_ict_face_model
    from stages.synthesis.texture import load_default_texture

    _, truth, _, _, tex = baked
    model = load_ict_face_model()
    rgb, conf = sample_vertices(tex, model)
    assert rgb.shape == (model.n_vertices, 3) and conf.shape == (model.n_vertices,)
    assert (conf[model.part_vertices("eyeball_left", "eyeball_right")] == 0).all()
    pt = load_default_texture()
    photo, _ = sample_texture(pt.photo_linear, np.ones(pt.photo.shape[:2], np.float32), pt.vertex_uv)
    albedo = pt.vertex_weight[:, None] * photo + (1 - pt.vertex_weight[:, None]) * pt.vertex_albedo
    sel = (conf > 0) & (model.vertex_part == model.part_names.index("face"))
    assert sel.sum() > 3000
    assert np.corrcoef(rgb[sel, 1], albedo[sel, 1])[0, 1] > 0.87


def test_bad_refine_input_is_a_stage_error(tiny_subject) -> None:
    capture_dir, truth_dir = tiny_subject
    cap, _, fusion, refine = truth_inputs(capture_dir, truth_dir, drop_expression="", unregistered=("", -1))
    e = cap.phone_expressions[0]
    with pytest.raises(StageError, match="lacks"):
        texture_capture(cap, fusion, StageOutput(arrays={}, meta=refine.meta), TextureConfig(resolution=64))
    arrays = dict(refine.arrays)
    arrays[f"{e}.vertices"] = arrays[f"{e}.vertices"][:100]
    with pytest.raises(StageError, match="vertices"):
        texture_capture(cap, fusion, StageOutput(arrays=arrays, meta=refine.meta), TextureConfig(resolution=64))
    with pytest.raises(StageError, match="rotation"):
        camera_from_pose(SimpleNamespace(width=4, height=4, fx=1, fy=1, cx=1, cy=1), np.diag([2.0, 1, 1, 1]))


def test_frame_rule_keeps_the_most_frontal_frames_and_bakes_reproducibly(tiny_subject) -> None:
    """max_frames_per_expression=1: per expression the frame whose optical axis is closest
    to the face's -z is used and the other is recorded as left out by the rule. Two runs,
    one observing the expressions in 2 worker processes and one in this process, give the
    same bytes."""
    capture_dir, truth_dir = tiny_subject
    cap, truth, fusion, refine = truth_inputs(capture_dir, truth_dir, drop_expression="", unregistered=("", -1))
    cfg = TextureConfig(resolution=64, max_frames_per_expression=1, workers=2)
    first, again = (texture_capture(cap, fusion, refine, c) for c in (cfg, dataclasses.replace(cfg, workers=1)))
    # reproducible: the same inputs give the same PNG bytes and confidence
    assert first.arrays["texture_png"].tobytes() == again.arrays["texture_png"].tobytes()
    assert np.array_equal(first.arrays["weight"], again.arrays["weight"])
    tex = UvTexture.from_output(first)
    for e in cap.phone_expressions:
        hic = truth.phone(e)["head_in_camera"]
        frontal = int(np.argmin(hic[:, 2, 2]))  # the optical axis in head coordinates is row 2 of R
        mine = {r["frame_index"]: r for r in tex.rows if r["expression"] == e}
        assert mine[frontal]["status"] == "used"
        assert mine[1 - frontal]["status"] == "skipped" and "most frontal" in mine[1 - frontal]["reason"]


def test_a_frame_without_a_finite_pose_is_a_record(tiny_subject) -> None:
    capture_dir, truth_dir = tiny_subject
    cap, _, fusion, refine = truth_inputs(capture_dir, truth_dir, drop_expression="", unregistered=("", -1))
    e = cap.phone_expressions[1]
    arrays = dict(refine.arrays)
    arrays[f"{e}.scan_from_head"] = np.full((4, 4), np.nan)
    tex = UvTexture.from_output(texture_capture(cap, fusion, StageOutput(arrays=arrays, meta=refine.meta, tables=refine.tables),
                                                TextureConfig(resolution=64)))
    mine = [r for r in tex.rows if r["expression"] == e]
    assert [r["status"] for r in mine] == ["skipped", "skipped"] and "not finite" in mine[0]["reason"]
    assert tex.skipped == {e: "no frame contributed (see its rows)"}
    assert sum(r["status"] == "used" for r in tex.rows) == 2 * (len(cap.phone_expressions) - 1)
