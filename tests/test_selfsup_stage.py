"""The selfsup stage on the tiny subject: labels beat the all-zero labeller, a resumed run
equals an uninterrupted one, and bad frames get a status instead of a crash.

The true personal rig stands in for the rig stage's (the phone chain is tested elsewhere)
and no phone texture is given (a flat albedo seed), so the test isolates the network,
the renderer and the energy.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from stages.selfsup.label import label_subject
from stages.selfsup.stage import SelfSupConfig, SelfSupLabels
from stages.synthesis.truth import SubjectTruth
from storage.capture import Capture
from storage.label_table import validate_label_table
from storage.png_io import encode_png

#: Small enough for a test (about a minute of CPU); the benchmark runs the default.
SMALL = SelfSupConfig(resolution=32, steps=24, keypoint_warmup_steps=0, batch_size=4, appearance_steps=30,
                      appearance_frames=6, network_width=8, checkpoint_every=8, inference_batch=64)


@pytest.fixture(scope="module")
def truth_rig(tiny_subject):
    return SubjectTruth.open(tiny_subject[1]).rig


@pytest.fixture(scope="module")
def labelled(tiny_subject, truth_rig) -> SelfSupLabels:
    return label_subject(Capture.open(tiny_subject[0]), truth_rig, None, SMALL, verbose=False)


def test_labels_cover_every_frame_and_write_valid_label_rows(labelled, tiny_subject):
    cap = Capture.open(tiny_subject[0])
    assert labelled.recordings == cap.recordings
    assert sum(labelled.frame_counts) == sum(cap.recording(r).frame_count for r in cap.recordings)
    assert ((labelled.b >= 0) & (labelled.b <= 1)).all()
    np.testing.assert_allclose(np.linalg.norm(labelled.head_quat, axis=1), 1, atol=1e-5)
    assert (labelled.status == "ok").all() and np.isfinite(labelled.residual_photometric).all()
    table = validate_label_table(labelled.label_table(run_id="r0", pipeline_version="test"))
    assert table.num_rows == len(labelled.b)
    assert set(table.column("label_source").to_pylist()) == {"self_supervision"}
    again = SelfSupLabels.from_output(labelled.to_output())
    np.testing.assert_array_equal(again.b, labelled.b)


def test_training_lowers_the_energy(labelled):
    total = np.asarray(labelled.history["total"])
    assert total[-6:].mean() < 0.8 * total[:4].mean()


def test_a_killed_run_resumes_to_the_same_labels(tiny_subject, truth_rig, labelled, tmp_path):
    from pipeline.artifacts import ArtifactStore

    checkpoint = ArtifactStore(str(tmp_path)).checkpoint("selfsup", "k")

    class Killed(Exception):
        pass

    saved = checkpoint.save

    def save_then_die(data: bytes) -> None:
        saved(data)
        if _step_of(data) >= 16:
            raise Killed

    checkpoint.save = save_then_die
    with pytest.raises(Killed):
        label_subject(Capture.open(tiny_subject[0]), truth_rig, None, SMALL, checkpoint, verbose=False)
    checkpoint.save = saved
    resumed = label_subject(Capture.open(tiny_subject[0]), truth_rig, None, SMALL, checkpoint, verbose=False)
    np.testing.assert_allclose(resumed.b, labelled.b, atol=1e-6)
    np.testing.assert_allclose(resumed.head_t, labelled.head_t, atol=1e-7)


def _step_of(data: bytes) -> int:
    import io

    import torch

    return int(torch.load(io.BytesIO(data), weights_only=False)["step"])


def test_a_black_camera_and_missing_keypoints_give_a_status_not_a_crash(tiny_subject, truth_rig, tmp_path):
    capture = tmp_path / tiny_subject[0].name  # the folder name is the subject id
    shutil.copytree(tiny_subject[0], capture)
    cap = Capture.open(capture)
    rec = cap.recording(cap.recordings[0])
    size = rec.rig.camera("eye_left").intrinsics.size
    black = encode_png(np.zeros((size[1], size[0]), np.uint8), "mono")
    for i in (3, 4):
        for cam in ("eye_left",) if i == 3 else rec.cameras:  # frame 4: every camera black
            cap.layout.hmc_frame(rec.name, cam, i).write_bytes(black)
    shutil.rmtree(rec.root / "keypoints")
    cfg = SelfSupConfig(**{**SMALL.__dict__, "steps": 4, "appearance_steps": 4})
    labels = label_subject(Capture.open(capture), truth_rig, None, cfg, verbose=False)
    assert labels.status[3] == "ok" and labels.reason[3] == "degraded: eye_left dark"
    assert labels.status[4] == "rejected" and "0 usable camera(s)" in labels.reason[4]
    assert np.isnan(labels.residual_keypoint_px).all()  # no keypoint file: no keypoint term
    assert labels.confidence[3] < labels.confidence[2]


def test_the_per_frame_baseline_beats_the_zero_labeller_inside_a_peak(tiny_subject, truth_rig):
    """The baseline (no network) fits three frames of a peak window from the estimated
    donning: its energy drops below the rest state's and its active coefficients come closer
    to the truth than all zeros do."""
    import torch

    from stages.selfsup.baseline import BaselineConfig, track
    from stages.selfsup.label import build_energy, estimate_donning, fit_initial_appearance
    from stages.selfsup.stage import load_pool, neutral_frames

    cap = Capture.open(tiny_subject[0])
    cfg = SelfSupConfig(resolution=32, appearance_frames=6, appearance_steps=30)
    names, pool = load_pool(cap, cfg)
    energy = build_energy(cap, truth_rig, None, names, cfg)
    donning = estimate_donning(energy, pool, neutral_frames(pool, 6))
    fit_initial_appearance(energy, pool, cfg, flat_seed=True, donning=donning)
    rec = cap.recording(cap.recordings[0])
    peak = next(s for s in rec.segments if s.kind == "peak")
    rows = np.arange(3) + (peak.start + peak.end) // 2 - 1
    fitted = track(energy, pool, BaselineConfig(first_steps=60, steps=20), rows, donning)

    definition = truth_rig.definition
    regressed = definition.indices(list(definition.regressed))
    true_b = SubjectTruth.open(tiny_subject[1]).hmc(rec.name)["b"][rows][:, regressed]
    active = true_b >= 0.1
    assert active.sum() >= 3
    assert np.abs(fitted.b - true_b)[active].mean() < 0.8 * true_b[active].mean()
    data = pool.data(rows)
    k = len(regressed)
    rest = energy(torch.zeros(3, k), torch.zeros(3, 4), donning[0].expand(3, 3, 3), donning[1].expand(3, 3), data)
    fit = energy(torch.as_tensor(fitted.b), torch.as_tensor(fitted.gaze), torch.as_tensor(fitted.rotation),
                 torch.as_tensor(fitted.translation), data)
    assert float(fit.total) < 0.7 * float(rest.total)


def test_the_fitted_appearance_sees_an_eye_close(tiny_subject, truth_rig):
    """With the first appearance fit's albedo stage (the eyeballs get their own albedo),
    the pixel term of the true state prefers the eyes as they are: closed in an
    eye-closure frame, open in a neutral one. Without it the eyeballs keep the skin's
    albedo and an eye close changes the pixel term several times less."""
    import torch
    from scipy.spatial.transform import Rotation

    from stages.selfsup.label import build_energy, estimate_donning, fit_initial_appearance
    from stages.selfsup.stage import load_pool, neutral_frames

    cap = Capture.open(tiny_subject[0])
    truth = SubjectTruth.open(tiny_subject[1])
    rec = cap.recording(cap.recordings[0])
    closed = next(s for s in rec.segments if s.kind == "eye_closure")
    frames = {"closed": (closed.start + closed.end) // 2, "open": _neutral_middle(rec)}
    hmc = truth.hmc(rec.name)
    d = truth_rig.definition
    regressed = d.indices(list(d.regressed))
    blinks = [d.regressed.index("eyeBlink_L"), d.regressed.index("eyeBlink_R")]

    def pixel_gap(albedo: bool) -> dict[str, float]:
        """pixel term at blink 1 minus at blink 0, per frame (the true state otherwise)."""
        cfg = SelfSupConfig(resolution=48, appearance_frames=6, appearance_steps=30, appearance_albedo=albedo)
        names, pool = load_pool(cap, cfg)
        energy = build_energy(cap, truth_rig, None, names, cfg)
        fit_initial_appearance(energy, pool, cfg, flat_seed=True,
                               donning=estimate_donning(energy, pool, neutral_frames(pool, 6)))
        gaps = {}
        for name, f in frames.items():
            b = torch.as_tensor(hmc["b"][f][regressed], dtype=torch.float32)[None].repeat(2, 1)
            b[0, blinks], b[1, blinks] = 1.0, 0.0
            rot = torch.as_tensor(Rotation.from_quat(hmc["head_quat"][f][[1, 2, 3, 0]]).as_matrix(), dtype=torch.float32)
            data = pool.data(np.array([f, f]), keypoints=False)
            with torch.no_grad():
                rendered = energy.renderer.render(energy.state(b, torch.as_tensor(hmc["gaze"][[f, f]]), rot.expand(2, 3, 3),
                                                               torch.as_tensor(hmc["head_t"][[f, f]])), energy.appearance)
                mask = rendered.mask & data.usable[:, :, None, None]
                sq = ((rendered.ir - data.images) ** 2 * mask).sum((1, 2, 3))
            gaps[name] = float(sq[0] - sq[1])
        return gaps

    fitted, skin = pixel_gap(True), pixel_gap(False)
    assert fitted["closed"] < 0 < fitted["open"], fitted
    assert abs(fitted["closed"]) > 3 * abs(skin["closed"]), (fitted, skin)


def _neutral_middle(recording) -> int:
    """The middle frame of the recording's first neutral window."""
    neutral = next(s for s in recording.segments if s.kind == "neutral")
    return (neutral.start + neutral.end) // 2


