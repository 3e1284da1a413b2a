"""The self-supervision energy of a batch of frames: render the state, compare with the data.

Both labellers minimise it: the per-subject network (through its weights) and the
per-frame baseline (through each frame's state). Terms (SPEC §3 item 5):

    E = w_pix * masked pixel l2 + w_kp * keypoint reprojection (stored pixels, Huber)
        + w_l1 * l1 sparsity of b + w_c * rig constraints + the appearance prior

The pixel term is over the rendered face's pixels of usable cameras; the keypoint term
over detected points of usable cameras, in the stored images' pixels so its weight does
not depend on the model resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rigs.definition import RigDefinition
from rigs.render import AppearanceModel, HmcRenderer, RigState
from rigs.render.cameras import CameraBatch
from rigs.render.losses import masked_l2
from stages.selfsup.frames import USABLE
from stages.selfsup.keypoints import KeypointLayout
from stages.selfsup.losses import (
    RigIndex,
    constraint_loss,
    full_blendshapes,
    keypoint_loss,
    sparsity_loss,
)


@dataclass(frozen=True)
class EnergyWeights:
    """Weights of the energy's terms."""

    pixel: float = 1000.0
    """Masked pixel l2 (intensities in [0, 1]); 1000 makes a 0.03 rms misfit cost ~1."""
    keypoint: float = 0.05
    """Keypoint term, per 0.5 px^2 of stored-image error; 0 ignores keypoints."""
    keypoint_huber_px: float = 6.0
    """Keypoint errors beyond this many stored pixels count linearly (detector outliers)."""
    sparsity: float = 0.01
    """l1 on the regressed weights (each frame's l1 norm, averaged over frames)."""
    constraint: float = 1.0
    """The rig definition's at-most and antagonistic constraints."""
    appearance_prior: float = 1.0
    """The albedo residual's smoothness + confidence prior (AppearanceModel.prior_loss)."""
    neutral_correction: float = 0.0
    """The rig's neutral correction's prior (NeutralCorrection.prior), when it has one."""


@dataclass
class FrameData:
    """A batch's observations (tensors on the energy's device).

    Attributes:
        images: (B, C, S, S) float intensities in [0, 1], stored orientation.
        usable: (B, C) bool cameras whose image of the frame can be used.
        keypoints: (B, C, P, 2) model pixels, NaN where missing; or None.
        confidence: (B, C, P) keypoint confidence; or None.
    """

    images: torch.Tensor
    usable: torch.Tensor
    keypoints: torch.Tensor | None = None
    confidence: torch.Tensor | None = None


@dataclass
class EnergyTerms:
    """The total and its parts, each () tensors; per-frame residuals (B,) when asked for."""

    total: torch.Tensor
    pixel: torch.Tensor
    keypoint: torch.Tensor
    sparsity: torch.Tensor
    constraint: torch.Tensor
    frame_pixel_rms: torch.Tensor | None
    frame_keypoint_px: torch.Tensor | None

    def scalars(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "pixel", "keypoint", "sparsity", "constraint")}


