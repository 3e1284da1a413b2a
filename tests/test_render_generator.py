"""The renderer against the synthetic generator's HMC images (ICT rig, 10 cameras, 100 px).

The generator is called only to make reference images; its image formation is not the
renderer's. The albedo seed is the phone texture the texture stage would estimate at
best (the generator's visible albedo baked into the UV atlas, confidence 1 where the atlas
is covered); the IR appearance is then fitted to HMC images.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from rigs.camera import rig_cameras
from rigs.face_model import load_ict_face_model
from rigs.raycast import Scene
from rigs.render import (
    AppearanceFitConfig,
    AppearanceModel,
    HmcRenderer,
    RigState,
    StateFitConfig,
    ZBufferBackend,
    fit_appearance,
    fit_state,
    rotvec_to_matrix,
)
from rigs.rig import BlendshapeRig
from rigs.uv_raster import model_uv_raster, part_triangles
from stages.fit_solve import single_thread
from stages.synthesis.hmc import default_hmc_rig
from stages.synthesis.ir import IrRenderer
from stages.synthesis.texture import load_default_texture
from stages.texture import ATLAS_PARTS

SIZE = 100
ATLAS = ATLAS_PARTS["head_mouth"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: extra intra-op threads only contend on a loaded machine."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def scene():
    model = load_ict_face_model()
    rig = BlendshapeRig.generic(model)
    cams = rig_cameras(default_hmc_rig(SIZE))
    texture = load_default_texture()
    return model, rig, cams, texture


def _state(rig: BlendshapeRig, coefficients: dict[str, float], rotvec, t_mm, gaze) -> RigState:
    b = torch.zeros(1, rig.definition.size)
    for name, value in coefficients.items():
        b[0, rig.definition.index(name)] = value
    return RigState(b, torch.tensor([gaze], dtype=torch.float32),
                    rotvec_to_matrix(torch.tensor([rotvec], dtype=torch.float32)),
                    torch.tensor([t_mm], dtype=torch.float32) / 1000)


FRAME = dict(coefficients={"jawOpen": 0.45, "mouthSmile_L": 0.5, "browInnerUp_L": 0.6},
             rotvec=[0.03, -0.02, 0.01], t_mm=[1.0, -1.5, 2.0], gaze=[0.15, -0.1, 0.12, -0.1])
CALIBRATION = dict(coefficients={"mouthFunnel": 0.4, "eyeSquint_L": 0.3},
                   rotvec=[-0.02, 0.03, 0.0], t_mm=[-1.0, 1.0, -1.0], gaze=[-0.1, 0.1, -0.12, 0.1])


def _generator(scene, vertices: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The generator's noise-free images (1, C, H, W) in [0, 1] and its G-buffers."""
    model, _, cams, texture = scene
    verts = vertices[0].detach().numpy().astype(np.float32)
    images, _ = IrRenderer(cams, texture, model.triangles).render(verts, None)
    mesh = Scene(verts, model.triangles)
    gbuffers = [mesh.render(cam) for cam in cams.values()]
    return torch.as_tensor(np.stack([images[n] for n in cams]) / 255.0, dtype=torch.float32)[None], gbuffers