def test_the_pixel_term_in_a_subset_of_cameras_is_the_full_renders_term_over_them(tiny_subject, truth_rig):
    """A training step may render the pixel term in a few cameras (pixel_cameras_per_step):
    that term equals the whole render's masked l2 restricted to those cameras, every
    camera gives the whole term, and the keypoint term does not change."""
    import torch

    from rigs.render.losses import masked_l2
    from stages.selfsup.label import build_energy
    from stages.selfsup.stage import load_pool

    cap = Capture.open(tiny_subject[0])
    cfg = SelfSupConfig(resolution=32)
    names, pool = load_pool(cap, cfg)
    energy = build_energy(cap, truth_rig, None, names, cfg)
    data = pool.data(np.array([3, 40]), keypoints=True)
    k = truth_rig.definition.regressed
    state = (torch.full((2, len(k)), 0.1), torch.zeros(2, 4), torch.eye(3).expand(2, 3, 3), torch.zeros(2, 3))
    with torch.no_grad():
        whole = energy(*state, data)
        every = energy(*state, data, pixel_cameras=list(range(len(names))))
        some = energy(*state, data, pixel_cameras=[0, 3])
        full = energy.renderer.render(energy.state(*state), energy.appearance)
    assert float(every.pixel) == pytest.approx(float(whole.pixel), rel=1e-6)
    mask = full.mask & data.usable[:, :, None, None]
    want = masked_l2(full.ir[:, [0, 3]], data.images[:, [0, 3]], mask[:, [0, 3]])
    assert float(some.pixel) == pytest.approx(float(want), rel=1e-5)
    assert float(some.pixel) != pytest.approx(float(whole.pixel), rel=1e-3)
    assert float(some.keypoint) == float(whole.keypoint)


