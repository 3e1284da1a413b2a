"""Self-supervision building blocks: frame loading and checks, the network, resumable training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from stages.selfsup.frames import DARK, USABLE, FrameCheck, load_clip, network_input
from stages.selfsup.network import NetworkConfig, StateNetwork, rotation_from_6d
from stages.selfsup.training import TrainConfig, batch_indices, learning_rate_factor, train
from storage.capture import Capture
from storage.png_io import encode_png
from tests.capture_factory import make_capture


def test_clip_downsamples_scales_keypoints_and_flags_a_black_camera(tmp_path):
    made = make_capture(tmp_path, hmc_size=(32, 32), n_frames=6, keypoints=("eye_left", "mouth_left"))
    # Camera eye_left goes black in frame 2.
    made.layout.hmc_frame(made.recording, "eye_left", 2).write_bytes(
        encode_png(np.zeros((32, 32), np.uint8), "mono"))
    rec = Capture.open(made.root).recording(made.recording)
    clip = load_clip(rec, ["eye_left", "mouth_left", "glabella"], 16, FrameCheck(dark_mean=6.0))

    assert clip.images.shape == (6, 3, 16, 16)
    expect = made.frames["mouth_left"][1].reshape(16, 2, 16, 2).mean((1, 3))
    np.testing.assert_allclose(clip.images[1, 1], expect, atol=0.51)  # area mean, rounded
    assert clip.usability[2, 0] == DARK and (clip.usability[[0, 1, 3, 4, 5]] == USABLE).all()
    assert clip.segments == made.segments
    assert clip.frame_reasons()[2] == "eye_left dark" and clip.frame_reasons()[0] == ""

    pts, conf = made.keypoints["mouth_left"]
    np.testing.assert_allclose(clip.keypoints[1, 1], (pts[1] + 0.5) * 0.5 - 0.5, rtol=1e-6)
    assert np.isnan(clip.keypoints[:, 2]).all() and (clip.keypoint_confidence[:, 2] == 0).all()  # no file
    assert np.isnan(clip.keypoints[2, 0]).all()  # the dark camera's points are dropped
    assert clip.keypoint_confidence[0, 0, 0] == 0  # undetected in the file


def test_network_input_flips_only_mirrored_cameras():
    images = np.arange(2 * 2 * 4 * 4, dtype=np.uint8).reshape(2, 2, 4, 4)
    x = network_input(images, np.array([True, False]))
    np.testing.assert_allclose(x[:, 0].numpy(), images[:, 0, :, ::-1] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(x[:, 1].numpy(), images[:, 1] / 255.0, rtol=1e-6)


def test_clip_rejects_bad_size(tmp_path):
    made = make_capture(tmp_path)
    with pytest.raises(ConfigError):
        load_clip(Capture.open(made.root).recording(made.recording), ["eye_left"], 8)


def test_rotation_from_6d_is_orthonormal_and_identity_at_init():
    r = rotation_from_6d(torch.randn(50, 6, dtype=torch.float64))
    eye = torch.eye(3, dtype=torch.float64).expand(50, 3, 3)
    torch.testing.assert_close(r.transpose(-1, -2) @ r, eye)
    assert torch.allclose(torch.linalg.det(r), torch.ones(50, dtype=torch.float64))
    net = StateNetwork(3, 5)
    state = net(torch.rand(4, 3, 32, 32))
    torch.testing.assert_close(state.rotation, torch.eye(3).expand(4, 3, 3))
    assert torch.allclose(state.b, torch.full((4, 5), torch.sigmoid(torch.tensor(-3.0)).item()))
    assert (state.translation == 0).all() and (state.gaze == 0).all()


def test_network_outputs_stay_in_bounds_for_any_input():
    torch.manual_seed(0)
    net = StateNetwork(2, 7, NetworkConfig(gaze_limit_rad=0.5, translation_limit_m=0.01))
    for p in net.head.parameters():
        torch.nn.init.normal_(p, std=5.0)  # push every output to saturation
    s = net(torch.rand(8, 2, 32, 32) * 10)
    assert ((s.b >= 0) & (s.b <= 1)).all()
    assert s.gaze.abs().max() <= 0.5 and s.translation.abs().max() <= 0.01


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, final_lr_fraction=0.1)
    f = [learning_rate_factor(s, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert f[-1] == pytest.approx(0.1, abs=0.01)
    np.testing.assert_array_equal(batch_indices(7, 50, cfg), batch_indices(7, 50, cfg))


def _toy_problem(seed: int):
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    g = torch.Generator().manual_seed(123)
    x, y = torch.randn(40, 6, generator=g), torch.randn(40, 2, generator=g)

    def step_loss(idx, _step):
        loss = ((module(x[idx]) - y[idx]) ** 2).mean()
        return loss, {"loss": loss.item()}
    return module, step_loss


def test_a_killed_run_resumes_to_the_same_parameters(tmp_path):
    cfg = TrainConfig(steps=30, batch_size=8, checkpoint_every=10, warmup_steps=3, learning_rate=2e-2)
    whole, loss_a = _toy_problem(0)
    hist_a = train(whole, loss_a, 40, cfg)

    from pipeline.artifacts import ArtifactStore

    ckpt = ArtifactStore(str(tmp_path)).checkpoint("selfsup", "k1")

    class Killed(Exception):
        pass

    part, loss_b = _toy_problem(0)

    def kill_at_25(done, _terms):
        if done == 25:
            raise Killed
    with pytest.raises(Killed):
        train(part, loss_b, 40, cfg, ckpt, progress=kill_at_25)
    resumed, loss_c = _toy_problem(1)  # other initial weights: the checkpoint must override them
    hist_c = train(resumed, loss_c, 40, cfg, ckpt)

    assert hist_c.resumed_from == 20
    for pa_, pc in zip(whole.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(pa_, pc, rtol=0, atol=0)
    assert hist_c.terms["loss"] == pytest.approx(hist_a.terms["loss"], rel=1e-6)
    assert np.mean(hist_a.terms["loss"][-5:]) < 0.7 * np.mean(hist_a.terms["loss"][:5])  # it learns


# ------------------------------------------------------------------------------ losses
def test_full_blendshapes_places_shapes_and_matches_the_numpy_gaze_convention():
    from rigs.definition import load_default_rig_definition
    from stages.selfsup.losses import RigIndex, full_blendshapes

    d = load_default_rig_definition()
    idx = RigIndex.of(d)
    rng = np.random.default_rng(0)
    b = torch.as_tensor(rng.uniform(0, 1, (5, len(d.regressed))))
    gaze = torch.as_tensor(rng.uniform(-0.7, 0.7, (5, 4)))
    full = full_blendshapes(b, gaze, d, idx).numpy()
    assert full.shape == (5, d.size)
    np.testing.assert_allclose(full[:, idx.regressed], b.numpy())
    np.testing.assert_allclose(full[:, idx.eye_following], d.eye_following_from_gaze(gaze.numpy()), rtol=1e-6)


def test_keypoint_loss_weights_skips_missing_and_caps_outliers():
    from stages.selfsup.losses import keypoint_loss

    pred = torch.zeros(1, 1, 3, 2)
    obs = torch.tensor([[[[3.0, 4.0], [float("nan"), 0.0], [0.0, 0.0]]]])  # 5 px, missing, exact
    conf = torch.tensor([[[1.0, 1.0, 1.0]]])
    assert keypoint_loss(pred, obs, conf).item() == pytest.approx(0.5 * 25 / 2)
    # Huber: a 5 px error beyond 2 px counts 2 * (5 - 1) = 8 instead of 12.5.
    assert keypoint_loss(pred, obs, conf, huber_px=2.0).item() == pytest.approx(8 / 2)
    assert keypoint_loss(pred, obs, torch.tensor([[[0.0, 1.0, 1.0]]])).item() == 0.0


def test_pixel_and_constraint_losses_on_known_values():
    from rigs.definition import load_default_rig_definition
    from rigs.render.losses import masked_l2 as pixel_loss
    from stages.selfsup.losses import RigIndex, constraint_loss, sparsity_loss

    r = torch.zeros(1, 1, 2, 2)
    o = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]]])
    m = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert pixel_loss(r, o, m).item() == pytest.approx((1 + 0.25) / 2)
    d = load_default_rig_definition()
    idx = RigIndex.of(d)
    assert len(idx.antagonistic) and len(idx.at_most)
    b = torch.zeros(2, len(d.regressed))
    assert constraint_loss(b, idx).item() == 0.0 and sparsity_loss(b).item() == 0.0
    a, c = idx.antagonistic[0]
    b[:, a], b[:, c] = 0.5, 0.4
    assert constraint_loss(b, idx).item() == pytest.approx(0.2)
    assert sparsity_loss(b).item() == pytest.approx(0.9)  # per-frame l1, not a mean over bases
    b2 = torch.zeros(1, len(d.regressed))
    lo, hi = idx.at_most[0]
    b2[0, lo] = 0.3  # b[lo] <= b[hi] = 0 broken by 0.3
    assert constraint_loss(b2, idx).item() == pytest.approx(0.09)


# ------------------------------------------------------------------------------ engine
_CALLS: list[bytes | None] = []


def _resumable_fn(capture, checkpoint):
    seen = checkpoint.load()
    _CALLS.append(seen)
    if seen is None:
        checkpoint.save(b"half done")
        raise RuntimeError("killed half-way")
    return {"x": np.frombuffer(seen, np.uint8).copy()}


def test_a_resumable_stage_gets_its_checkpoint_back_after_a_failure_and_loses_it_on_commit(tmp_path):
    from pipeline.artifacts import ArtifactStore
    from pipeline.runlog import StageLog
    from pipeline.stage import Stage
    from pipeline.tasks import InputRef, StageFailure, UnitSpec, execute_unit

    store = ArtifactStore(str(tmp_path / "store"))
    stage = Stage(name="resumable", version="1", fn=_resumable_fn, resumable=True)
    spec = UnitSpec(stage, "s1", "key1", (InputRef("capture", "cap"),), run_id="r1")
    log = StageLog(str(tmp_path / "run"))
    _CALLS.clear()
    with pytest.raises(StageFailure):
        execute_unit(spec, store, log)
    result = execute_unit(spec, store, log)  # the retry resumes
    assert _CALLS == [None, b"half done"] and result.executed
    assert store.load("resumable", "key1")["x"].tobytes() == b"half done"
    assert store.checkpoint("resumable", "key1").load() is None  # removed once committed


# ------------------------------------------------------------------------------ keypoints
def test_keypoint_layout_matches_the_models_landmarks():
    from rigs.face_model import load_ict_face_model
    from stages.selfsup.keypoints import keypoint_layout

    model = load_ict_face_model()
    rng = np.random.default_rng(1)
    verts = np.asarray(model.neutral, np.float64)[None] + rng.normal(0, 1e-3, (2, *np.shape(model.neutral)))
    layout = keypoint_layout("iris10+multipie68", model)
    got = layout.points(torch.as_tensor(verts)).numpy()
    mp = model.embeddings["mediapipe478"].points(verts, np.asarray(model.triangles))
    want = np.concatenate([mp[:, 468:478], verts[:, model.landmarks68]], 1)
    assert layout.size == 78
    np.testing.assert_allclose(got, want, atol=1e-12)
    with pytest.raises(ConfigError, match="unknown keypoint layout"):
        keypoint_layout("dlib5", model)


def test_posing_only_the_keypoints_vertices_gives_the_whole_meshs_keypoints():
    """The render-free energy poses only the layout's vertices (layout.compact): with
    blendshapes, turned eyes (the iris points sit on the eyeballs), a head pose and a
    neutral correction, its keypoints equal those of the whole posed mesh."""
    from rigs.face_model import load_ict_face_model
    from rigs.render import RigState, TorchRig
    from rigs.render.correction import NeutralCorrection
    from rigs.render.posing import rotvec_to_matrix
    from rigs.rig import BlendshapeRig
    from stages.selfsup.keypoints import keypoint_layout

    rig = BlendshapeRig.generic(load_ict_face_model())
    torch_rig = TorchRig(rig, torch.float64)
    correction = NeutralCorrection(rig.model.triangles, rig.model.n_vertices, np.concatenate(rig.eyeball_vertices))
    with torch.no_grad():
        correction.parameter.normal_(0, 0.05)
    torch_rig.correction = correction
    layout = keypoint_layout("iris10+multipie68", rig.model)
    used, compact = layout.compact()
    eyes = np.concatenate(rig.eyeball_vertices)
    assert len(used) < 300 and np.isin(used, eyes).any()  # a few hundred vertices, iris ones among them
    gen = torch.Generator().manual_seed(0)
    state = RigState(torch.rand(3, torch_rig.size, generator=gen, dtype=torch.float64),
                     0.3 * torch.randn(3, 4, generator=gen, dtype=torch.float64),
                     rotvec_to_matrix(0.1 * torch.randn(3, 3, generator=gen, dtype=torch.float64)),
                     0.01 * torch.randn(3, 3, generator=gen, dtype=torch.float64))
    with torch.no_grad():
        whole = layout.points(torch_rig(state))
        few = compact.points(torch_rig(state, vertices=torch.as_tensor(used)))
        rest = layout.points(torch_rig(RigState.rest(3, torch_rig.size)))
    assert float((whole - rest).abs().max()) > 1e-3
    torch.testing.assert_close(few, whole, rtol=0, atol=1e-12)


def test_neutral_correction_moves_the_posed_rig_holds_the_eyeballs_and_prefers_smooth_fields():
    from rigs.face_model import load_ict_face_model
    from rigs.render import RigState, TorchRig
    from rigs.render.correction import SCALE, NeutralCorrection, uniform_laplacian
    from rigs.rig import BlendshapeRig

    rig = BlendshapeRig.generic(load_ict_face_model())
    model = rig.model
    lap = uniform_laplacian(model.triangles, model.n_vertices)
    ones = torch.ones(model.n_vertices, 3)
    used = np.unique(model.triangles)
    assert torch.sparse.mm(lap, ones)[used].abs().max().item() < 1e-5  # constants are smooth
    eyes = np.concatenate(rig.eyeball_vertices)
    correction = NeutralCorrection(model.triangles, model.n_vertices, eyes)
    assert correction.prior().item() == 0.0
    torch_rig = TorchRig(rig)
    rest = RigState.rest(1, torch_rig.size)
    before = torch_rig(rest)
    torch_rig.correction = correction
    with torch.no_grad():
        correction.parameter[:, 2] = 0.1  # 1 mm along z everywhere but the eyeballs
    moved = (torch_rig(rest) - before)[0]
    assert torch.allclose(moved[eyes], torch.zeros(len(eyes), 3))
    others = np.setdiff1d(np.arange(model.n_vertices), eyes)
    assert torch.allclose(moved[others, 2], torch.full((len(others),), 0.1 * SCALE), atol=1e-7)
    smooth = correction.prior().item()
    with torch.no_grad():  # the same mean size, alternating in sign: much dearer
        correction.parameter[:, 2] = 0.1 * torch.where(torch.arange(model.n_vertices) % 2 == 0, 1.0, -1.0)
    assert correction.prior().item() > 10 * smooth
    assert correction.summary()["neutral_correction_max_mm"] == pytest.approx(1.0, rel=1e-4)


def test_an_eyelid_taper_holds_the_lids_and_frees_the_face_beyond_its_radius():
    from rigs.face_model import load_ict_face_model
    from rigs.render.correction import NeutralCorrection, eyelid_freedom
    from rigs.rig import BlendshapeRig

    rig = BlendshapeRig.generic(load_ict_face_model())
    model = rig.model
    lids = np.asarray(model.landmarks68)[36:48]
    freedom = eyelid_freedom(rig.neutral, lids, 0.01)
    assert (freedom[lids] == 0).all() and freedom.min() >= 0 and freedom.max() == 1
    nearest = np.linalg.norm(rig.neutral[:, None] - rig.neutral[lids][None], axis=-1).min(1)
    assert (freedom[nearest > 0.0101] == 1).all() and (freedom[nearest < 0.0099] < 1).all()
    assert freedom[np.argmin(np.abs(nearest - 0.005))] == pytest.approx(0.5, abs=0.01)
    distance = nearest
    eyes = np.concatenate(rig.eyeball_vertices)
    correction = NeutralCorrection(model.triangles, model.n_vertices, eyes, freedom=freedom)
    with torch.no_grad():
        correction.parameter[:] = 1.0
    offset = correction.offset().detach().norm(dim=-1)
    assert float(offset[lids].max()) == 0.0 and float(offset[eyes].max()) == 0.0
    assert float(offset[np.setdiff1d(np.flatnonzero(distance > 0.02), eyes)].min()) > 0


def test_temporal_smoothing_removes_jitter_keeps_steps_and_skips_rejected_frames():
    """A held expression with frame-to-frame jitter loses most of its second differences;
    a blink-long plateau keeps its height; a rejected frame neither changes nor leaks into
    its neighbours; quaternions stay unit with w >= 0 across a sign flip."""
    from scipy.spatial.transform import Rotation

    from stages.selfsup.temporal import smooth_frames, smooth_quaternions

    rng = np.random.default_rng(0)
    t = 200
    clean = np.zeros((t, 2))
    clean[80:95, 0] = 1.0  # a 15-frame closure
    noisy = clean + rng.normal(0, 0.03, clean.shape)
    ok = np.ones(t, bool)
    out = smooth_frames(noisy, ok, 0.7)

    def jerk(x):
        return np.abs(x[2:] - 2 * x[1:-1] + x[:-2]).mean()

    assert jerk(out[:70]) < 0.5 * jerk(noisy[:70])
    assert out[84:91, 0].min() > 0.9 and np.abs(out - clean).mean() < np.abs(noisy - clean).mean()
    ok[50] = False
    spiked = noisy.copy()
    spiked[50] = 100.0
    held = smooth_frames(spiked, ok, 0.7)
    assert held[50, 0] == 100.0 and np.abs(held[45:56][np.arange(11) != 5]).max() < 0.2
    np.testing.assert_array_equal(smooth_frames(noisy, ok, 0.0), noisy)

    q = Rotation.from_rotvec(np.c_[np.linspace(0, 0.2, 40), np.zeros((40, 2))]).as_quat()[:, [3, 0, 1, 2]]
    q[::2] *= -1  # the same rotations, signs flipped
    s = smooth_quaternions(q, np.ones(40, bool), 1.0)
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1, atol=1e-12)
    assert (s[:, 0] >= 0).all()
    angle = Rotation.from_quat(s[:, [1, 2, 3, 0]]).magnitude()
    np.testing.assert_allclose(angle[5:-5], np.linspace(0, 0.2, 40)[5:-5], atol=1e-3)
