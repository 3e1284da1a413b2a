"""The joint morphable-model fit: constructed scans with known truth, the tiny subject, the artifact."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from pipeline.errors import ConfigError, StageError
from pipeline.serialize import StageOutput, decode, encode
from rigs.camera import Camera
from rigs.definition import load_default_rig_definition
from rigs.deformable import DTYPE, LinearFaceModel, landmark_points, project, so3_exp
from rigs.face_model import load_ict_face_model
from rigs.raycast import Scene, vertex_normals
from stages.fit import FitConfig, FittedSubject, fit_capture, fit_subject
from stages.fit_solve import ScanObservation, fit_scans

FACE_CENTRE = np.array([0.0, 0.01, 0.06])
#: Image width of the constructed scans' cameras (60 deg field of view: ~1.3 mm pixels at 0.32 m).
WIDTH = 260


# ------------------------------------------------------------------ torch helpers


def test_so3_exp_matches_scipy_and_is_smooth_at_zero() -> None:
    rng = np.random.default_rng(0)
    r = np.concatenate([rng.normal(size=(5, 3)), np.zeros((1, 3)), 1e-9 * np.ones((1, 3))])
    got = so3_exp(torch.as_tensor(r, dtype=DTYPE)).numpy()
    np.testing.assert_allclose(got, Rotation.from_rotvec(r).as_matrix(), atol=1e-12)
    x = torch.zeros(3, dtype=DTYPE, requires_grad=True)
    (g,) = torch.autograd.grad(so3_exp(x)[0, 1], x)  # d R01 / d r at 0 = -e_z
    np.testing.assert_allclose(g.numpy(), [0.0, 0.0, -1.0], atol=1e-12)


def test_landmarks_and_projection_match_numpy_and_camera() -> None:
    fm = load_ict_face_model()
    emb = fm.embeddings["mediapipe478"]
    v = fm.neutral.astype(np.float64)
    got = landmark_points(torch.as_tensor(v), emb, fm.triangles).numpy()
    np.testing.assert_allclose(got, emb.points(v, fm.triangles), atol=1e-12)
    cam = _camera(0.2, -0.1)
    px, _ = cam.project(got)
    T = _cam_from_head(cam)
    pc = got @ T[:3, :3].T + T[:3, 3]
    np.testing.assert_allclose(project(torch.as_tensor(pc), torch.as_tensor(cam.K)).numpy(), px, atol=1e-9)


def test_linear_model_is_the_rig_order_and_subset_agrees() -> None:
    fm, d = load_ict_face_model(), load_default_rig_definition()
    m = LinearFaceModel(fm, d)
    assert (m.n_identity, m.n_expression, m.n_articulation) == (100, 53, 0) and m.expression_bounds == (0, 1)
    c = torch.as_tensor(np.random.default_rng(1).normal(size=100))
    w = torch.zeros(2, 53, dtype=DTYPE)
    w[1, d.index("jawOpen")] = 1.0
    v = m.vertices(c, w, torch.zeros(2, 0)).numpy()
    np.testing.assert_allclose(v[0], fm.identity_shape(c.numpy()), atol=1e-7)
    np.testing.assert_allclose(v[1] - v[0], fm.expression_basis[fm.expression_names.index("jawOpen")], atol=1e-7)
    ids = np.array([5, 17, 20000])
    np.testing.assert_allclose(m.subset(ids).vertices(c, w, torch.zeros(2, 0)).numpy(), v[:, ids], atol=1e-12)


def test_robust_weights_are_the_kernels_derivatives() -> None:
    from stages.fit_gn import robust_weight
    from stages.fit_solve import robust

    x2 = torch.tensor([0.0, 0.3, 0.999, 1.5, 9.0, 100.0], dtype=DTYPE, requires_grad=True)
    for kind in ("geman_mcclure", "huber", "l2"):
        (g,) = torch.autograd.grad(robust(x2, kind).sum(), x2)
        np.testing.assert_allclose(robust_weight(x2.detach(), kind).numpy(), g.numpy(), rtol=1e-6, err_msg=kind)
    assert float(robust(torch.tensor(1e6, dtype=DTYPE), "geman_mcclure")) < 1.0  # outliers saturate


def test_forward_mode_jacobian_of_a_model_without_its_own_matches_the_bases() -> None:
    """The path a model without ``jacobian`` (FLAME's LBS) takes: one JVP per parameter."""
    from rigs.deformable import vertex_jacobian

    sub = _model().subset(np.array([3, 500, 7000]))

    class Plain:  # the protocol's attributes only: no jacobian, no subset
        n_identity, n_expression, n_articulation = sub.n_identity, sub.n_expression, 0

        def vertices(self, c, w, a):
            return sub.vertices(c, w, a)

    c, w = torch.zeros(sub.n_identity, dtype=DTYPE), torch.rand(2, sub.n_expression, dtype=DTYPE)
    got = vertex_jacobian(Plain(), c, w, torch.zeros(2, 0, dtype=DTYPE))
    want = sub.jacobian(c, w)
    assert got[0].shape == (2, 3, 3, sub.n_identity) and got[2].shape == (2, 3, 3, 0)
    for g, x in zip(got[:2], want[:2], strict=True):
        np.testing.assert_allclose(g.numpy(), x.expand_as(g).numpy(), atol=1e-12)


# -------------------------------------------------------------- constructed scans


def _camera(yaw: float, pitch: float, d: float = 0.32, width: int = WIDTH) -> Camera:
    direction = np.array([np.cos(pitch) * np.sin(yaw), np.sin(pitch), np.cos(pitch) * np.cos(yaw)])
    return Camera.look_at(FACE_CENTRE + d * direction, FACE_CENTRE, np.array([0.0, 1.0, 0.0]),
                          width=width, height=width * 4 // 3, focal=(width / 2) / np.tan(np.deg2rad(30)))


def _cam_from_head(cam: Camera) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = cam.R_world_from_camera.T
    T[:3, 3] = -cam.R_world_from_camera.T @ cam.t_world_from_camera
    return T


def _scans(S: int, seed: int, outliers: float = 0.0, yaw: float | None = None, detector=None):
    """S scans of a known subject: identity with 10 non-zero of its first 20 coefficients,
    each scan a prompt's art prior plus 4 random extra activations, a random head pose.

    Each scan is the ray-cast depth of one camera (face-region pixels, ~8.5k points at
    ~1.7 mm spacing, exact normals) with a second camera 7 deg away for the landmarks (the
    true embedded points projected). ``outliers`` of the points are moved along their ray
    by 3-20 mm, in front of or behind the surface (flying-pixel-like). ``yaw`` (radians)
    turns the heads that far, alternately left and right, instead of up to 17 deg.
    ``detector`` (a LandmarkEmbedding) places the observed landmarks instead of the
    model's embedding (a detector with its own idea of where the points are).
    """
    rng = np.random.default_rng(seed)
    fm, d = load_ict_face_model(), load_default_rig_definition()
    m = _model()
    c = np.zeros(m.n_identity)
    c[rng.choice(20, 10, replace=False)] = rng.normal(0, 1, 10)
    prompts = d.prompts[:S]
    W = np.stack([d.art_prior_vector(p.name) for p in prompts]).astype(np.float64)
    for s in range(S):
        extra = rng.choice(m.n_expression, 4, replace=False)
        W[s, extra] = np.clip(W[s, extra] + rng.uniform(0.1, 0.4, 4), 0, 1)
    with torch.no_grad():
        V = m.vertices(torch.as_tensor(c), torch.as_tensor(W), torch.zeros(S, 0)).numpy()
    face = np.zeros(fm.n_vertices, bool)
    face[fm.fitting_vertices] = True
    face_tri = face[fm.triangles].any(1)
    obs, poses = [], []
    for s in range(S):
        turn, pitch = rng.uniform(-0.3, 0.3), rng.uniform(-0.15, 0.15)
        turn = turn if yaw is None else yaw * (-1) ** s
        cams = [_camera(turn, pitch), _camera(turn + 0.12, pitch - 0.05)]
        T = [_cam_from_head(cam) for cam in cams]
        pts, normals, border = [], [], []
        for cam in cams:  # both frames' depth, in the reference frame
            g = Scene(V[s], fm.triangles).render(cam)
            keep = g.hit & face_tri[np.where(g.hit, g.triangle, 0)]
            nrm = g.interpolate(fm.triangles, vertex_normals(V[s], fm.triangles))[keep].astype(np.float64)
            pts.append(g.points[keep].astype(np.float64) @ T[0][:3, :3].T + T[0][:3, 3])
            normals.append(nrm @ T[0][:3, :3].T)
            pad = np.pad(keep, 1)
            inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
            border.append((keep & ~inner)[keep])
        pts, normals, border = np.concatenate(pts), np.concatenate(normals), np.concatenate(border)
        if outliers:
            k = int(outliers * len(pts))
            idx = rng.choice(len(pts), k, replace=False)
            shift = rng.uniform(3e-3, 20e-3, k) * rng.choice([-1.0, 1.0], k)
            pts[idx] += pts[idx] / np.linalg.norm(pts[idx], axis=1, keepdims=True) * shift[:, None]
        lm = (detector or fm.embeddings["mediapipe478"]).points(V[s], fm.triangles)
        obs.append(ScanObservation(
            prompts[s].name, pts, normals, border, cams[0].K,
            np.stack([cam.project(lm)[0] for cam in cams]), np.stack([T[0] @ np.linalg.inv(t) for t in T]), 0,
            d.art_prior_vector(prompts[s].name).astype(np.float64)))
        poses.append(T[0])
    return obs, {"c": c, "W": W, "T": np.stack(poses), "V": V}


_MODEL: list[LinearFaceModel] = []


def _model() -> LinearFaceModel:
    if not _MODEL:
        from stages.fit import default_model

        _MODEL.append(default_model())
    return _MODEL[0]


def _errors(result, truth) -> dict[str, np.ndarray]:
    """Per-scan pose errors (deg, mm) and fitting-vertex errors (mm) in each scan's frame."""
    fv = _model().fitting_vertices
    T, Tt = result.scan_from_head, truth["T"]
    rot = np.rad2deg(Rotation.from_matrix(T[:, :3, :3] @ np.transpose(Tt[:, :3, :3], (0, 2, 1))).magnitude())
    trans = np.linalg.norm(T[:, :3, 3] - Tt[:, :3, 3], axis=1) * 1e3
    posed = np.einsum("sij,svj->svi", T[:, :3, :3], result.vertices[:, fv]) + T[:, None, :3, 3]
    true = np.einsum("sij,svj->svi", Tt[:, :3, :3], truth["V"][:, fv]) + Tt[:, None, :3, 3]
    return {"rot": rot, "trans": trans, "vert": np.linalg.norm(posed - true, axis=2) * 1e3}


#: Noise-free data: weak priors (the defaults, 1e-3, pull the identity toward the mean).
CLEAN = FitConfig(identity_prior=1e-5, expression_prior=1e-5)


@pytest.fixture(scope="module")
def clean_scans():
    return _scans(3, seed=0)


def test_fit_recovers_identity_weights_and_poses_from_noise_free_scans(clean_scans) -> None:
    """Measured (3 scans, seed 0, Gauss-Newton, 3000 sampled vertices): rotation 0.05 deg,
    translation 0.10 mm; fitting vertices in the scan frame mean 0.12 mm, p99 0.39 mm
    (the sampled scan's ~1.3 mm spacing: model vertices pair with the nearest sample and its
    smooth normal); identity coefficients of the ten true modes within 0.064, weights within
    0.045; scan median residual 0.015-0.017 mm, landmarks 0.05-0.07 px. Bounds leave ~2x."""
    obs, truth = clean_scans
    r = fit_scans(_model(), obs, CLEAN)
    err = _errors(r, truth)
    assert err["rot"].max() < 0.15 and err["trans"].max() < 0.25, (err["rot"], err["trans"])
    assert err["vert"].mean() < 0.2 and np.percentile(err["vert"], 99) < 0.8, err["vert"].mean()
    true_modes = np.flatnonzero(truth["c"])
    assert np.abs(r.identity[true_modes] - truth["c"][true_modes]).max() < 0.15
    assert np.abs(r.weights - truth["W"]).max() < 0.1
    assert (r.weights >= 0).all() and (r.weights <= 1).all()
    assert (r.scan_median_mm < 0.04).all() and (r.landmark_px < 0.15).all()
    assert r.vertices.shape == (3, _model().n_vertices, 3) and r.vertices.dtype == np.float32


def test_without_landmark_initialisation_the_scan_term_finds_the_pose(clean_scans) -> None:
    """The ablation's start (template centred on the scan, facing the camera; heads turned
    up to 17 deg, pitched up to 9 deg here) converges to the same fit. Measured: vertices
    mean 0.12 mm, rotation 0.05 deg."""
    obs, truth = clean_scans
    err = _errors(fit_scans(_model(), obs, dataclasses.replace(CLEAN, landmark_init=False)), truth)
    assert err["rot"].max() < 0.15 and err["vert"].mean() < 0.2, (err["rot"], err["vert"].mean())


def test_landmark_initialisation_is_what_copes_with_large_head_turns() -> None:
    """Heads turned 46 deg, alternately left and right (the ablation's case). Measured: with
    the landmark start vertices mean 0.11 mm; from the centred, camera-facing start 48 mm
    (rotation 41 deg off: the scan term alone falls into a wrong minimum). At 34 deg: 0.10
    vs 40 mm; at 20 deg: 0.12 vs 2.9 mm."""
    obs, truth = _scans(3, seed=0, yaw=0.8)
    good = _errors(fit_scans(_model(), obs, FitConfig()), truth)
    bad = _errors(fit_scans(_model(), obs, FitConfig(landmark_init=False)), truth)
    assert good["vert"].mean() < 0.25 and good["rot"].max() < 0.15, (good["vert"].mean(), good["rot"])
    assert bad["vert"].mean() > 5.0 and bad["rot"].max() > 10.0, (bad["vert"].mean(), bad["rot"])


def test_lbfgs_solver_fits_too(clean_scans) -> None:
    """``solver="lbfgs"`` on the first scan alone. Measured: vertices mean 0.29 mm, rotation
    0.36 deg, translation 0.53 mm in 7.6 s (Gauss-Newton: 0.21 mm, 0.15 deg, 0.25 mm in
    1.2 s; one scan leaves the identity less determined than three)."""
    obs, truth = clean_scans
    one = {"c": truth["c"], **{k: truth[k][:1] for k in ("W", "T", "V")}}
    err = _errors(fit_scans(_model(), obs[:1], dataclasses.replace(CLEAN, solver="lbfgs")), one)
    assert err["vert"].mean() < 0.5 and err["rot"][0] < 0.7 and err["trans"][0] < 1.0, err


def test_landmarks_a_partial_embedding_lacks_are_left_out(clean_scans) -> None:
    """A model whose embedding covers only some MediaPipe points (FLAME's: NaN
    barycentrics elsewhere) fits on the others. Measured on the first scan with every
    second landmark absent: vertices mean 0.21 mm (all landmarks: 0.21 mm)."""
    import copy

    from rigs.face_model import LandmarkEmbedding

    obs, truth = clean_scans
    model = copy.copy(_model())
    bary = np.array(model.landmarks.barycentric, np.float64)
    bary[::2] = np.nan
    model.landmarks = LandmarkEmbedding("mediapipe478", model.landmarks.triangle, bary)
    r = fit_scans(model, obs[:1], CLEAN)
    assert np.isfinite(r.vertices).all() and np.isfinite(r.landmark_px).all()
    one = {"c": truth["c"], **{k: truth[k][:1] for k in ("W", "T", "V")}}
    assert _errors(r, one)["vert"].mean() < 0.4


def test_geman_mcclure_resists_flying_pixels_where_l2_does_not() -> None:
    """5 % of the scan points moved 3-20 mm along their rays, in front or behind. Measured
    (3 scans, seed 1, default config): Geman-McClure mean vertex error 0.097 mm (clean
    data: 0.10-0.12), Huber 0.194, L2 0.279 mm; scan residual medians 0.017 vs 0.037 mm."""
    obs, truth = _scans(3, seed=1, outliers=0.05)
    robust = _errors(fit_scans(_model(), obs, FitConfig()), truth)["vert"].mean()
    plain = _errors(fit_scans(_model(), obs, FitConfig(distance_loss="l2")), truth)["vert"].mean()
    assert robust < 0.15, (robust, plain)
    assert plain > 1.6 * robust, (plain, robust)


# ------------------------------------------------------------------ tiny subject


@pytest.fixture(scope="module")
def tiny_fit(tiny_subject, tiny_true_fusion):
    from stages.fusion import FusedScans

    capture_dir, _ = tiny_subject
    cap, truth, landmarks, scans = tiny_true_fusion
    # one expression rejected by fusion: a record, not a fit
    rejected = cap.phone_expressions[3]
    fused = dict(scans.expressions)
    fused[rejected] = dataclasses.replace(fused[rejected], reason="0 usable frames of 2 < min_frames=2")
    fusion = FusedScans(scans.subject_id, fused).to_output()
    out = fit_capture(capture_dir, landmarks, fusion, {"fit": FitConfig()})
    return cap, truth, landmarks, fusion, rejected, out


def test_tiny_subject_fit_against_the_true_meshes(tiny_fit) -> None:
    """Fitting vertices vs the true meshes, in the fusion reference camera. Measured (seed 11,
    4 of 5 expressions, 2 frames each, default config): median 0.99-1.23 mm, mean
    1.61-1.87 mm per expression (neutral 0.99 / 1.61). Before the true rig gained
    person-specific style (issue 8: deformation transfer plus direction, extent, asymmetry,
    cross-talk and extra motion) the same test measured median 0.62-0.82, mean 0.85-1.00 mm:
    the true expressions now lie outside the generic expression space the fit uses (a
    least-squares fit of identity + generic expressions to the true meshes: jaw_drop_max
    0.18 -> 0.61 mm median, smile_closed 0.15 -> 0.42), and the shared identity absorbs part
    of it, which moves the neutral too. Scan-to-model median stays under 0.3 mm and
    landmarks under 1 px. The rest is the spaces' limit and the unseen sides of the face."""
    from stages.fusion import FusedScans

    cap, truth, _, fusion, rejected, out = tiny_fit
    fit = FittedSubject.from_output(out)
    scans = FusedScans.from_output(fusion)
    expected = [e for e in cap.phone_expressions if e != rejected]
    assert fit.expressions == expected and list(fit.rejected) == [rejected]
    assert fit.rejected[rejected].startswith("fusion: 0 usable frames")
    ex = truth.expressions()
    prompts = list(ex["prompts"])
    fv = truth.rig.model.fitting_vertices
    rows = {r["expression"]: r for r in fit.rows().to_pylist()}
    for e in expected:
        pose = truth.phone(e)["head_in_camera"][scans.expressions[e].reference]
        true = ex["vertices"][prompts.index(e)][fv] @ pose[:, :3].T + pose[:, 3]
        T = fit.scan_from_head[e]
        err = np.linalg.norm(fit.vertices[e][fv] @ T[:3, :3].T + T[:3, 3] - true, axis=1) * 1e3
        assert np.median(err) < 1.35 and err.mean() < 2.1, (e, np.median(err), err.mean())
        assert rows[e]["status"] == "fitted" and rows[e]["scan_median_mm"] < 0.3 and rows[e]["landmark_px"] < 1.0
    assert rows[rejected]["status"] == "rejected" and np.isnan(rows[rejected]["scan_median_mm"])
    assert fit.neutral.shape == (truth.rig.model.n_vertices, 3) and fit.identity.shape == (100,)


def test_too_few_expressions_or_no_neutral_stop_the_subject_naming_prompts(tiny_fit) -> None:
    from stages.fusion import FusedScans

    cap, _, landmarks, fusion, rejected, _ = tiny_fit
    scans = FusedScans.from_output(fusion).expressions
    K = {e: cap.phone_intrinsics(e).K for e in cap.phone_expressions}
    args = (cap.subject_id, list(cap.phone_expressions), scans, landmarks, K)
    with pytest.raises(StageError) as info:
        fit_subject(*args, FitConfig(min_expressions=5))
    msg = str(info.value)
    absent = [p.name for p in load_default_rig_definition().prompts if p.name not in cap.phone_expressions]
    assert "4 usable expressions < fit.min_expressions=5" in msg
    assert f"{rejected} (fusion: 0 usable frames" in msg and all(p in msg for p in absent[:5])
    no_neutral = dict(scans)
    no_neutral["neutral"] = dataclasses.replace(scans["neutral"], reason="no frame has a face")
    with pytest.raises(StageError, match="neutral prompt 'neutral' is rejected"):
        fit_subject(*args[:2], no_neutral, *args[3:], FitConfig())
    with pytest.raises(StageError, match="neutral prompt 'calm' is missing"):
        fit_subject(*args, FitConfig(neutral_expression="calm"))


def test_a_scan_the_model_cannot_fit_is_rejected_and_the_rest_refitted(tiny_fit) -> None:
    """One fused scan blown up 25 % about its centroid (no identity of the others fits it):
    rejected after the fit (default threshold 1 mm), the others refitted without it.
    Measured: the blown-up scan's median scan-to-model distance 2.9 mm (p90 11.8 mm), the
    others 0.13-0.14 mm."""
    from stages.fusion import FusedScans

    cap, _, landmarks, fusion, rejected, _ = tiny_fit
    scans = dict(FusedScans.from_output(fusion).expressions)
    bad = cap.phone_expressions[1]
    v = scans[bad].vertices
    scans[bad] = dataclasses.replace(scans[bad], vertices=(v - v.mean(0)) * 1.25 + v.mean(0))
    K = {e: cap.phone_intrinsics(e).K for e in cap.phone_expressions}
    fit = fit_subject(cap.subject_id, list(cap.phone_expressions), scans, landmarks, K, FitConfig())
    assert set(fit.rejected) == {rejected, bad}
    assert fit.rejected[bad].startswith("fit: median scan-to-model distance")
    rows = {r["expression"]: r for r in fit.rows().to_pylist()}
    assert rows[bad]["scan_median_mm"] > 1.0
    assert all(rows[e]["scan_median_mm"] < 0.3 for e in fit.expressions) and len(fit.expressions) == 3


def test_artifact_round_trip_keeps_the_contract_keys(tiny_fit) -> None:
    *_, rejected, out = tiny_fit
    kind, files = encode(out)
    back = decode(kind, files)
    fit = FittedSubject.from_output(back)
    again = fit.to_output()
    assert set(again.arrays) == set(out.arrays) and dict(again.meta) == dict(out.meta)
    for name, arr in out.arrays.items():
        assert again.arrays[name].dtype == arr.dtype
        np.testing.assert_array_equal(again.arrays[name], arr)
    e = fit.expressions[0]
    assert {f"{e}.weights", f"{e}.scan_from_head", f"{e}.vertices", "identity", "neutral"} <= set(out.arrays)
    assert out.arrays[f"{e}.weights"].shape == (53,) and out.arrays[f"{e}.scan_from_head"].dtype == np.float64
    assert set(out.meta) >= {"subject_id", "model", "expressions", "rejected", "neutral_expression"}
    assert out.meta["model"] == "ict-face-model-light@ict-1" and rejected in out.meta["rejected"]
    assert again.tables["rows"].schema == out.tables["rows"].schema
    for name in out.tables["rows"].column_names:  # NaN-aware (a rejected row has NaN residuals)
        np.testing.assert_array_equal(again.tables["rows"][name].to_numpy(), out.tables["rows"][name].to_numpy())
    with pytest.raises(StageError, match="lacks"):
        FittedSubject.from_output(StageOutput(arrays={"identity": np.zeros(3)}, meta={}))


def test_config_checks() -> None:
    assert FitConfig().distance_loss == "geman_mcclure"
    for bad, match in (({"distance_loss": "cauchy"}, "distance_loss"),
                       ({"min_expressions": 0}, "fit.min_expressions must be >= 1"),
                       ({"min_distance_mm": 30.0}, "fit.min_distance_mm must be in"),
                       ({"scan_sigma_mm": 0.0}, "fit.scan_sigma_mm must be > 0"),
                       ({"max_normal_angle_deg": 200.0}, "fit.max_normal_angle_deg"),
                       ({"landmark_init": "yes"}, "landmark_init")):
        with pytest.raises(ConfigError, match=match):
            FitConfig(**bad)
    np.testing.assert_allclose(FitConfig().distances_m(3), [0.02, np.sqrt(0.02 * 0.003), 0.003])