def _phone_texture(model, texture, resolution: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The visible albedo baked into the UV atlas (linear RGB) and its confidence."""
    import cv2

    raster = model_uv_raster(model, resolution, ATLAS)
    attrs = raster.interpolate(model.triangles, np.c_[texture.vertex_uv, texture.vertex_weight, texture.vertex_albedo])
    photo = (texture.photo.astype(np.float32) / 255.0) ** 2.2
    k, cols = len(attrs), 1024  # remap's maps must be under 32767 rows
    xy = np.pad(attrs[:, :2], ((0, -k % cols), (0, 0))).astype(np.float32).reshape(-1, cols, 2)
    sampled = cv2.remap(photo, xy[..., 0], xy[..., 1], cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE).reshape(-1, 3)[:k]
    w = attrs[:, 2:3]
    rgb = w * sampled + (1 - w) * attrs[:, 3:6]
    return raster.scatter(rgb.astype(np.float32)), raster.scatter(np.ones(len(rgb), np.float32))


def _appearance(scene, resolution: int = 128) -> AppearanceModel:
    """The appearance model seeded from the phone texture (generic parameters)."""
    model, _, cams, texture = scene
    rgb, conf = _phone_texture(model, texture, resolution)
    in_atlas = np.zeros(len(model.triangles), bool)
    in_atlas[part_triangles(model, ATLAS)] = True
    return AppearanceModel.from_texture(list(cams), rgb, conf, in_atlas, model.n_vertices, resolution=None)


@pytest.fixture(scope="module")
def calibrated(scene):
    """The appearance fitted (albedo included) to the generator's image of the
    calibration frame, frozen; and the CPU seconds the fit took."""
    _, rig, cams, _ = scene
    renderer = HmcRenderer.from_rig(rig, cams)
    state = _state(rig, **CALIBRATION)
    images, _ = _generator(scene, renderer.rig(state))
    app = _appearance(scene)
    cpu = time.process_time()
    fit_appearance(renderer, app, state, images, config=AppearanceFitConfig(albedo=True))
    return app.requires_grad_(False), time.process_time() - cpu


def _interior(mask: torch.Tensor) -> torch.Tensor:
    """Mask pixels whose 4 neighbours are in the mask too (silhouettes left out)."""
    m = mask.float()
    pad = torch.nn.functional.pad(m, (1, 1, 1, 1), mode="replicate")
    neighbours = pad[..., :-2, 1:-1] * pad[..., 2:, 1:-1] * pad[..., 1:-1, :-2] * pad[..., 1:-1, 2:]
    return mask & (neighbours > 0)


def test_geometry_matches_the_generator(scene):
    """Mask and depth equal the generator's ray-cast G-buffer (same rays, same ray
    caster: exactly, up to its float32 depth); the z-buffer backend's mask differs only
    on silhouette pixels."""
    _, rig, cams, _ = scene
    renderer = HmcRenderer.from_rig(rig, cams)
    state = _state(rig, **FRAME)
    out = renderer.render(state)
    _, gbuffers = _generator(scene, out.vertices)
    truth_mask = torch.as_tensor(np.stack([g.hit for g in gbuffers]))[None]
    truth_depth = torch.as_tensor(np.stack([np.where(g.hit, g.depth, 0) for g in gbuffers]))[None]
    assert torch.equal(out.mask, truth_mask)
    assert (out.depth - truth_depth).abs().max() < 2e-6  # metres; float32 at ~5 cm
    zbuf = HmcRenderer.from_rig(rig, cams, backend=ZBufferBackend()).render(state)
    differ = zbuf.mask != truth_mask
    silhouette = ~_interior(truth_mask) & ~_interior(~truth_mask)  # a 4-neighbour differs
    assert differ.float().mean() < 0.01 and not (differ & ~silhouette).any()


def test_ir_matches_the_generator_after_fitting_appearance(scene, calibrated):
    """Fitted to the generator's noise-free images of a calibration frame, the appearance
    model reproduces its images of another state (other expression, pose and gaze)
    within a few grey levels inside the mask (tolerances: docs/renderer.md)."""
    _, rig, cams, _ = scene
    app, cpu = calibrated
    renderer = HmcRenderer.from_rig(rig, cams)
    generic = _appearance(scene)
    for frame, bound_rms, bound_p95 in ((CALIBRATION, 2.0, 4.0), (FRAME, 4.0, 5.0)):
        state = _state(rig, **frame)
        with torch.no_grad():
            out = renderer.render(state, app)
            images, _ = _generator(scene, out.vertices)
            inside = _interior(out.mask)
            residual = (out.ir - images)[inside] * 255
            start = (renderer.render(state, generic).ir - images)[inside] * 255
        rms, p95 = float(residual.pow(2).mean().sqrt()), float(residual.abs().quantile(0.95))
        print(f"IR residual inside the mask: rms {rms:.2f}, p95 {p95:.2f} grey levels "
              f"(generic start: rms {float(start.pow(2).mean().sqrt()):.1f}); fit {cpu:.1f} CPU-s")
        assert rms < bound_rms and p95 < bound_p95


def test_fitting_recovers_pose_and_expression(scene, calibrated):
    """Appearance fitted on a calibration frame; then, from a perturbed start (3 deg,
    3 mm, the 3 active coefficients at 0), pixel + keypoint losses (68 landmarks where in
    view, 0.3 px noise), 4 rounds of L-BFGS, recover the frame's head pose and expression."""
    _, rig, cams, _ = scene
    renderer = HmcRenderer.from_rig(rig, cams)
    app, _ = calibrated
    truth = _state(rig, **FRAME)
    vertices = renderer.rig(truth)
    images, _ = _generator(scene, vertices)
    landmarks = torch.as_tensor(rig.model.landmarks68, dtype=torch.int64)
    keypoints, depth = renderer.project(vertices[:, landmarks])
    seen = (depth > 0.01) & (keypoints >= -0.5).all(-1) & (keypoints <= SIZE - 0.5).all(-1)
    noise = 0.3 * torch.randn(keypoints.shape, generator=torch.Generator().manual_seed(0))  # px at 100 px
    keypoints = torch.where(seen[..., None], keypoints + noise, torch.nan)
    free = [rig.definition.index(n) for n in FRAME["coefficients"]]
    start_b = truth.b.clone()
    start_b[:, free] = 0.0
    tilt = rotvec_to_matrix(torch.tensor([[0.035, -0.035, 0.02]]))  # 3.0 degrees
    start = RigState(start_b, truth.gaze, tilt @ truth.R, truth.t + torch.tensor([[2.0, -2.0, 1.0]]) / 1000)
    fitted = fit_state(renderer, app, images, start, free, keypoints, landmarks, StateFitConfig())

    rel = fitted.R[0] @ truth.R[0].T
    angle = float(torch.arccos(((rel.trace() - 1) / 2).clamp(-1, 1))) * 180 / np.pi
    shift = float((fitted.t - truth.t).norm()) * 1000
    b_err = (fitted.b[0, free] - truth.b[0, free]).abs()
    print(f"recovered: rotation {angle:.3f} deg, translation {shift:.3f} mm, b error {b_err.tolist()}")
    assert angle < 0.2 and shift < 0.4 and float(b_err.max()) < 0.08


