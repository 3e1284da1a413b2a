"""Camera-placement scores (issue 11): constructed cases with known answers, search, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.errors import ConfigError
from rigs.camera import Camera
from rigs.raycast import Scene
from stages.placement.population import Population, PopulationConfig, donning_offsets
from stages.placement.regions import REGION_NAMES, template_regions
from stages.placement.rigfile import (
    PLACEMENT_DIR,
    box_mesh,
    load_placement_rig,
    placement_rig_json,
    standard_rig_file,
    variant_rig_files,
)
from stages.placement.scoring import point_visibility, range_of_motion, region_means
from stages.placement.search import SearchConfig, candidate, search_camera
from stages.placement.tables import accuracy_correlation
from tests.cli_runner import run_pgt

UP = np.array([0.0, 1.0, 0.0])


def _plane(half: float = 0.05, n: int = 21, z: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A square grid in the plane z, facing +z: ((n*n, 3) vertices, triangles)."""
    u = np.linspace(-half, half, n)
    x, y = np.meshgrid(u, u)
    verts = np.stack([x.ravel(), y.ravel(), np.full(n * n, z)], -1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, 1:].ravel(), idx[1:, :-1].ravel()
    return verts, np.concatenate([np.stack([a, b, c], -1), np.stack([a, c, d], -1)])


def _front_camera(distance: float = 0.1, focal: float = 200.0, size: int = 400, distortion=None) -> Camera:
    return Camera.look_at(np.array([0.0, 0.0, distance]), np.zeros(3), UP, width=size, height=size, focal=focal,
                          distortion=distortion)


def _plane_views(cam: Camera, occluder=None, occlusion: bool = True):
    verts, tris = _plane()
    central = np.flatnonzero((np.abs(verts[:, :2]) <= 0.02).all(1))  # well inside the view
    points = verts[central][None]
    normals = np.broadcast_to([0.0, 0.0, 1.0], points.shape)
    scenes = [Scene(verts, tris)] if occlusion else None
    proxy = Scene(*occluder) if occluder is not None else None
    return point_visibility(cam, points, normals, scenes, proxy)


def test_camera_straight_at_a_plane_scores_one():
    terms, visible = _plane_views(_front_camera())
    region = np.zeros(terms.cosine.shape[1], int)
    assert region_means(terms.cosine, region, 1)[0, 0] == pytest.approx(1.0, abs=1e-12)  # REFA eq. 1
    assert region_means(terms.cosine * visible, region, 1)[0, 0] == pytest.approx(1.0, abs=1e-12)
    tilted = Camera.look_at(np.array([0.0, 0.05, 0.1]), np.zeros(3), UP, width=400, height=400, focal=200.0)
    terms, _ = _plane_views(tilted)
    expected = 0.1 / np.hypot(0.05, 0.1)  # cos of the angle between the axis and the normal
    assert region_means(terms.cosine, np.zeros(terms.cosine.shape[1], int), 1)[0, 0] == pytest.approx(expected)


def test_region_behind_an_occluder_scores_zero_with_occlusion_on():
    cam = _front_camera()
    box = box_mesh(np.array([[[0.0, 0.0, 0.05], [0.06, 0.06, 0.002]]]))  # a plate between camera and plane
    terms, visible = _plane_views(cam, occluder=box)
    assert terms.cosine.min() == 1.0 and not visible.any()  # V cos 1, V occ 0
    _, without = _plane_views(cam, occluder=None)
    assert without.all()
    # The face mesh itself occludes too: a second sheet in front, as one posed mesh.
    near = _plane(z=0.05)
    far = _plane()
    verts = np.concatenate([far[0], near[0]])
    tris = np.concatenate([far[1], near[1] + len(far[0])])
    points = far[0][(np.abs(far[0][:, :2]) <= 0.02).all(1)][None]
    normals = np.broadcast_to([0.0, 0.0, 1.0], points.shape)
    _, seen = point_visibility(cam, points, normals, [Scene(verts, tris)])
    assert not seen.any()
    _, unchecked = point_visibility(cam, points, normals, None)
    assert unchecked.all()


def test_field_of_view_uses_the_lens():
    cam = _front_camera(distortion=np.array([-0.3, 0.0, 0.0, 0.0, 0.0]))  # folds at r = 1/sqrt(0.9)
    r_fold = 1 / np.sqrt(0.9)
    # Undistorted radii inside the fold, past the fold (projects back into the image), behind.
    points = np.array([[[0.5 * 0.1, 0, 0], [1.3 * 0.1, 0, 0], [0.0, 0.0, 0.2]]])
    normals = np.broadcast_to([0.0, 0.0, 1.0], points.shape)
    terms, visible = point_visibility(cam, points, normals)
    assert r_fold < 1.3 and (terms.pixels[0, 1] >= 0).all() and (terms.pixels[0, 1] < 400).all()
    assert visible[0].tolist() == [True, False, False]
    small = _front_camera(size=40)  # 0.5 * 200 = 100 px off centre: outside a 40 px image
    assert not point_visibility(small, points[:, :1], normals[:, :1])[1].any()


