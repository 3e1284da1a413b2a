"""The differentiable renderer on a tiny constructed rig: posing, backends, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rigs.camera import Camera
from rigs.definition import RigDefinition
from rigs.face_model import FaceModel
from rigs.render import (
    AppearanceModel,
    CameraBatch,
    HmcRenderer,
    RaycastBackend,
    RigState,
    TorchRig,
    VisibilityBackend,
    ZBufferBackend,
    quaternion_to_matrix,
    rotvec_to_matrix,
)
from rigs.render.appearance import ALBEDO, ALBEDO_MAP, CAMERA, LIGHT
from rigs.rig import BlendshapeRig
from stages.fit_solve import single_thread


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: extra intra-op threads only contend on a loaded machine."""
    with single_thread():
        yield


EYES = ((0.012, 0.006, 0.107), (-0.012, 0.006, 0.107))
EYE_RADIUS = 0.005


def _octahedron(centre: tuple[float, float, float], r: float) -> tuple[np.ndarray, np.ndarray]:
    v = np.array([[r, 0, 0], [-r, 0, 0], [0, r, 0], [0, -r, 0], [0, 0, r], [0, 0, -r]]) + centre
    t = np.array([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    return v, t


def tiny_rig(n: int = 9) -> BlendshapeRig:
    """A bumpy 6 x 6 cm height-field 'face' at z ~ 0.1 m facing +z, two octahedral
    eyeballs in front of it, and 3 smooth expression shapes."""
    x, y = np.meshgrid(np.linspace(-0.03, 0.03, n), np.linspace(-0.03, 0.03, n))
    z = 0.1 + 0.004 * np.cos(x / 0.02) * np.cos(y / 0.025)
    face = np.stack([x, y, z], -1).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(n - 1), np.arange(n - 1))
    a = (j * n + i).ravel()
    tris = [np.stack([a, a + 1, a + n], 1), np.stack([a + 1, a + n + 1, a + n], 1)]
    verts, parts = [face], [np.zeros(len(face), np.int8)]
    for e, centre in enumerate(EYES):
        v, t = _octahedron(centre, EYE_RADIUS)
        tris.append(t + sum(len(p) for p in verts))
        verts.append(v)
        parts.append(np.full(len(v), e + 1, np.int8))
    verts, tris, parts = np.concatenate(verts), np.concatenate(tris).astype(np.int32), np.concatenate(parts)
    nv = len(verts)
    deltas = np.zeros((3, nv, 3))
    on_face = parts == 0
    deltas[0, on_face, 2] = 0.006 * np.exp(-((verts[on_face, 0] ** 2 + verts[on_face, 1] ** 2) / 0.015**2))
    deltas[1, on_face, 1] = -0.004 * (verts[on_face, 1] < 0) * (-verts[on_face, 1] / 0.03)
    deltas[2, on_face, 0] = 0.1 * verts[on_face, 0]
    uv = np.where(on_face[:, None], verts[:, :2] / 0.08 + 0.5, 0.5)  # inside the border texels
    names = ("bulge", "drop", "widen")
    model = FaceModel(
        name="tiny", version="0", neutral=verts.astype(np.float32), triangles=tris,
        identity_basis=np.zeros((1, nv, 3), np.float32), expression_basis=deltas.astype(np.float32),
        expression_names=names, vertex_part=parts, part_names=("face", "eyeball_left", "eyeball_right"),
        uv=uv.astype(np.float32), triangle_uv=tris, landmarks68=np.zeros(68, np.int32),
        eye_centres=np.array(EYES, np.float32), fitting_vertices=np.flatnonzero(on_face).astype(np.int32),
    )
    definition = RigDefinition("tiny", "0", names, (), 0.5, (), (), ())
    return BlendshapeRig.generic(model, definition)


def tiny_cameras(size: int = 32) -> dict[str, Camera]:
    """Three distorted cameras around the tiny face (one straight on, two oblique)."""
    k = np.array([-0.12, 0.015, 0.0, 0.0, 0.0])
    spots = {"front": (0.0, 0.0, 0.16), "left": (0.03, -0.01, 0.15), "up": (-0.01, 0.035, 0.15)}
    return {name: Camera.look_at(np.array(p), np.array([0.0, 0.0, 0.1]), np.array([0.0, 1.0, 0.0]),
                                 width=size, height=size, focal=0.9 * size, distortion=k)
            for name, p in spots.items()}


def _appearance(rig: BlendshapeRig, names, dtype=torch.float64) -> AppearanceModel:
    rng = np.random.default_rng(3)
    # Linear ramps: bilinear look-ups of a linear map have no kinks at texel centres, so
    # the loss is smooth in the geometry and central differences apply.
    row, col = np.mgrid[0:8, 0:8] / 8.0
    seed = 0.3 + 0.2 * col + 0.1 * row
    in_atlas = rig.model.vertex_part[rig.model.triangles[:, 0]] == 0
    app = AppearanceModel(names, seed, np.ones((8, 8)), in_atlas, rig.model.n_vertices, dtype)
    with torch.no_grad():  # away from the generic start, inside (0, 1) after the gain
        app.log_gain.fill_(np.log(0.15))
        app.light_offset.copy_(torch.as_tensor(rng.normal(0, 0.004, (len(names), 3))))
        app.vignette.copy_(torch.as_tensor(rng.normal(0, 0.1, (len(names), 3))))
        app.albedo_residual.copy_(torch.as_tensor(0.05 * row - 0.03 * col))
        app.wrap.fill_(0.2)
        app.bias.fill_(0.02)
        app.off_axis.fill_(1.5)
        app.background.fill_(0.05)  # off the clip's kink at 0
    return app


def _state(dtype=torch.float64) -> dict[str, torch.Tensor]:
    return {"b": torch.tensor([[0.3, 0.5, 0.2], [0.7, 0.1, 0.4]], dtype=dtype),
            "gaze": torch.tensor([[0.1, -0.05, 0.08, 0.02], [-0.2, 0.1, -0.1, 0.15]], dtype=dtype),
            "rotvec": torch.tensor([[0.02, -0.03, 0.01], [-0.01, 0.02, 0.03]], dtype=dtype),
            "t": torch.tensor([[0.001, -0.002, 0.003], [-0.002, 0.001, -0.001]], dtype=dtype)}


def test_torch_posing_matches_the_numpy_rig():
    """TorchRig(b, gaze, R, t) equals R @ BlendshapeRig.pose(b, gaze) + t on the ICT rig."""
    from rigs.face_model import load_ict_face_model

    rig = BlendshapeRig.generic(load_ict_face_model())
    rng = np.random.default_rng(0)
    b = rng.uniform(0, 1, (2, rig.definition.size)).astype(np.float32)
    gaze = rng.uniform(-0.4, 0.4, (2, 4))
    rotvec = rng.normal(0, 0.1, (2, 3))
    t = rng.normal(0, 0.005, (2, 3))
    R = rotvec_to_matrix(torch.as_tensor(rotvec)).numpy()
    expected = np.einsum("fij,fvj->fvi", R, rig.pose(b, gaze).astype(np.float64)) + t[:, None]
    state = RigState(torch.as_tensor(b, dtype=torch.float64), torch.as_tensor(gaze),
                     torch.as_tensor(R), torch.as_tensor(t))
    got = TorchRig(rig, torch.float64)(state).numpy()
    assert np.abs(got - expected).max() < 2e-6  # float32 rounding of the numpy pose (m)
    eyes = np.r_[rig.eyeball_vertices[0], rig.eyeball_vertices[1]]
    rest = TorchRig(rig, torch.float64)(RigState(state.b, torch.zeros(2, 4, dtype=torch.float64), state.R, state.t))
    assert np.abs(rest.numpy()[:, eyes] - got[:, eyes]).max() > 1e-3  # gaze does move the eyes


def test_rotation_parametrisations_agree():
    rng = np.random.default_rng(1)
    v = torch.as_tensor(rng.normal(0, 0.7, (5, 3)))
    angle = v.norm(dim=-1, keepdim=True)
    q = torch.cat([torch.cos(angle / 2), torch.sin(angle / 2) * v / angle], -1)
    R = rotvec_to_matrix(v)
    assert torch.allclose(R, quaternion_to_matrix(q), atol=1e-12)
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=R.dtype).expand_as(R), atol=1e-12)
    assert torch.allclose(rotvec_to_matrix(torch.zeros(1, 3)), torch.eye(3)[None])


