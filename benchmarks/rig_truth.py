"""A `standard` subject's true expression meshes without rendering an image (issue 8 benchmark).

``pgt synth`` (stages/synthesis/generate.py: ``generate_subject``) draws, from one
``(seed, index)`` random stream: the subject, the HMC timelines, then per phone prompt
its performance ``(b, gaze)`` followed by the prompt's rendered burst. The burst's draws
(camera pose, wall, RGB and depth noise) depend only on the image size, never on the
pixels, so :func:`true_expressions` makes the same draws with the same shapes and skips
the ray casting. The result equals ``ground_truth/<subject>/expressions.npz`` and
``rig.npz``; :func:`check_replay` checks the random stream against a real render.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rigs.definition import RigDefinition
from rigs.face_model import FaceModel
from stages.synthesis.generate import prompt_pose
from stages.synthesis.performance import hmc_timeline
from stages.synthesis.phone import phone_camera
from stages.synthesis.presets import SynthConfig
from stages.synthesis.subject import SyntheticSubject, make_subject


@dataclass(frozen=True, eq=False)
class TrueExpressions:
    """What ``expressions.npz`` and ``rig.npz`` hold for one subject.

    Attributes:
        subject: the synthetic subject (its ``rig`` is the true personal rig).
        prompts: (J,) phone prompts in capture order.
        b: (J, K) float32 performed weights.
        gaze: (J, 4) float32 performed gaze.
        vertices: (J, n, 3) float32 true meshes, head frame.
    """

    subject: SyntheticSubject
    prompts: tuple[str, ...]
    b: np.ndarray
    gaze: np.ndarray
    vertices: np.ndarray


def _subject_and_timelines(config: SynthConfig, seed: int, index: int, model: FaceModel,
                           definition: RigDefinition) -> tuple[SyntheticSubject, list[str], np.random.Generator]:
    """The subject, the prompts, and the stream positioned at the first phone prompt."""
    rng = np.random.default_rng([seed, index])
    subject = make_subject(f"synth-{seed}-{index:04d}", rng, model, definition, identity_std=config.identity_std,
                           detail_mm=config.detail_mm, rig_variation=config.rig_variation)
    prompts = list(config.prompts or [p.name for p in definition.prompts])
    peak_pool = [p for p in prompts if p != "neutral"] or [p.name for p in definition.prompts[1:]]
    n = config.hmc_peaks_per_recording
    for r in range(config.hmc_recordings):  # drawn for their effect on the stream only
        picks = [peak_pool[(r * n + k) % len(peak_pool)] for k in range(n)]
        hmc_timeline(definition, rng, picks, config.script, fps=config.fps, wink_eye=("left", "right")[r % 2])
    return subject, prompts, rng


def skip_burst(config: SynthConfig, rng: np.random.Generator) -> None:
    """Makes the draws of ``generate.render_phone_burst`` (phone_camera, render_phone,
    truedepth), in order and with the same shapes, without rendering."""
    h, w = config.phone_width * 4 // 3, config.phone_width
    for _ in range(config.phone_frames_per_prompt):
        phone_camera(config.phone_width, config.phone_hfov_deg, rng, config.phone_distance_m,
                     config.phone_yaw_deg, config.phone_pitch_deg)
        rng.uniform(0.9, 1.4)  # wall distance
        rng.uniform(0.25, 0.6, (h, w))  # wall pattern
        rng.uniform(0.85, 1.1)  # exposure
        rng.normal(0, 0.01, (h, w, 3))  # RGB noise
        rng.uniform(size=(h, w))  # flying pixels: which
        rng.uniform(size=(h, w))  # flying pixels: where
        rng.normal(size=(h, w))  # depth noise
        rng.uniform(size=(h, w))  # hole seeds


def true_expressions(config: SynthConfig, seed: int, index: int, model: FaceModel,
                     definition: RigDefinition) -> TrueExpressions:
    """Subject ``index`` of ``pgt synth --seed SEED`` and its phone prompts' true meshes."""
    subject, prompts, rng = _subject_and_timelines(config, seed, index, model, definition)
    bs, gazes = [], []
    for prompt in prompts:
        b, gaze = prompt_pose(definition, prompt, rng)
        bs.append(b), gazes.append(gaze)
        skip_burst(config, rng)
    b, gaze = np.stack(bs), np.stack(gazes)
    verts = np.stack([subject.rig.pose(bj, gj) for bj, gj in zip(b, gaze, strict=True)]).astype(np.float32)
    return TrueExpressions(subject, tuple(prompts), b, gaze, verts)


def check_replay(config: SynthConfig, seed: int, index: int, model: FaceModel, definition: RigDefinition,
                 prompts: int = 1) -> bool:
    """Whether :func:`skip_burst` leaves the stream where real rendering of the first
    ``prompts`` bursts does (renders them: seconds each)."""
    from stages.synthesis.generate import render_phone_burst
    from stages.synthesis.texture import load_default_texture

    subject, names, real = _subject_and_timelines(config, seed, index, model, definition)
    replay = np.random.default_rng()
    replay.bit_generator.state = real.bit_generator.state
    texture = load_default_texture()
    for prompt in names[:prompts]:
        b, gaze = prompt_pose(definition, prompt, real)
        prompt_pose(definition, prompt, replay)
        render_phone_burst(config, subject, subject.rig.pose(b, gaze), texture, real)
        skip_burst(config, replay)
    return real.bit_generator.state == replay.bit_generator.state