class Energy:
    """Renders states of a subject's rig and scores them against frame data.

    Args:
        renderer: the subject's rig in the recording's cameras, at model resolution.
        appearance: the subject's IR appearance (trained alongside, or fixed).
        definition: the rig definition (regressed / eye-following shapes, constraints).
        layout: what the detector's keypoints are on the template; None without keypoints.
        stored_px_per_model_px: (C,) stored pixels per model pixel, per camera.
        weights: the terms' weights.
    """

    def __init__(self, renderer: HmcRenderer, appearance: AppearanceModel, definition: RigDefinition,
                 layout: KeypointLayout | None, stored_px_per_model_px: np.ndarray,
                 weights: EnergyWeights = EnergyWeights()):
        self.renderer, self.appearance, self.definition = renderer, appearance, definition
        self.index = RigIndex.of(definition)
        self.layout = layout
        # The render-free energy poses only the keypoints' vertices (a few hundred of the mesh's).
        self._kp_vertices, self._kp_layout = (None, None) if layout is None else layout.compact()
        self.px_scale = torch.as_tensor(np.asarray(stored_px_per_model_px, np.float32))
        self.weights = weights
        self._subsets: dict[tuple[int, ...], CameraBatch] = {}

    def camera_subset(self, index: Sequence[int]) -> CameraBatch:
        """The renderer's cameras at positions ``index`` (built once per subset)."""
        key = tuple(int(i) for i in index)
        if key not in self._subsets:
            names = self.renderer.cameras.names
            self._subsets[key] = self.renderer.cameras.subset([names[i] for i in key])
        return self._subsets[key]

    def state(self, b: torch.Tensor, gaze: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor) -> RigState:
        """The renderer's state from regressed weights (B, K), gaze (B, 4), R (B, 3, 3), t (B, 3)."""
        return RigState(full_blendshapes(b, gaze, self.definition, self.index), gaze, rotation, translation)

    def __call__(self, b: torch.Tensor, gaze: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor,
                 data: FrameData, residuals: bool = False, pixel_cameras: Sequence[int] | None = None,
                 with_pixels: bool = True) -> EnergyTerms:
        """The energy of B frames' states (regressed b, gaze, R, t) against ``data``; with
        ``residuals`` also each frame's pixel rms and keypoint distance (for reporting).
        ``pixel_cameras`` (positions in the renderer's cameras) renders the pixel term in
        those cameras only (the keypoint term keeps every camera: it costs no render).
        ``with_pixels=False`` leaves the pixel term out and renders nothing (the keypoint,
        sparsity and constraint terms alone: a training warm-up's cheap energy)."""
        w = self.weights
        state = self.state(b, gaze, rotation, translation)
        frame_rms = frame_kp = None
        if with_pixels:
            images, usable, cameras = data.images, data.usable, None
            if pixel_cameras is not None:
                cameras = self.camera_subset(pixel_cameras)
                index = torch.as_tensor(np.asarray(pixel_cameras, np.int64), device=images.device)
                images, usable = images.index_select(1, index), usable.index_select(1, index)
            out = self.renderer.render(state, self.appearance, cameras=cameras)
            vertices = out.vertices
            mask = (out.mask & usable[:, :, None, None]).to(out.ir.dtype)
            pixel = masked_l2(out.ir, images, mask)
            if residuals:
                sq = (mask * (out.ir.detach() - images) ** 2).sum((1, 2, 3))
                frame_rms = torch.sqrt(sq / mask.sum((1, 2, 3)).clamp_min(1.0))
        else:
            vertices = None
            pixel = b.new_zeros(())
            if residuals:
                frame_rms = torch.full((b.shape[0],), float("nan"))
        if residuals:
            frame_kp = torch.full((b.shape[0],), float("nan"))
        keypoint = b.new_zeros(())
        if self.layout is not None and data.keypoints is not None and w.keypoint > 0:
            if vertices is None:
                used = torch.as_tensor(self._kp_vertices, device=b.device)
                points = self._kp_layout.points(self.renderer.rig(state, vertices=used))
            else:
                points = self.layout.points(vertices)
            pixels, _ = self.renderer.project(points)
            scale = self.px_scale.to(pixels.dtype)[None, :, None, None]
            conf = data.confidence * data.usable[:, :, None].to(data.confidence.dtype)
            keypoint = keypoint_loss(pixels * scale, data.keypoints * scale, conf, w.keypoint_huber_px)
            if residuals:
                frame_kp = _frame_keypoint_px(pixels.detach() * scale, data.keypoints * scale, conf)
        sparsity = sparsity_loss(b)
        constraint = constraint_loss(b, self.index)
        total = w.pixel * pixel + w.keypoint * keypoint + w.sparsity * sparsity + w.constraint * constraint
        if with_pixels and w.appearance_prior > 0 and any(p.requires_grad for p in self.appearance.parameters()):
            total = total + w.appearance_prior * self.appearance.prior_loss()
        correction = self.renderer.rig.correction
        if correction is not None and correction.parameter.requires_grad:
            total = total + w.neutral_correction * correction.prior()
        return EnergyTerms(total, pixel, keypoint, sparsity, constraint, frame_rms, frame_kp)


def _frame_keypoint_px(pred: torch.Tensor, obs: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
    """(B,) mean distance in stored pixels over each frame's detected points (NaN: none)."""
    valid = torch.isfinite(obs).all(-1) & (conf > 0)
    d = torch.where(valid, (pred - torch.nan_to_num(obs)).norm(dim=-1), torch.zeros_like(conf))
    n = valid.sum((1, 2))
    return torch.where(n > 0, d.sum((1, 2)) / n.clamp_min(1), torch.full_like(n, float("nan"), dtype=d.dtype))


def frame_data(images: np.ndarray, usability: np.ndarray, keypoints: np.ndarray | None,
               confidence: np.ndarray | None) -> FrameData:
    """:class:`FrameData` from a clip's arrays for some frames (uint8 images)."""
    kp = conf = None
    if keypoints is not None:
        kp, conf = torch.from_numpy(keypoints), torch.from_numpy(confidence)
    return FrameData(torch.from_numpy(images).float() / 255.0, torch.from_numpy(usability == USABLE), kp, conf)
