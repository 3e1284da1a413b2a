"""Laplacian refinement (rigs/deform.py, stages/refine.py) against constructed and synthetic truth."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ConfigError, StageError
from pipeline.serialize import StageOutput, decode, encode
from rigs.deform import LaplacianSystem, boundary_loops, inside_polygon, opening_loops
from rigs.face_model import load_ict_face_model
from rigs.raycast import vertex_normals
from rigs.rig import BlendshapeRig
from stages.refine import RefineConfig, RefinedSubject, refine_capture, refine_expression

#: Head-to-camera pose of the constructed scans: the face looks at a camera 0.35 m away,
#: turned 12 degrees.
_YAW = np.deg2rad(180 + 12)
_SCAN_FROM_HEAD = np.array([[np.cos(_YAW), 0, np.sin(_YAW), 0.01], [0, 1, 0, -0.02],
                            [-np.sin(_YAW), 0, np.cos(_YAW), 0.35], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def model():
    return load_ict_face_model()


def _to_camera(points: np.ndarray) -> np.ndarray:
    return points @ _SCAN_FROM_HEAD[:3, :3].T + _SCAN_FROM_HEAD[:3, 3]


def _bump(points: np.ndarray, centre: np.ndarray, radius: float, amplitude: float) -> np.ndarray:
    return amplitude * np.exp(-((points - centre) ** 2).sum(1) / (2 * radius**2))


def _skin_triangles(model) -> np.ndarray:
    return model.triangles[np.isin(model.triangles, model.part_vertices("face")).all(1)]


def test_config_checks_ranges() -> None:
    with pytest.raises(ConfigError, match="refine.stiffness_min"):
        RefineConfig(stiffness_min=2000.0)
    with pytest.raises(ConfigError, match="refine.max_normal_angle_deg"):
        RefineConfig(max_normal_angle_deg=0.0)
    with pytest.raises(ConfigError, match="refine.min_matched_fraction"):
        RefineConfig(min_matched_fraction=1.5)
    assert np.allclose(RefineConfig(iterations=3).stiffness, [1000.0, np.sqrt(1000 * 30), 30.0])


def test_opening_loops_and_polygons(model) -> None:
    """ICT's skin has one border loop per opening: 74 vertices around the mouth, 42 per eye."""
    loops = opening_loops(model.triangles, model.vertex_part, model.part_names)
    assert {k: len(v) for k, v in loops.items()} == {"mouth_socket": 74, "eye_socket_left": 42, "eye_socket_right": 42}
    assert model.neutral[loops["eye_socket_left"], 0].mean() > 0.02  # +x is the subject's left
    square = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
    pts = np.array([[0.5, 0.5], [0.05, 0.5], [1.5, 0.5], [-0.1, -0.1]])
    assert inside_polygon(pts, square).tolist() == [True, True, False, False]
    assert inside_polygon(pts, square, margin=0.1).tolist() == [True, False, False, False]
    (loop,) = boundary_loops(np.array([[0, 1, 2], [0, 2, 3]]))
    assert sorted(loop.tolist()) == [0, 1, 2, 3]