def test_potentially_visible_set_renders_like_the_whole_mesh(scene):
    """The renderer restricted to the triangles seen in the extreme states (grown by 2
    rings) sees what the whole mesh shows in a state that is none of them (a mix of
    shapes, head moved, gaze turned): the same triangle in all but a few pixels, and the
    same depth and normals there; it keeps well under the whole mesh."""
    from rigs.render.visible_set import extreme_states, grow_rings, potentially_visible

    _, rig, cams, _ = scene
    renderer = HmcRenderer.from_rig(rig, cams, scale=0.64)
    k = rig.definition.size
    candidates = potentially_visible(renderer, extreme_states(k, (torch.eye(3), torch.zeros(3))), rings=2)
    assert 0.2 < len(candidates) / len(rig.model.triangles) < 0.7
    strip = np.array([[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6]])  # each ring: one vertex further
    assert grow_rings(strip, [0], 0).tolist() == [0]
    assert grow_rings(strip, [0], 1).tolist() == [0, 1, 2]
    assert grow_rings(strip, [0], 2).tolist() == [0, 1, 2, 3, 4]
    state = _state(rig, **FRAME)
    full = renderer.render(state)
    renderer.restrict(candidates)
    part = renderer.render(state)
    differ = (full.mask != part.mask) | ((full.depth - part.depth).abs() > 1e-4)
    both = full.mask & part.mask
    dot = (full.normals[both] * part.normals[both]).sum(-1)
    print(f"{len(candidates)} of {len(rig.model.triangles)} triangles; {int(differ.sum())} of {differ.numel()} "
          f"pixels differ; normals off in {int((dot < 0.999).sum())}")
    assert differ.float().mean() < 1e-3
    assert float((dot > 0.999).float().mean()) > 0.999, "normals from the set's triangles equal the whole mesh's"
    renderer.restrict(None)
    assert torch.equal(renderer.render(state).mask, full.mask)