def test_backends_agree_on_a_constructed_scene():
    """Two overlapping triangles seen by a pinhole camera: the z-buffer and the ray caster
    give the same id at every pixel (no pixel centre lies on an edge); with the lens
    distorted, they differ only next to an id boundary (straight vs curved edges)."""
    verts = torch.tensor([[[-0.05, -0.04, 0.0], [0.05, -0.043, 0.0], [0.0, 0.05, 0.0],  # far, big
                           [-0.0213, -0.0117, 0.02], [0.0231, -0.0171, 0.02], [0.0037, 0.0283, 0.02]]],
                         dtype=torch.float64)
    tris = torch.tensor([[0, 1, 2], [3, 4, 5]])
    cam = Camera.look_at(np.array([0.0, 0.0, 0.1]), np.zeros(3), np.array([0.0, 1.0, 0.0]),
                         width=32, height=32, focal=30.0)
    batch = CameraBatch([cam], ["c"], torch.float64)
    assert isinstance(RaycastBackend(), VisibilityBackend) and isinstance(ZBufferBackend(), VisibilityBackend)
    ray = RaycastBackend().triangle_ids(verts, tris, batch)
    zbuf = ZBufferBackend().triangle_ids(verts, tris, batch)
    assert set(ray.unique().tolist()) == {-1, 0, 1}
    assert torch.equal(ray, zbuf)

    rig = tiny_rig()
    batch = CameraBatch.from_dict(tiny_cameras(32), dtype=torch.float64)
    v = TorchRig(rig, torch.float64)(RigState.rest(1, 3, torch.float64))
    tris = torch.as_tensor(rig.model.triangles, dtype=torch.int64)
    ray = RaycastBackend().triangle_ids(v, tris, batch)[0].numpy()
    zbuf = ZBufferBackend().triangle_ids(v, tris, batch)[0].numpy()
    pad = np.pad(ray, ((0, 0), (1, 1), (1, 1)), mode="edge")
    boundary = ((pad[:, 1:-1, :-2] != ray) | (pad[:, 1:-1, 2:] != ray)
                | (pad[:, :-2, 1:-1] != ray) | (pad[:, 2:, 1:-1] != ray))
    differ = ray != zbuf
    assert (ray >= 0).mean() > 0.3
    assert differ.mean() < 0.03 and not (differ & ~boundary).any()