def test_constructed_bump_is_recovered_and_rigid_parts_do_not_move(model) -> None:
    """Template = the ICT mean face; scan = its skin, midpoint-subdivided (so no scan vertex
    but the template's own lies on a template vertex ... and the new ones do not), moved by a
    1.5 mm Gaussian bump of radius 12 mm on the cheek, in a camera 0.35 m away.

    Measured: within 24 mm of the bump centre the per-vertex error falls from 0.597 mm
    (mean; 1.5 mm at the peak) to 0.08 mm (peak recovered 1.17 of 1.5 mm); beyond 50 mm the
    99th percentile of the displacement is 0.10 mm; eyeballs, teeth and gums are bit-for-bit
    the fit's. Bounds: 3x the measured error, 2x the far displacement."""
    import open3d as o3d

    fitted = model.neutral.astype(np.float32)
    region = model.fitting_vertices
    centre_id = region[np.argmin(np.linalg.norm(fitted[region] - [0.045, -0.01, 0.09], axis=1))]
    centre = fitted[centre_id].astype(np.float64)
    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(fitted.astype(np.float64)),
                                     o3d.utility.Vector3iVector(_skin_triangles(model)))
    mesh.remove_unreferenced_vertices()
    mesh = mesh.subdivide_midpoint(1)
    sv, st = np.asarray(mesh.vertices), np.asarray(mesh.triangles)
    sv = sv + _bump(sv, centre, 0.012, 1.5e-3)[:, None] * vertex_normals(sv, st)
    truth = fitted + _bump(fitted.astype(np.float64), centre, 0.012, 1.5e-3)[:, None] * vertex_normals(fitted, model.triangles)

    result, _ = refine_expression(fitted, _to_camera(sv), st, _SCAN_FROM_HEAD, model, RefineConfig())
    refined = result.vertices.astype(np.float32)
    dist = np.linalg.norm(fitted[region] - centre, axis=1)
    near, far = region[dist < 0.024], region[dist > 0.05]
    before = np.linalg.norm(fitted[near] - truth[near], axis=1).mean()
    after = np.linalg.norm(refined[near] - truth[near], axis=1).mean()
    assert before > 0.5e-3 and after < 0.25e-3, (before, after)
    assert np.linalg.norm(refined[centre_id] - fitted[centre_id]) > 1.0e-3
    assert np.percentile(np.linalg.norm(refined[far] - fitted[far], axis=1), 99) < 0.2e-3
    rigid = model.part_vertices("eyeball_left", "eyeball_right", "teeth", "gums_tongue")
    assert np.array_equal(refined[rigid], fitted[rigid])
    assert result.accepted.mean() > 0.9


