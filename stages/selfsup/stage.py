"""Stage ``selfsup``: per-subject self-supervised labelling of every HMC frame (round 0).

REFA section 6.2 and SPEC §3 item 5: a small network maps the subject's HMC views of a
frame to the rig's state (b, gaze, R, t); the differentiable renderer draws that state
into the calibrated cameras with the subject's estimated IR appearance, and the energy of
:mod:`stages.selfsup.energy` trains the network and the appearance together. Then the
network labels every frame. Steps:

1. read every recording at model resolution, marking dark or saturated camera images;
2. seed the appearance from the phone texture and fit its light and camera response on
   frames of the neutral windows, with the rig at rest (the nominal donning);
3. train network + appearance with Adam (checkpointed: a killed unit resumes);
4. infer every frame: labels, pixel and keypoint residuals, confidence and status.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline.errors import ConfigError, StageError
from stages.selfsup.frames import USABLE, FrameCheck, HmcClip, load_clip, unusable_cameras

FORMAT = 1


@dataclass(frozen=True)
class SelfSupConfig:
    """The ``selfsup`` section of the run config."""

    cameras: Literal["all", "embedded"] = "all"
    """Which rig cameras the network sees and the energy renders: every camera, or only
    the consumer headset's embedded ones."""
    exclude_cameras: str = ""
    """Comma-separated camera names left out of those (a broken camera, or a
    leave-one-camera-out study of what each camera is worth: docs/camera-placement.md)."""
    resolution: int = 64
    """Model resolution, pixels per side: frames are area-downsampled to it and rendered at
    it. The rig's cameras must share one image size. >= 16."""
    keypoints: bool = True
    """Use the capture's detector keypoints (where a recording has them)."""
    keypoint_layout: str = "iris10+multipie68"
    """What the detector's points are on the template (stages.selfsup.keypoints.LAYOUTS)."""
    pixel_weight: float = 1000.0
    """Weight of the masked pixel l2."""
    keypoint_weight: float = 0.05
    """Weight of the keypoint term (per 0.5 stored px^2)."""
    keypoint_huber_px: float = 6.0
    """Keypoint errors beyond this many stored pixels count linearly."""
    sparsity_weight: float = 0.01
    """Weight of the l1 sparsity of b (each frame's l1 norm, averaged over frames)."""
    constraint_weight: float = 1.0
    """Weight of the rig definition's constraints."""
    neutral_correction_weight: float = 0.02
    """Weight of the prior of a smooth per-subject offset of the rig's neutral, learnt with
    the network (rigs/render/correction.py): it takes the phone rig's constant misfit that
    blendshapes would otherwise hold in every frame. 0 = no correction."""
    neutral_correction_eyelid_mm: float = 0.0
    """The neutral correction is held at the eyelids and free beyond this distance from
    them, rising linearly (rigs/render/correction.eyelid_freedom), so that a constant lid
    offset cannot stand in for a blink. 0 = free everywhere but the eyeballs."""
    visible_set_rings: int = 2
    """Render only the triangles hit in renders of the rig's extreme states (rest, each
    shape at 1, the gaze extremes) at the estimated donning, grown by this many rings of
    neighbours (rigs/render/visible_set.py). On a tiny subject 5.7e-5 of the pixels of
    the true states then see another triangle than with the whole mesh, and the
    visibility pass takes 38 % less time. -1 = render every triangle."""
    steps: int = 600
    """Adam steps of the network and appearance with the whole energy (after the keypoint
    warm-up). >= 1."""
    keypoint_warmup_steps: int = 3000
    """Steps before those in which the energy is the keypoint, sparsity and constraint
    terms alone: nothing is rendered (only the keypoints' vertices are posed), so a step
    costs the network's pass and little more (about a quarter of a whole step), and the
    network reaches the pose and the keypoints' expression before the pixel term refines
    them. Needs keypoints (none are run without). One Adam schedule runs over both
    phases. On two standard subjects 3,000 of them before 600 whole steps took active MAE
    from 0.288 to 0.174, the amplitude ratio from 0.31 to 0.73 and eye closure from 0 to
    0.875 against 1,000 (docs/selfsup.md); on the tiny subject 600 before 300 took active
    MAE from 0.274 to 0.137. >= 0."""
    keypoint_prefit_steps: int = 0
    """Before training, fit every frame's state to its keypoints alone (the render-free
    terms, each frame its own variables, this many Adam steps: stages/selfsup/prefit.py),
    and add to each warm-up step the squared distance of the network's weights and gaze
    to those fits (``prefit_distill_weight``). 0 = no prefit. Needs the warm-up. Measured
    on two standard subjects (300 steps, 1,000 warm-up + 600 whole): active MAE 0.159 and
    semantic accuracy 0.60 (the 3,000-step warm-up's: 0.174, 0.53) but neutralness 0.29
    against 1.0 (the fits hold the chain rig's neutral misfit as activations), so it is
    off by default (docs/selfsup.md)."""
    prefit_distill_weight: float = 20.0
    """Weight of that distance (summed over the weights and gaze radians, averaged over
    the batch's frames that have enough keypoints)."""
    batch_size: int = 8
    """Frames per step. >= 1."""
    pixel_cameras_per_step: int = 0
    """Cameras each training step renders the pixel term in, drawn at random per step (the
    network still sees every camera; keypoints use every camera). Measured on the tiny
    subject (300 steps): 4 cameras cut the run's CPU only from 316 to 270 s and lowered the
    amplitude ratio from 0.86 to 0.73 (docs/selfsup.md). 0 = every camera."""
    learning_rate: float = 1e-3
    """Peak Adam learning rate (warm-up, then cosine decay to 5 %)."""
    checkpoint_every: int = 100
    """Steps between checkpoints."""
    seed: int = 0
    """Seeds the network's weights and the batches."""
    network_width: int = 16
    """Channels of the network's first block (x2 per block, 4 blocks). A multiple of 4."""
    appearance_frames: int = 12
    """Neutral-window frames the appearance is first fitted on."""
    appearance_steps: int = 150
    """Adam steps of that first appearance fit."""
    appearance_albedo: bool = False
    """That first fit also fits the per-texel albedo and the albedo of the vertices off the
    phone texture's atlas (the eyeballs: iris, pupil and sclera are never in a phone
    texture). Without it the eyeballs start with the skin's albedo and, at the true state,
    the pixel term barely tells an open eye from a closed one; with it the term does, but
    training then held a squint of 0.5 in every frame on the tiny subject (active MAE
    0.265 -> 0.323), so it is off by default (docs/selfsup.md)."""
    albedo_resolution: int = 128
    """Texels per UV tile side of the fitted albedo map (a divisor of the texture's)."""
    dark_mean: float = 6.0
    """A camera image whose mean intensity (0-255) is below this is not used (dark)."""
    min_usable_cameras: int = 2
    """A frame with fewer usable cameras is labelled but ``rejected``."""
    inference_batch: int = 32
    """Frames per inference batch."""
    temporal_sigma_frames: float = 0.7
    """Gaussian over time (frames) applied to each recording's labels after inference
    (b, gaze, head pose; rejected frames neither used nor changed: stages/selfsup/temporal.py).
    On 3 tiny subjects 0.7 took Smoothness from 0.80 to 0.89 (the truth's level) and moved
    active MAE and amplitude by under 0.01 (docs/selfsup.md). 0 = per-frame labels."""

    def __post_init__(self) -> None:
        checks = (
            ("cameras", self.cameras in ("all", "embedded")), ("resolution", self.resolution >= 16),
            ("steps", self.steps >= 1), ("batch_size", self.batch_size >= 1),
            ("keypoint_warmup_steps", self.keypoint_warmup_steps >= 0),
            ("keypoint_prefit_steps", self.keypoint_prefit_steps >= 0),
            ("pixel_cameras_per_step", self.pixel_cameras_per_step >= 0),
            ("network_width", self.network_width >= 4 and self.network_width % 4 == 0),
            ("min_usable_cameras", self.min_usable_cameras >= 1),
            ("visible_set_rings", self.visible_set_rings >= -1),
            ("neutral_correction_eyelid_mm", self.neutral_correction_eyelid_mm >= 0),
            ("temporal_sigma_frames", self.temporal_sigma_frames >= 0),
            ("weights", min(self.pixel_weight, self.keypoint_weight, self.sparsity_weight, self.prefit_distill_weight,
                            self.constraint_weight, self.neutral_correction_weight) >= 0),
        )
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise ConfigError(f"invalid selfsup config: {', '.join(bad)}")