def _render_loss(renderer: HmcRenderer, app: AppearanceModel, params: dict[str, torch.Tensor],
                 ids: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    state = RigState(params["b"], params["gaze"], rotvec_to_matrix(params["rotvec"]), params["t"])
    out = renderer.render(state, app, triangle_ids=ids)
    return ((out.ir * weights["ir"]).sum() + (out.depth * weights["depth"]).sum() * 10
            + (out.normals * weights["normals"]).sum() + (out.uv * weights["uv"]).sum())


def _central(loss, tensors: list[torch.Tensor], dirs: list[torch.Tensor], h: float) -> torch.Tensor:
    """Central difference of ``loss()`` along ``dirs`` (tensors moved in place and back)."""
    with torch.no_grad():
        for x, d in zip(tensors, dirs, strict=True):
            x += h * d
        up = loss()
        for x, d in zip(tensors, dirs, strict=True):
            x -= 2 * h * d
        down = loss()
        for x, d in zip(tensors, dirs, strict=True):
            x += h * d
    return (up - down) / (2 * h)


@pytest.mark.parametrize("group", ["b", "gaze", "rotvec", "t", "light", "camera", "albedo"])
def test_gradients_match_finite_differences(group: str):
    """Directional derivatives of a loss over IR, depth, normals and UV (float64, fixed
    visibility) agree with central differences along random directions, per input group."""
    rig = tiny_rig()
    cams = tiny_cameras()
    renderer = HmcRenderer.from_rig(rig, cams, dtype=torch.float64)
    app = _appearance(rig, list(cams))
    params = _state()
    ids = renderer.visibility(renderer.rig(RigState(params["b"], params["gaze"], rotvec_to_matrix(params["rotvec"]), params["t"])))
    out = renderer.render(RigState(params["b"], params["gaze"], rotvec_to_matrix(params["rotvec"]), params["t"]), app, triangle_ids=ids)
    inside = out.ir[out.mask]
    assert inside.min() > 0 and inside.max() < 1  # the clip is inactive: smooth everywhere
    eyeball_hits = ~app.in_atlas[out.surface.triangle]
    assert eyeball_hits.sum() > 10  # the eyes are seen (gaze and vertex albedo matter)
    gen = torch.Generator().manual_seed(7)
    weights = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64)
               for k, v in (("ir", out.ir), ("depth", out.depth), ("normals", out.normals), ("uv", out.uv))}
    groups = {"light": LIGHT, "camera": CAMERA, "albedo": ALBEDO + ALBEDO_MAP}
    tensors = app.groups(*groups[group]) if group in groups else [params[group]]
    for x in tensors:
        x.requires_grad_(True)
    loss = _render_loss(renderer, app, params, ids, weights)
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(tensors, grads, strict=True)]
    for _ in range(3):
        dirs = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in tensors]
        analytic = sum((g * d).sum() for g, d in zip(grads, dirs, strict=True))

        # Richardson: cancels the h^2 term (the mesh's mm-scale curvature makes it large
        # for steps in metres).
        def loss() -> torch.Tensor:
            return _render_loss(renderer, app, params, ids, weights)

        numeric = (4 * _central(loss, tensors, dirs, 5e-7) - _central(loss, tensors, dirs, 1e-6)) / 3
        assert abs(float(analytic)) > 1e-3  # the direction does change the loss
        assert abs(float(analytic - numeric)) <= 1e-6 * max(1.0, abs(float(numeric))), (group, analytic, numeric)