def test_keypoint_moved_by_known_pixels_gives_that_motion():
    cam = Camera.look_at(np.array([0.0, 0.0, 1.0]), np.zeros(3), UP, width=400, height=400, focal=100.0)
    neutral = np.array([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    moved = neutral + np.array([[0.03, 0.04, 0.0], [0.0, 0.0, 0.0]])  # 0.05 m at 1 m, f = 100: 5 px
    still = neutral.copy()
    pixels, _ = cam.project(np.stack([neutral, moved, still]))
    visible = np.ones((3, 2), bool)
    one_keypoint = range_of_motion(pixels[:, :1], visible[:, :1], np.array([0]), 1)
    assert one_keypoint[0] == pytest.approx((5.0 + 0.0) / 2)  # mean over the two expressions
    visible[1, 1] = False  # the still keypoint hidden in the moving expression: excluded there
    both = range_of_motion(pixels, visible, np.array([0, 0]), 1)
    assert both[0] == pytest.approx((5.0 + 0.0) / 2)
    visible[1, 0] = False  # nothing visible in that expression: it counts 0
    assert range_of_motion(pixels, visible, np.array([0, 0]), 1)[0] == pytest.approx(0.0)


@pytest.fixture(scope="module")
def model_and_regions():
    from rigs.definition import load_default_rig_definition
    from rigs.face_model import load_ict_face_model

    model = load_ict_face_model()
    return model, load_default_rig_definition(), template_regions(model, samples=16)


def test_regions_are_disjoint_face_vertices(model_and_regions):
    model, _, regions = model_and_regions
    face = set(model.part_vertices("face").tolist())
    everything = np.concatenate(regions.vertices)
    assert regions.names == REGION_NAMES
    assert len(set(everything.tolist())) == len(everything) and set(everything.tolist()) <= face
    for name, (n_vertices, n_samples) in regions.counts().items():
        assert n_vertices >= 16 and n_samples == 16, name
    left, right = (model.neutral[regions.vertices[REGION_NAMES.index(n)]].mean(0) for n in ("eye_L", "eye_R"))
    assert left[0] > 0.02 and right[0] < -0.02  # +x is the subject's left
    lips, nose = (model.neutral[regions.vertices[REGION_NAMES.index(n)]].mean(0) for n in ("lips", "nose"))
    assert lips[1] < nose[1]


def test_population_draws():
    config = PopulationConfig(donnings=4, donning_translation_mm=2.0, seed=3)
    rotations, shifts = donning_offsets(config)
    assert np.allclose(rotations[0], np.eye(3)) and np.allclose(shifts[0], 0)
    assert 0 < np.abs(shifts[1:]).max() < 0.012
    with pytest.raises(ConfigError):
        PopulationConfig(identities=0)
    with pytest.raises(ConfigError):
        PopulationConfig(expressions="smiles")


def _same_rig(a, b) -> bool:
    """Equal rigs up to float64 rounding: the stored files were written on another CPU,
    where the rotations' last bit can differ (measured: 2.2e-16)."""
    def fields(c):
        return (c.name, c.role, c.mirrored, c.intrinsics, c.model)

    return (a.rig_version, a.fps, len(a.cameras)) == (b.rig_version, b.fps, len(b.cameras)) and all(
        fields(x) == fields(y) and np.allclose(x.distortion, y.distortion, rtol=0, atol=1e-12)
        and np.allclose(x.R_headset_from_camera, y.R_headset_from_camera, rtol=0, atol=1e-12)
        and np.allclose(x.t_headset_from_camera, y.t_headset_from_camera, rtol=0, atol=1e-12)
        for x, y in zip(a.cameras, b.cameras, strict=True))


def test_rig_files_are_the_standard_rig_and_its_variants(tmp_path):
    standard = standard_rig_file()
    stored = load_placement_rig(PLACEMENT_DIR / "standard.json")
    assert _same_rig(stored.rig, standard.rig) and stored.targets == standard.targets
    assert placement_rig_json(stored) == json.loads((PLACEMENT_DIR / "standard.json").read_text())
    base = standard.cameras()
    for variant in variant_rig_files(standard):
        assert _same_rig(load_placement_rig(PLACEMENT_DIR / f"{variant.name}.json").rig, variant.rig)
        changed = {n for n, c in variant.cameras().items()
                   if not (np.allclose(c.t_world_from_camera, base[n].t_world_from_camera)
                           and np.allclose(c.R_world_from_camera, base[n].R_world_from_camera))}
        if variant.name == "mouth_outward_1cm":
            assert changed == {"mouth_left", "mouth_right"}
            for n in changed:
                step = variant.cameras()[n].t_world_from_camera - base[n].t_world_from_camera
                assert np.allclose(np.abs(step), [0.010, 0, 0]) and np.sign(step[0]) == np.sign(base[n].t_world_from_camera[0])
        else:
            assert changed == {"glabella"}
            axes = variant.cameras()["glabella"].R_world_from_camera[:, 2] @ base["glabella"].R_world_from_camera[:, 2]
            assert np.rad2deg(np.arccos(axes)) == pytest.approx(10.0)
    bad = placement_rig_json(standard) | {"placement": {"targets": {"eye_left": ["ears"]}}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="targets"):
        load_placement_rig(tmp_path / "bad.json")


def test_search_candidates_stay_feasible():
    start = _front_camera()
    config = SearchConfig(box_mm=5.0, cone_deg=12.0)
    corner = candidate(start, np.array([1, -1, 1, 3.0, 4.0]), config)  # (a, b) past the disc: clipped
    assert np.allclose(1e3 * (corner.t_world_from_camera - start.t_world_from_camera), [5, -5, 5])
    turn = np.rad2deg(np.arccos(corner.R_world_from_camera[:, 2] @ start.R_world_from_camera[:, 2]))
    assert turn == pytest.approx(12.0)
    right = candidate(start, np.array([0, 0, 0, 1.0, 0.0]), config)
    assert (right.R_world_from_camera[:, 2] @ start.R_world_from_camera[:, 0]) > 0.2  # a > 0: toward image right


def test_search_improves_a_camera_turned_away(model_and_regions):
    model, definition, regions = model_and_regions
    faces = Population.build(PopulationConfig(identities=1, max_expressions=2, donnings=1), model, definition,
                             regions, keep_scenes=True)
    start = standard_rig_file().cameras()["mouth_left"]
    away = candidate(start, np.array([0, 0, 0, 0.0, 1.0]), SearchConfig(cone_deg=15.0))  # 15 deg up, off the lips
    config = SearchConfig(box_mm=5.0, cone_deg=20.0, max_evaluations=24)
    found = search_camera(away, faces, {"lips": 1.0, "jaw": 1.0}, config)
    assert found.evaluations <= 24 + 1 and found.history[0] == found.start_score
    assert found.best_score > found.start_score + 0.01
    assert np.abs(found.offset_mm).max() <= 5.0 + 1e-9 and found.turn_deg <= 20.0 + 1e-6


def test_accuracy_correlation_on_constructed_numbers():
    scores = {"a": 0.1, "b": 0.3, "c": 0.2, "d": 0.5}
    linear = {k: 2 * v + 1 for k, v in scores.items()}
    assert accuracy_correlation(scores, linear) == pytest.approx({"cameras": 4, "pearson": 1.0, "spearman": 1.0})
    monotone = {k: v**4 for k, v in scores.items()} | {"other": 9.0}  # cameras not in both are ignored
    res = accuracy_correlation(scores, monotone)
    assert res["cameras"] == 4 and res["spearman"] == pytest.approx(1.0) and res["pearson"] < 0.99
    reversed_ = {k: -v for k, v in scores.items()}
    assert accuracy_correlation(scores, reversed_)["pearson"] == pytest.approx(-1.0)
    assert np.isnan(accuracy_correlation({"a": 1, "b": 2}, {"a": 1, "b": 2})["pearson"])


def test_cli_scores_and_compares_rigs(tmp_path):
    rigs = [str(PLACEMENT_DIR / f"{n}.json") for n in ("standard", "mouth_outward_1cm")]
    out = tmp_path / "placement"
    run_pgt("placement", *rigs, "--out", str(out), "--identities", "1", "--max-expressions", "2",
            "--donnings", "1", "--samples", "8", "--search", "mouth_left", "--search-evaluations", "6",
            "--search-identities", "1")
    result = json.loads((out / "placement.json").read_text())
    assert result["expressions"] == ["jaw_drop_max", "jaw_open_half"]
    targets = {r: {row["camera"]: row for row in result["rigs"][r]["targets"]} for r in result["rigs"]}
    for cam, row in targets["standard"].items():
        other = targets["mouth_outward_1cm"][cam]
        same = row["mean"] == other["mean"]
        assert same == (cam not in ("mouth_left", "mouth_right")), cam
        assert 0 <= row["mean"]["v_occluded"] <= row["mean"]["v_cosine"] <= 1
    comparison = (out / "comparison.md").read_text()
    assert "standard: V occ" in comparison and "mouth_outward_1cm: M px" in comparison
    assert (out / "standard_heat.png").stat().st_size > 10_000
    assert "| eye_left | eye_L+brow_L |" in (out / "standard.md").read_text()
    search = result["search"]  # the start rescored on the main faces = its target figures, weighted
    mouth = targets["standard"]["mouth_left"]["mean"]
    assert search["weights"] == {"lips": 1.0, "jaw": 1.0} and search["evaluations"] <= 7
    assert search["scoring_faces"]["start"] == pytest.approx(mouth["v_occluded"] + 0.02 * mouth["motion"])
    assert search["search_faces"]["best"] >= search["search_faces"]["start"]
    assert "| scoring population |" in (out / "search.md").read_text()