@dataclass
class SelfSupLabels:
    """The ``selfsup`` artifact: round-0 labels of every frame of every recording.

    Frames of all recordings are stacked (N rows); ``recordings`` and ``frame_counts``
    say which rows belong to which.

    Attributes:
        subject_id: the subject.
        blendshape_names: (K_all,) every rig shape, rig order (eye-following ones derived
            from gaze, SPEC §3).
        rig_version: the rig definition's version.
        recordings / frame_counts: the recordings in row order and their lengths.
        frame_index / timestamp_ns: (N,) per row.
        b: (N, K_all) float32; gaze: (N, 4); head_quat: (N, 4) (w, x, y, z), w >= 0;
        head_t: (N, 3) metres.
        confidence, residual_photometric (rms intensity in [0, 1]), residual_keypoint_px
            (mean stored pixels, NaN without keypoints): (N,) float32.
        status: (N,) "ok" / "rejected"; reason: (N,) "" or why.
        cameras: the cameras used.
        history: training loss terms per step (name -> list).
        timings: seconds per phase.
        diagnostics: other figures of the run (e.g. the neutral correction's size in mm).
    """

    subject_id: str
    blendshape_names: tuple[str, ...]
    rig_version: str
    recordings: tuple[str, ...]
    frame_counts: tuple[int, ...]
    frame_index: np.ndarray
    timestamp_ns: np.ndarray
    b: np.ndarray
    gaze: np.ndarray
    head_quat: np.ndarray
    head_t: np.ndarray
    confidence: np.ndarray
    residual_photometric: np.ndarray
    residual_keypoint_px: np.ndarray
    status: np.ndarray
    reason: np.ndarray
    cameras: tuple[str, ...]
    history: dict[str, list[float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, float] = field(default_factory=dict)

    _ARRAYS = ("frame_index", "timestamp_ns", "b", "gaze", "head_quat", "head_t", "confidence",
               "residual_photometric", "residual_keypoint_px", "status", "reason")

    def to_output(self) -> Any:
        from pipeline.serialize import StageOutput

        arrays = {k: np.asarray(getattr(self, k)) for k in self._ARRAYS}
        arrays["status"] = arrays["status"].astype("U16")
        arrays["reason"] = arrays["reason"].astype("U")
        return StageOutput(arrays=arrays, meta={
            "format": FORMAT, "subject_id": self.subject_id, "blendshape_names": list(self.blendshape_names),
            "rig_version": self.rig_version, "recordings": list(self.recordings),
            "frame_counts": list(self.frame_counts), "cameras": list(self.cameras),
            "history": self.history, "timings": self.timings, "diagnostics": self.diagnostics})

    @classmethod
    def from_output(cls, output: Any) -> SelfSupLabels:
        meta, arrays = output.meta, output.arrays
        if meta.get("format") != FORMAT:
            raise StageError(f"selfsup artifact format {meta.get('format')!r}, expected {FORMAT}")
        missing = sorted(set(cls._ARRAYS) - set(arrays))
        if missing:
            raise StageError(f"selfsup artifact lacks arrays {missing}")
        return cls(
            subject_id=meta["subject_id"], blendshape_names=tuple(meta["blendshape_names"]),
            rig_version=meta["rig_version"], recordings=tuple(meta["recordings"]),
            frame_counts=tuple(meta["frame_counts"]), cameras=tuple(meta["cameras"]),
            history=dict(meta.get("history", {})), timings=dict(meta.get("timings", {})),
            diagnostics=dict(meta.get("diagnostics", {})),
            **{k: np.asarray(arrays[k]) for k in cls._ARRAYS})

    def rows(self, recording: str) -> slice:
        """The row range of ``recording``."""
        i = self.recordings.index(recording)
        start = int(sum(self.frame_counts[:i]))
        return slice(start, start + self.frame_counts[i])

    def label_table(self, *, run_id: str, pipeline_version: str) -> Any:
        """The labels as rows of the label table (SPEC §4): source self_supervision, round 0."""
        import pyarrow as pa

        from storage.label_table import labels_to_arrow

        parts = []
        for rec in self.recordings:
            s = self.rows(rec)
            parts.append(labels_to_arrow(
                self.subject_id, rec, self.frame_index[s], self.timestamp_ns[s], self.b[s], self.gaze[s],
                self.head_quat[s], self.head_t[s], blendshape_names=self.blendshape_names,
                confidence=self.confidence[s], residual_keypoint_px=self.residual_keypoint_px[s],
                residual_photometric=self.residual_photometric[s], status=self.status[s],
                failure_reason=[r or None for r in self.reason[s]], label_source="self_supervision",
                label_round=0, pipeline_version=pipeline_version, rig_version=self.rig_version, run_id=run_id))
        return pa.concat_tables(parts)


@dataclass
class FramePool:
    """Every recording's clip stacked into one pool of N frames (model resolution)."""

    clips: list[HmcClip]
    images: np.ndarray
    usability: np.ndarray
    keypoints: np.ndarray | None
    confidence: np.ndarray | None

    @classmethod
    def of(cls, clips: list[HmcClip]) -> FramePool:
        images = np.concatenate([c.images for c in clips])
        usability = np.concatenate([c.usability for c in clips])
        kp = conf = None
        if any(c.keypoints is not None for c in clips):
            sizes = {c.keypoints.shape[2] for c in clips if c.keypoints is not None}
            if len(sizes) > 1:
                raise StageError(f"recordings' keypoint counts differ: {sorted(sizes)}")
            p = sizes.pop()
            kp = np.concatenate([c.keypoints if c.keypoints is not None
                                 else np.full((c.frame_count, len(c.cameras), p, 2), np.nan, np.float32) for c in clips])
            conf = np.concatenate([c.keypoint_confidence if c.keypoint_confidence is not None
                                   else np.zeros((c.frame_count, len(c.cameras), p), np.float32) for c in clips])
        return cls(clips, images, usability, kp, conf)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def mirrored(self) -> np.ndarray:
        """(C,) cameras flipped at network input (every clip has the same cameras)."""
        return self.clips[0].mirrored

    def data(self, rows: np.ndarray, keypoints: bool = True) -> Any:
        """The :class:`stages.selfsup.energy.FrameData` of pool ``rows`` (keypoints optional)."""
        from stages.selfsup.energy import frame_data

        use = keypoints and self.keypoints is not None
        return frame_data(self.images[rows], self.usability[rows], self.keypoints[rows] if use else None,
                          self.confidence[rows] if use else None)


def selfsup_capture(capture: Any, texture: Any, rig: Any, config: Any = None, checkpoint: Any = None) -> Any:
    """Stage ``selfsup`` as the chain lists it: round-0 labels of every HMC frame.

    The body (:func:`stages.selfsup.label.run_selfsup`) is imported here, when the stage
    runs, so that importing the chain (every backfill worker does) never loads torch.
    """
    from stages.selfsup.label import run_selfsup

    return run_selfsup(capture, texture, rig, config, checkpoint)


def frame_status(usability: np.ndarray, cameras: tuple[str, ...], min_usable: int) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: ("ok" or "rejected", reason) from the (N, C) usability codes.

    A frame with at least ``min_usable`` usable cameras is ``ok``; its reason names any
    camera that was not used ("degraded: eye_left dark"). Fewer makes it ``rejected``.
    """
    status = np.full(len(usability), "ok", dtype="U16")
    reason = np.full(len(usability), "", dtype=object)
    for i, row in enumerate(usability):
        bad = unusable_cameras(row, cameras)
        if not bad:
            continue
        usable = len(cameras) - len(bad)
        if usable < min_usable:
            status[i] = "rejected"
            reason[i] = f"{usable} usable camera(s), need {min_usable}: " + "; ".join(bad)
        else:
            reason[i] = "degraded: " + "; ".join(bad)
    return status, reason.astype("U")


def camera_names(rig: Any, which: str, exclude: str = "") -> tuple[str, ...]:
    """The rig's cameras the labeller uses (rig order): ``which`` set less ``exclude``
    (comma-separated names)."""
    cams = rig.cameras if which == "all" else rig.embedded
    left_out = {n.strip() for n in exclude.split(",") if n.strip()}
    unknown = sorted(left_out - {c.name for c in rig.cameras})
    if unknown:
        raise ConfigError(f"selfsup.exclude_cameras names no camera of the headset rig: {', '.join(unknown)} "
                          f"(cameras: {', '.join(c.name for c in rig.cameras)})")
    cams = [c for c in cams if c.name not in left_out]
    names = tuple(c.name for c in cams)
    if not names:
        raise StageError(f"the headset rig has no {which} cameras" + (f" besides {exclude}" if left_out else ""))
    sizes = {c.intrinsics.size for c in cams}
    if len(sizes) != 1:
        raise StageError(f"the labeller renders cameras of one image size; the rig's differ: {sorted(sizes)}")
    return names


def load_pool(capture: Any, cfg: SelfSupConfig, progress=None) -> tuple[tuple[str, ...], FramePool]:
    """The cameras used and every recording's frames (raises StageError without recordings)."""
    names = camera_names(capture.rig, cfg.cameras, cfg.exclude_cameras)
    if not capture.recordings:
        raise StageError(f"{capture.root}: no HMC recording to label")
    clips = [load_clip(capture.recording(r), names, cfg.resolution, FrameCheck(dark_mean=cfg.dark_mean), progress)
             for r in capture.recordings]
    return names, FramePool.of(clips)


def neutral_frames(pool: FramePool, count: int) -> np.ndarray:
    """Up to ``count`` pool rows from neutral windows (evenly spread), else the first frames."""
    rows, offset = [], 0
    for clip in pool.clips:
        for seg in clip.segments:
            if seg.kind == "neutral":
                rows.extend(range(offset + seg.start, offset + seg.end))
        offset += clip.frame_count
    usable = pool.usability.min(1) == USABLE
    rows = [r for r in rows if usable[r]] or [r for r in range(len(pool)) if usable[r]] or list(range(len(pool)))
    pick = np.linspace(0, len(rows) - 1, min(count, len(rows))).round().astype(int)
    return np.asarray(rows)[pick]


def timed(timings: dict[str, float], name: str):
    """Context manager adding the block's wall seconds to ``timings[name]``."""
    class _T:
        def __enter__(self):
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - self.t0
    return _T()