def _poisson_scan(model, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A Poisson surface of the skin seen from the front: the mouth opening gets a membrane."""
    import open3d as o3d

    tri = _skin_triangles(model)
    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(truth), o3d.utility.Vector3iVector(tri))
    mesh.compute_triangle_normals()
    front = np.asarray(mesh.triangle_normals)[:, 2] > 0.2  # faces a camera on the +z axis
    mesh.triangles = o3d.utility.Vector3iVector(tri[front])
    mesh.remove_unreferenced_vertices()
    cloud = mesh.sample_points_uniformly(60000, use_triangle_normal=True)
    out, density = o3d.geometry.TriangleMesh.create_from_point_cloud_poisson(cloud, depth=8)
    density, v, p = np.asarray(density), np.asarray(out.vertices), np.asarray(cloud.points)
    out.remove_vertices_by_mask((density < np.quantile(density, 0.05)) | ((v < p.min(0) - 2e-3) | (v > p.max(0) + 2e-3)).any(1))
    return np.asarray(out.vertices), np.asarray(out.triangles)


def test_open_mouth_lips_are_not_welded_onto_the_membrane(model) -> None:
    """jawOpen 0.3 on the mean face (inner-lip gap 12.17 mm at the midline), fitted exactly;
    the scan is a Poisson surface of the skin seen from the front, which closes the mouth
    with a membrane in front of the inner lips.

    Measured: the refined gap is 12.15 mm (within 0.02 mm), the membrane's scan points are
    left out; with the openings not respected and any normal accepted (the ablation), the
    inner lips are pulled onto the membrane and the gap closes to 11.48 mm (-0.69 mm).
    Bounds: gap within 0.15 mm; the ablation must close it by > 0.3 mm (so this test can
    tell a welding refinement from one that is not)."""
    rig = BlendshapeRig.generic(model)
    b = np.zeros(rig.definition.size)
    b[rig.definition.index("jawOpen")] = 0.3
    truth = rig.pose(b).astype(np.float64)
    sv, st = _poisson_scan(model, truth)
    upper, lower = model.landmarks68[[62, 66]]

    def gap(cfg: RefineConfig) -> float:
        x = refine_expression(truth.astype(np.float32), _to_camera(sv), st, _SCAN_FROM_HEAD, model, cfg)[0].vertices
        return float(np.linalg.norm(x[upper] - x[lower]))

    true_gap = float(np.linalg.norm(truth[upper] - truth[lower]))
    assert abs(gap(RefineConfig()) - true_gap) < 0.15e-3
    assert gap(RefineConfig(respect_openings=False, max_normal_angle_deg=90.0)) < true_gap - 0.3e-3


def test_system_checks_its_vertex_sets(model) -> None:
    with pytest.raises(Exception, match="data vertices must be free"):
        LaplacianSystem(model.n_vertices, model.triangles, model.part_vertices("face"),
                        model.part_vertices("teeth"))
    with pytest.raises(StageError, match="rigid transform"):
        refine_expression(model.neutral, np.zeros((3, 3)), np.array([[0, 1, 2]]), np.eye(4) * 2, model)


# --------------------------------------------------------------- the tiny synthetic subject


@pytest.fixture(scope="module")
def tiny_refined(tiny_subject, tiny_true_fusion, model):
    """Fusion of the tiny subject with its true landmarks (conftest's ``tiny_true_fusion``),
    a pseudo-fit from the truth, and the refine stage on them."""
    capture_dir, truth_dir = tiny_subject
    cap, truth, _, fused = tiny_true_fusion
    expressions = truth.expressions()
    prompts = [str(p) for p in expressions["prompts"]]
    identity = np.load(truth_dir / "identity.npz")["identity"]
    generic = BlendshapeRig.generic(model, truth.rig.definition, identity=identity)
    # The pseudo-fit: the generic rig of the true identity at the true weights and the
    # true head pose; it lacks the subject's detail and rig gains.
    arrays = {"neutral": generic.neutral}
    for i, e in enumerate(prompts):
        arrays[f"{e}.vertices"] = generic.pose(expressions["b"][i], expressions["gaze"][i])
        pose = np.eye(4)
        pose[:3] = truth.phone(e)["head_in_camera"][fused.expressions[e].reference]
        arrays[f"{e}.scan_from_head"] = pose
    fit = StageOutput(arrays=arrays, meta={"subject_id": cap.subject_id, "expressions": prompts, "rejected": {},
                                           "neutral_expression": "neutral", "model": "ict-face-model-light ict-1"})
    fusion = fused.to_output()
    out = refine_capture(capture_dir, fusion, fit, RefineConfig())
    return cap, fusion, fit, out, expressions, prompts


def test_tiny_subject_refinement_beats_the_fit(tiny_refined, model) -> None:
    """Per-vertex error against the true mesh, on the face region (the model's 7,801 fitting
    vertices) and on its part the scan covers (true vertex within 1 mm of the fused scan:
    51-57 % of it; the 2-frame tiny bursts do not see the sides and under the chin).

    Measured (seed 11, the true rig with person-specific style of issue 8), mean per-vertex
    error fit -> refined, mm, and reduction: face region: neutral 0.259 -> 0.167 (36 %),
    jaw_drop_max 1.815 -> 1.542 (15 %), smile_closed 1.395 -> 1.196 (14 %), wink_left 0.276
    -> 0.198 (28 %), brows_raise 0.982 -> 0.886 (10 %); all expressions 4.73 -> 3.99 summed
    (16 %). Covered part: 54 %, 32 %, 29 %, 44 %, 14 %. The pseudo-fit is the generic rig at
    the true weights, so it now misses the subject's style; what the refinement cannot
    remove is the style's motion along the skin (direction changes and extra motion slide
    the surface along itself, which a scan cannot show) and the unseen sides. (Before the
    style, on gains alone: 19-39 % per expression, 25 % over all.)
    Bounds: covered part >= 12 % per expression, face region >= 7 % per expression and
    >= 12 % over all."""
    from scipy.spatial import cKDTree

    from stages.fusion import FusedScans

    _, fusion, fit, out, expressions, prompts = tiny_refined
    refined = RefinedSubject.from_output(out)
    fused = FusedScans.from_output(fusion)
    region = model.fitting_vertices
    totals = np.zeros(2)
    for i, e in enumerate(prompts):
        true = expressions["vertices"][i].astype(np.float64)
        pose = np.linalg.inv(fit.arrays[f"{e}.scan_from_head"])
        scan = fused.expressions[e].vertices @ pose[:3, :3].T + pose[:3, 3]
        covered = region[cKDTree(scan).query(true[region])[0] < 1e-3]
        for ids, bound in ((region, 0.07), (covered, 0.12)):
            before = np.linalg.norm(fit.arrays[f"{e}.vertices"][ids] - true[ids], axis=1).mean()
            after = np.linalg.norm(refined.refined[e].vertices[ids] - true[ids], axis=1).mean()
            assert after < (1 - bound) * before, (e, len(ids), before, after)
            if ids is region:
                totals += before, after
    assert totals[1] < 0.88 * totals[0], totals
    rows = out.tables["rows"].to_pylist()
    assert [r["status"] for r in rows] == ["refined"] * len(prompts)
    assert all(r["refined_median_mm"] < 0.6 * r["fit_median_mm"] for r in rows), rows


def test_tiny_subject_round_trip_and_rejections(tiny_refined, model) -> None:
    """The artifact survives the store's serializer; an expression the fit rejected, one
    whose scan was not fused (the neutral: the fit's mesh of it then stands in), and one
    whose pose is 5 cm off (no correspondences) become records with reasons while the rest
    is refined."""
    import dataclasses

    cap, fusion, fit, out, _, prompts = tiny_refined
    back = RefinedSubject.from_output(decode(*encode(out)))
    first = RefinedSubject.from_output(out)
    assert back.expressions == prompts == first.expressions and back.neutral_source == "refined"
    assert np.array_equal(back.neutral, first.refined["neutral"].vertices)
    for e in prompts:
        assert np.array_equal(back.refined[e].vertices, first.refined[e].vertices)
        assert back.refined[e].displacement_mm.shape == (model.n_vertices,)
    assert back.rows().equals(out.tables["rows"])

    # The neutral's scan is not fused: its fitted mesh stands in as the subject's neutral.
    unfused, gone, shifted = prompts[0], prompts[1], prompts[3]
    arrays = {k: v for k, v in fit.arrays.items() if not k.startswith(f"{gone}.")}
    arrays[f"{shifted}.scan_from_head"] = fit.arrays[f"{shifted}.scan_from_head"].copy()
    arrays[f"{shifted}.scan_from_head"][2, 3] += 0.05  # the head 5 cm farther than the scan
    meta = dict(fit.meta, expressions=[e for e in prompts if e != gone], rejected={gone: "landmarks: too few"})
    fusion_meta = {**fusion.meta, "expressions": {**fusion.meta["expressions"]}}
    fusion_meta["expressions"][unfused] = dict(fusion_meta["expressions"][unfused], reason="1 usable frame of 2")
    res = RefinedSubject.from_output(refine_capture(
        cap, dataclasses.replace(fusion, meta=fusion_meta), StageOutput(arrays=arrays, meta=meta), RefineConfig()))
    assert res.expressions == [e for e in prompts if e not in (gone, unfused, shifted)]
    assert res.rejected[gone] == "not fitted: landmarks: too few"
    assert res.rejected[unfused].startswith("no fused scan: 1 usable frame")
    assert res.rejected[shifted].startswith("too few scan correspondences")
    assert res.neutral_source == "fit" and np.array_equal(res.neutral, fit.arrays[f"{unfused}.vertices"])
    rows = res.rows().to_pylist()
    assert [r["expression"] for r in rows] == prompts
    assert [r["status"] for r in rows].count("rejected") == 3