def test_the_keypoint_warmup_energy_renders_nothing_and_keeps_the_other_terms(tiny_subject, truth_rig):
    """A warm-up step's energy (with_pixels=False) has no pixel term and no appearance
    gradient, and its keypoint, sparsity and constraint terms equal the full energy's."""
    import torch

    from stages.selfsup.label import build_energy
    from stages.selfsup.stage import load_pool

    cap = Capture.open(tiny_subject[0])
    cfg = SelfSupConfig(resolution=32)
    names, pool = load_pool(cap, cfg)
    energy = build_energy(cap, truth_rig, None, names, cfg)
    data = pool.data(np.array([3, 40]), keypoints=True)
    k = len(truth_rig.definition.regressed)
    b = torch.full((2, k), 0.2, requires_grad=True)
    state = (b, torch.zeros(2, 4), torch.eye(3).expand(2, 3, 3), torch.zeros(2, 3))
    whole = energy(*state, data)
    cheap = energy(*state, data, with_pixels=False, residuals=True)
    assert float(cheap.pixel) == 0.0 and float(whole.pixel.detach()) > 0
    assert float(cheap.keypoint) == pytest.approx(float(whole.keypoint), rel=1e-6) and float(cheap.keypoint) > 0
    assert float(cheap.sparsity) == float(whole.sparsity) and float(cheap.constraint) == float(whole.constraint)
    assert np.isnan(cheap.frame_pixel_rms.numpy()).all() and np.isfinite(cheap.frame_keypoint_px.numpy()).all()
    cheap.total.backward()
    assert b.grad is not None and float(b.grad.abs().sum()) > 0
    assert all(p.grad is None for p in energy.appearance.parameters())


