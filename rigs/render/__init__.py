"""Differentiable HMC renderer: posing, visibility backends, surface pass, IR appearance.

Modules: :mod:`~rigs.render.posing` (torch rig and state), :mod:`~rigs.render.cameras`
(camera batch), :mod:`~rigs.render.visibility` (non-differentiable triangle ids),
:mod:`~rigs.render.surface` (differentiable per-pixel samples),
:mod:`~rigs.render.appearance` and :mod:`~rigs.render.albedo` (the estimated IR
appearance), :mod:`~rigs.render.renderer` (all of it together), :mod:`~rigs.render.losses`
and :mod:`~rigs.render.fit`. See docs/renderer.md.
"""

from rigs.render.appearance import AppearanceModel
from rigs.render.cameras import CameraBatch
from rigs.render.fit import AppearanceFitConfig, StateFitConfig, fit_appearance, fit_state
from rigs.render.posing import RigState, TorchRig, quaternion_to_matrix, rotvec_to_matrix
from rigs.render.renderer import HmcRenderer, RenderOutput
from rigs.render.visibility import RaycastBackend, VisibilityBackend, ZBufferBackend

__all__ = [
    "AppearanceFitConfig", "AppearanceModel", "CameraBatch", "HmcRenderer", "RaycastBackend",
    "RenderOutput", "RigState", "StateFitConfig", "TorchRig", "VisibilityBackend", "ZBufferBackend",
    "fit_appearance", "fit_state", "quaternion_to_matrix", "rotvec_to_matrix",
]