def test_geometry_outputs_are_consistent():
    """Depth, distance and points of the differentiable pass agree with the ray caster's
    hits, and normals are unit and face the cameras."""
    from rigs.raycast import Scene

    rig = tiny_rig()
    cams = tiny_cameras()
    renderer = HmcRenderer.from_rig(rig, cams, dtype=torch.float64)
    state = RigState.rest(1, 3, torch.float64)
    out = renderer.render(state)
    v = out.vertices[0].numpy()
    for c, cam in enumerate(cams.values()):
        origins, dirs = cam.pixel_rays()
        hit = Scene(v, rig.model.triangles).cast(origins, dirs)
        found = np.isfinite(hit["t"])
        assert np.array_equal(found, out.mask[0, c].numpy())
        depth = cam.to_camera(origins + dirs * np.where(found, hit["t"], 0)[..., None])[..., 2]
        assert np.abs(depth[found] - out.depth[0, c].numpy()[found]).max() < 1e-6  # float32 ray caster
    s = out.surface
    assert torch.allclose(s.normal.norm(dim=-1), torch.ones(len(s.normal), dtype=s.normal.dtype))
    rays = (s.point - renderer.cameras.centre[s.camera]) / s.distance[:, None]
    assert ((s.normal * rays).sum(-1) < 0).float().mean() > 0.99  # front faces
