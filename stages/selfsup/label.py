"""The ``selfsup`` stage function: build the energy, fit appearance, train, infer.

See :mod:`stages.selfsup.stage` for the steps, the config and the artifact.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np
import torch

from pipeline.config import config_section
from pipeline.progress import LogProgress
from rigs.camera import rig_cameras
from rigs.render import AppearanceFitConfig, AppearanceModel, HmcRenderer, RigState, fit_appearance
from rigs.render.correction import NeutralCorrection, eyelid_freedom
from rigs.render.visible_set import extreme_states, potentially_visible
from rigs.rig import BlendshapeRig
from stages.fit_solve import torch_threads
from stages.parallel import available_cores
from stages.selfsup.energy import Energy, EnergyWeights
from stages.selfsup.frames import network_input
from stages.selfsup.keypoints import keypoint_layout
from stages.selfsup.losses import full_blendshapes
from stages.selfsup.network import NetworkConfig, StateNetwork
from stages.selfsup.prefit import PrefitConfig, distillation_loss, fit_keypoints
from stages.selfsup.stage import (
    FramePool,
    SelfSupConfig,
    SelfSupLabels,
    frame_status,
    load_pool,
    neutral_frames,
    timed,
)
from stages.selfsup.temporal import smooth_frames, smooth_quaternions
from stages.selfsup.training import CheckpointStore, TrainConfig, deterministic, train


def run_selfsup(capture: Any, texture: Any, rig: Any, config: Any = None,
                checkpoint: CheckpointStore | None = None) -> Any:
    """Body of stage ``selfsup`` (:func:`stages.selfsup.stage.selfsup_capture`): round-0 labels
    of every HMC frame of the subject.

    Args:
        capture: the capture folder (the engine's ``"capture"`` input) or an opened Capture.
        texture: the ``texture`` stage's artifact (the albedo seed).
        rig: the ``rig`` stage's artifact (the personal rig that is rendered).
        config: the engine's config view declaring ``selfsup``, or a :class:`SelfSupConfig`.
        checkpoint: the engine's checkpoint of this unit (training resumes from it).

    Returns:
        ``SelfSupLabels.to_output()``.
    """
    from stages.rigging import RiggedSubject
    from stages.texture import UvTexture
    from storage.capture import Capture

    cap = Capture.of(capture)
    cfg = config_section(config, "selfsup", SelfSupConfig)
    labels = label_subject(cap, RiggedSubject.from_output(rig).result.rig, UvTexture.from_output(texture),
                           cfg, checkpoint)
    return labels.to_output()


def build_energy(capture: Any, personal: BlendshapeRig, texture: Any, names: tuple[str, ...],
                 cfg: SelfSupConfig) -> Energy:
    """The subject's renderer (model resolution), seeded appearance, keypoint layout and weights.

    ``texture`` is the texture stage's :class:`~stages.texture.UvTexture` (the albedo seed),
    or None for a flat seed.
    """
    from rigs.uv_raster import part_triangles
    from stages.texture import ATLAS_PARTS

    width = capture.rig.camera(names[0]).intrinsics.width
    renderer = HmcRenderer.from_rig(personal, rig_cameras(capture.rig), scale=cfg.resolution / width, names=names)
    model = personal.model
    in_atlas = np.zeros(len(model.triangles), bool)
    in_atlas[part_triangles(model, ATLAS_PARTS[texture.atlas if texture is not None else "head"])] = True
    if texture is not None:
        rgb, weight = texture.image(linear=True)
        res = cfg.albedo_resolution if texture.resolution % cfg.albedo_resolution == 0 else None
        appearance = AppearanceModel.from_texture(names, rgb, weight, in_atlas, model.n_vertices, resolution=res)
    else:  # no phone texture: a flat seed, the albedo is then the fitted residual alone
        tiles = max(1, int(np.ceil(float(np.asarray(model.uv)[:, 0].max()) - 1e-6)))
        h = cfg.albedo_resolution
        appearance = AppearanceModel(names, np.full((h, tiles * h), 0.5, np.float32), np.zeros((h, tiles * h), np.float32),
                                     in_atlas, model.n_vertices)
    layout = keypoint_layout(cfg.keypoint_layout, model) if cfg.keypoints else None
    weights = EnergyWeights(pixel=cfg.pixel_weight, keypoint=cfg.keypoint_weight if cfg.keypoints else 0.0,
                            keypoint_huber_px=cfg.keypoint_huber_px, sparsity=cfg.sparsity_weight,
                            constraint=cfg.constraint_weight, neutral_correction=cfg.neutral_correction_weight)
    return Energy(renderer, appearance, personal.definition, layout,
                  np.full(len(names), width / cfg.resolution, np.float32), weights)


def estimate_donning(energy: Energy, pool: FramePool, rows: np.ndarray, steps: int = 200
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The head pose (R (3, 3), t (3,)) shared by neutral frames ``rows``, from keypoints alone.

    The head can sit centimetres from the nominal donning (the tiny synthetic subject:
    16-22 mm, 5 degrees), where a render at rest misses the face; the keypoints reach it
    without any appearance. Without keypoints the nominal donning (R = I, t = 0) is kept.
    """
    from rigs.render.posing import rotvec_to_matrix
    from stages.selfsup.losses import keypoint_loss

    eye, zero = torch.eye(3), torch.zeros(3)
    if energy.layout is None or pool.keypoints is None:
        return eye, zero
    data = pool.data(rows)
    kp, conf = data.keypoints, data.confidence * data.usable[..., None]
    if float(conf.sum()) == 0:
        return eye, zero
    k = energy.renderer.rig.size
    points = energy.layout.points(energy.renderer.rig.expression(torch.zeros(1, k)))  # (1, P, 3) head frame
    scale = energy.px_scale[None, :, None, None]
    rotvec = torch.zeros(3, requires_grad=True)
    t_mm = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([{"params": [rotvec], "lr": 0.01}, {"params": [t_mm], "lr": 0.5}])
    for _ in range(steps):
        opt.zero_grad()
        rot = rotvec_to_matrix(rotvec[None])[0]
        posed = points @ rot.T + t_mm / 1000
        pixels, _ = energy.renderer.project(posed)
        loss = keypoint_loss(pixels * scale, kp * scale, conf, energy.weights.keypoint_huber_px)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return rotvec_to_matrix(rotvec[None])[0].detach(), (t_mm / 1000).detach()


def fit_initial_appearance(energy: Energy, pool: FramePool, cfg: SelfSupConfig, flat_seed: bool = False,
                           donning: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[float]:
    """Light and camera response on neutral-window frames, the rig at rest at ``donning``.

    With a flat albedo seed (no phone texture) the seed's exponent and offset are held:
    a constant seed cannot tell them from the camera gain, and L-BFGS diverged along that
    null direction (overflow in the line search, measured on the tiny subject).
    """
    from rigs.render.appearance import ALBEDO_MAP

    rows = neutral_frames(pool, cfg.appearance_frames)
    data = pool.data(rows, keypoints=False)
    valid = data.usable[:, :, None, None].expand_as(data.images)
    rest = RigState.rest(len(rows), energy.renderer.rig.size)
    if donning is not None:
        rest = RigState(rest.b, rest.gaze, donning[0].expand(len(rows), 3, 3).clone(),
                        donning[1].expand(len(rows), 3).clone())
    config = AppearanceFitConfig(steps=cfg.appearance_steps, fixed=ALBEDO_MAP if flat_seed else (),
                                 albedo=cfg.appearance_albedo)
    snapshot = {k: v.clone() for k, v in energy.appearance.state_dict().items()}
    # The full fit, its closed-form start alone, and the generic start: the lowest finite
    # loss wins. L-BFGS's line search can overflow on a poorly constrained direction.
    attempts = (config, dataclasses.replace(config, steps=0), dataclasses.replace(config, steps=0, initialise=False))
    best: tuple[float, list[float], dict[str, torch.Tensor]] | None = None
    for attempt in attempts:
        energy.appearance.load_state_dict(snapshot)
        try:
            history = fit_appearance(energy.renderer, energy.appearance, rest, data.images, valid, attempt)
        except RuntimeError:
            continue
        final = history[-1]
        if np.isfinite(final) and (best is None or final < best[0]):
            best = (final, history, {k: v.clone() for k, v in energy.appearance.state_dict().items()})
    energy.appearance.load_state_dict(snapshot if best is None else best[2])
    return [] if best is None else best[1]


def label_subject(capture: Any, personal: BlendshapeRig, texture: Any, cfg: SelfSupConfig,
                  checkpoint: CheckpointStore | None = None, verbose: bool = True) -> SelfSupLabels:
    """Trains the subject's network through the renderer and labels every frame."""
    with torch_threads(available_cores()):
        return _label_subject(capture, personal, texture, cfg, checkpoint, verbose)


def _label_subject(capture: Any, personal: BlendshapeRig, texture: Any, cfg: SelfSupConfig,
                   checkpoint: CheckpointStore | None, verbose: bool) -> SelfSupLabels:
    timings: dict[str, float] = {}
    with timed(timings, "read_s"):
        names, pool = load_pool(capture, cfg)
    energy = build_energy(capture, personal, texture, names, cfg)
    definition = personal.definition
    torch.manual_seed(cfg.seed)
    net = StateNetwork(len(names), len(definition.regressed), NetworkConfig(width=cfg.network_width))
    module = torch.nn.ModuleDict({"network": net, "appearance": energy.appearance})
    with timed(timings, "donning_s"), deterministic():  # cheap and deterministic: a resume redoes it
        r0, t0 = estimate_donning(energy, pool, neutral_frames(pool, cfg.appearance_frames))
    if cfg.visible_set_rings >= 0:
        with timed(timings, "visible_set_s"), deterministic():
            states = extreme_states(energy.renderer.rig.size, (r0, t0))
            energy.renderer.restrict(potentially_visible(energy.renderer, states, rings=cfg.visible_set_rings))
    if checkpoint is None or not checkpoint.exists():  # a resumed run has its appearance
        with timed(timings, "appearance_s"), deterministic():
            fit_initial_appearance(energy, pool, cfg, flat_seed=texture is None, donning=(r0, t0))
    # Without keypoints the warm-up's energy would be the sparsity alone: no warm-up then.
    keypoint_steps = cfg.keypoint_warmup_steps if cfg.keypoints and pool.keypoints is not None else 0
    fits = None
    if keypoint_steps > 0 and cfg.keypoint_prefit_steps > 0:  # deterministic: a resume redoes it
        with timed(timings, "prefit_s"), deterministic():
            fits = fit_keypoints(energy, pool, (r0, t0), PrefitConfig(steps=cfg.keypoint_prefit_steps))
    if cfg.neutral_correction_weight > 0:  # learnt with the network, after the rest-pose fits
        left, right = personal.eyeball_vertices
        model = personal.model
        freedom = None
        if cfg.neutral_correction_eyelid_mm > 0:
            lids = np.asarray(model.landmarks68)[36:48]  # the 68-point eye contours
            freedom = eyelid_freedom(personal.neutral, lids, cfg.neutral_correction_eyelid_mm / 1000.0)
        correction = NeutralCorrection(model.triangles, model.n_vertices, np.concatenate([left, right]),
                                       freedom=freedom)
        energy.renderer.rig.correction = module["neutral_correction"] = correction

    def step_loss(idx: np.ndarray, step: int):
        idx = np.sort(idx)
        data = pool.data(idx, cfg.keypoints)
        out = net(network_input(pool.images[idx], pool.mirrored))
        cameras = None
        if 0 < cfg.pixel_cameras_per_step < len(names):  # drawn from the batch: a resumed run draws the same
            rng = np.random.default_rng([cfg.seed, *idx.tolist()])
            cameras = np.sort(rng.choice(len(names), cfg.pixel_cameras_per_step, replace=False))
        warmup = step < keypoint_steps
        terms = energy(out.b, out.gaze, out.rotation @ r0, t0 + out.translation, data, pixel_cameras=cameras,
                       with_pixels=not warmup)
        distill = distillation_loss(out.b, out.gaze, fits, idx) if warmup and fits is not None else out.b.new_zeros(())
        return terms.total + cfg.prefit_distill_weight * distill, {**terms.scalars(), "distill": float(distill.detach())}

    total_steps = keypoint_steps + cfg.steps
    schedule = TrainConfig(steps=total_steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                           checkpoint_every=cfg.checkpoint_every, seed=cfg.seed,
                           warmup_steps=min(50, total_steps // 10))
    bar = LogProgress(total_steps, f"{capture.subject_id} selfsup training", "step", sys.stderr, every_s=30.0)
    with timed(timings, "train_s"):
        history = train(module, step_loss, len(pool), schedule, checkpoint,
                        progress=(lambda done, _t: bar.update(1)) if verbose else None)
    bar.close()
    with timed(timings, "infer_s"):
        labels = infer(net, energy, pool, names, cfg, capture.subject_id, (r0, t0))
    labels.history, labels.timings = history.terms, timings
    if energy.renderer.rig.correction is not None:
        labels.diagnostics.update(energy.renderer.rig.correction.summary())
    if energy.renderer.candidates is not None:
        labels.diagnostics["rendered_triangles"] = float(len(energy.renderer.candidates))
    return labels


def infer(net: StateNetwork, energy: Energy, pool: FramePool, names: tuple[str, ...], cfg: SelfSupConfig,
          subject_id: str, donning: tuple[torch.Tensor, torch.Tensor] = (torch.eye(3), torch.zeros(3))
          ) -> SelfSupLabels:
    """Labels, residuals, confidence and status of every frame of the pool (the network's
    pose is relative to ``donning``, the recording's estimated head pose)."""
    r0, t0 = donning
    from scipy.spatial.transform import Rotation

    from rigs.geometry import quat_from_rotation

    net.eval()
    definition = energy.definition
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("b", "gaze", "R", "t", "rms", "kp")}
    with torch.no_grad():
        for start in range(0, len(pool), cfg.inference_batch):
            idx = np.arange(start, min(start + cfg.inference_batch, len(pool)))
            data = pool.data(idx, cfg.keypoints)
            out = net(network_input(pool.images[idx], pool.mirrored))
            rotation, translation = out.rotation @ r0, t0 + out.translation
            terms = energy(out.b, out.gaze, rotation, translation, data, residuals=True)
            parts["b"].append(full_blendshapes(out.b, out.gaze, definition, energy.index).numpy())
            for key, value in (("gaze", out.gaze), ("R", rotation), ("t", translation),
                               ("rms", terms.frame_pixel_rms), ("kp", terms.frame_keypoint_px)):
                parts[key].append(value.numpy())
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    status, reason = frame_status(pool.usability, names, cfg.min_usable_cameras)
    quat = quat_from_rotation(Rotation.from_matrix(cat["R"].astype(np.float64)))
    if cfg.temporal_sigma_frames > 0:  # per recording, over the frames that are not rejected
        start = 0
        for clip in pool.clips:
            rows = slice(start, start + clip.frame_count)
            ok = status[rows] == "ok"
            for key in ("b", "gaze", "t"):
                cat[key][rows] = smooth_frames(cat[key][rows], ok, cfg.temporal_sigma_frames)
            quat[rows] = smooth_quaternions(quat[rows], ok, cfg.temporal_sigma_frames)
            start += clip.frame_count
    usable_fraction = (pool.usability == 0).mean(1)
    rms = cat["rms"]
    typical = float(np.median(rms[status == "ok"])) if (status == "ok").any() else float(np.median(rms))
    confidence = usable_fraction * np.clip(typical / np.maximum(rms, 1e-9), 0.0, 1.0)
    return SelfSupLabels(
        subject_id=subject_id, blendshape_names=definition.blendshape_names, rig_version=definition.version,
        recordings=tuple(c.recording for c in pool.clips), frame_counts=tuple(c.frame_count for c in pool.clips),
        frame_index=np.concatenate([np.arange(c.frame_count, dtype=np.int32) for c in pool.clips]),
        timestamp_ns=np.concatenate([c.timestamps_ns for c in pool.clips]),
        b=cat["b"].astype(np.float32), gaze=cat["gaze"].astype(np.float32),
        head_quat=quat.astype(np.float32),
        head_t=cat["t"].astype(np.float32), confidence=confidence.astype(np.float32),
        residual_photometric=rms.astype(np.float32), residual_keypoint_px=cat["kp"].astype(np.float32),
        status=status, reason=reason, cameras=names)