def test_a_keypoint_warmup_runs_before_the_pixel_steps_and_moves_the_labels(tiny_subject, truth_rig):
    """keypoint_warmup_steps adds that many render-free steps before ``steps``: the history
    holds both phases (pixel term 0 in the first, the keypoint term falling)."""
    import dataclasses

    cfg = dataclasses.replace(SMALL, steps=6, keypoint_warmup_steps=10)
    warm = label_subject(Capture.open(tiny_subject[0]), truth_rig, None, cfg, verbose=False)
    pixel = np.asarray(warm.history["pixel"])
    assert len(pixel) == 16 and (pixel[:10] == 0).all() and (pixel[10:] > 0).all()
    keypoint = np.asarray(warm.history["keypoint"])
    assert keypoint[:10].min() > 0 and keypoint[7:10].mean() < keypoint[:3].mean()


def test_per_frame_keypoint_fits_recover_the_true_weights(tiny_subject, truth_rig):
    """Each frame's state fitted to its keypoints alone (stages/selfsup/prefit.py), through
    the true rig: active MAE far below the all-zero labeller's (measured 0.115 against
    0.475 at 100 steps), keypoints within a few pixels, every frame valid."""
    import torch

    from stages.metrics_active import active_mae
    from stages.selfsup.label import build_energy, estimate_donning
    from stages.selfsup.losses import full_blendshapes
    from stages.selfsup.prefit import PrefitConfig, fit_keypoints
    from stages.selfsup.stage import load_pool, neutral_frames
    from storage.label_table import LabelTable, blendshape_matrix

    cap = Capture.open(tiny_subject[0])
    cfg = SelfSupConfig(resolution=32)
    names, pool = load_pool(cap, cfg)
    energy = build_energy(cap, truth_rig, None, names, cfg)
    fits = fit_keypoints(energy, pool, estimate_donning(energy, pool, neutral_frames(pool, 6)), PrefitConfig(steps=100))
    definition = truth_rig.definition
    b = full_blendshapes(torch.as_tensor(fits.b), torch.as_tensor(fits.gaze), definition, energy.index).numpy()
    rows = LabelTable(str(tiny_subject[1].parent / "labels")).read(subject_id=cap.subject_id)
    rows = rows.sort_by([("recording_id", "ascending"), ("frame_index", "ascending")])
    names_all = list(definition.blendshape_names)
    truth = blendshape_matrix(rows, names_all)
    exclude = set(definition.eye_following)
    fitted, zeros = (active_mae(x, truth, names_all, exclude=exclude).mae for x in (b, np.zeros_like(b)))
    assert fitted < 0.35 * zeros, (fitted, zeros)
    assert fits.valid.all() and np.nanmedian(fits.keypoint_px) < 3.0
    assert ((fits.b >= 0) & (fits.b <= 1)).all()


def test_a_prefit_warmup_regresses_the_fits_then_stops(tiny_subject, truth_rig):
    """keypoint_prefit_steps > 0: the warm-up steps add the distance to the per-frame fits
    (recorded as ``distill``, falling), the whole steps do not."""
    import dataclasses

    cfg = dataclasses.replace(SMALL, steps=4, keypoint_warmup_steps=12, keypoint_prefit_steps=30)
    labels = label_subject(Capture.open(tiny_subject[0]), truth_rig, None, cfg, verbose=False)
    distill = np.asarray(labels.history["distill"])
    assert len(distill) == 16 and (distill[:12] > 0).all() and (distill[12:] == 0).all()
    assert distill[9:12].mean() < distill[:3].mean()
    assert labels.timings["prefit_s"] > 0
