"""A synthetic subject: identity, detail outside the shape space, and a true personal rig."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from rigs.definition import RigDefinition
from rigs.face_model import FaceModel
from rigs.raycast import vertex_normals
from rigs.rig import BlendshapeRig
from stages.synthesis.personal_rig import (
    PersonalRigConfig,
    base_deltas,
    make_personal_rig,
    smooth_field,
)

#: Parts that stay rigid under identity detail and rig variation (eyes, teeth).
RIGID_PARTS = ("eyeball_left", "eyeball_right", "teeth")


@dataclass(frozen=True, eq=False)
class SyntheticSubject:
    """Everything the generator knows about a subject (written to ground_truth/).

    Attributes:
        subject_id: safe name.
        identity: (k,) identity coefficients.
        detail: (n, 3) float32 displacement outside the identity space, metres.
        rig: the true personal rig (neutral = identity + detail).
        tint: (3,) albedo multiplier (skin tone).
        shape_gain: (K,) per-shape global gain of the personal rig.
    """

    subject_id: str
    identity: np.ndarray
    detail: np.ndarray
    rig: BlendshapeRig
    tint: np.ndarray
    shape_gain: np.ndarray


#: Multi-PIE 68 indices of the inner lips' midline (upper, lower).
LIP_MIDLINE = (62, 66)


def seal_lips(neutral: np.ndarray, jaw_open: np.ndarray, model: FaceModel, sigma: float = 0.012) -> np.ndarray:
    """Closes the lips of a neutral face: people at rest with a closed mouth have touching lips.

    ICT's identity modes part the lips by up to ~3 mm at neutral (median 1.2 mm), which
    would make a true mouth-closed window fail SPEC's 1 mm lip-gap test. First the
    resting jaw closes by the (negative) amount of ``jaw_open`` that best cancels the
    midline gap; the rest, mostly the upper lip sitting ahead of the lower, is sealed
    locally: lip vertices on either side of the plane through the mouth centre move half
    the residual toward each other, fading with a Gaussian of ``sigma`` metres.

    Args:
        neutral: (n, 3) neutral vertices.
        jaw_open: (n, 3) the jawOpen delta.

    Returns:
        (n, 3) float64 neutral with a midline lip gap below 0.1 mm.
    """
    upper, lower = model.landmarks68[list(LIP_MIDLINE)]
    out = np.asarray(neutral, np.float64).copy()
    gap = out[upper] - out[lower]
    dg = jaw_open[upper] - jaw_open[lower]
    out += np.clip(-(gap @ dg) / (dg @ dg), -0.15, 0.0) * jaw_open
    residual = out[upper] - out[lower]
    centre = (out[upper] + out[lower]) / 2
    lips = np.flatnonzero(np.isin(model.vertex_part, [model.part_names.index(p) for p in ("face", "mouth_socket")]))
    offset = out[lips] - centre
    weight = np.exp(-(offset**2).sum(1) / (2 * sigma**2))
    side = np.where(offset @ residual >= 0, -0.5, 0.5)  # upper side moves down, lower up
    out[lips] += (weight * side)[:, None] * residual
    return out


def make_subject(
    subject_id: str,
    rng: np.random.Generator,
    model: FaceModel,
    definition: RigDefinition,
    *,
    identity_std: float = 1.0,
    detail_mm: float = 1.5,
    rig_variation: float = 0.2,
    personal: PersonalRigConfig | None = None,
    identity_skew: float = 0.0,
    detail_bumps: int = 16,
) -> SyntheticSubject:
    """Draws a subject: identity from the model prior, detail, and a true personal rig.

    ``rig_variation`` is the per-shape gain range of the personal rig
    (:attr:`PersonalRigConfig.gain`); ``personal`` sets the rest of its style (default:
    :class:`PersonalRigConfig`'s documented magnitudes). ``identity_skew`` s != 0 bends
    each standard-normal draw z to z + s (z^2 - 1) / 2 (zero mean, skewed) before the
    scaling; ``detail_bumps`` is the number of Gaussian bumps of the detail field.
    """
    identity = rng.normal(0.0, identity_std, len(model.identity_basis))
    if identity_skew:
        z = identity / identity_std
        identity = identity_std * (z + identity_skew * (z**2 - 1) / 2)
    base = model.identity_shape(identity)
    deformable = ~np.isin(model.vertex_part, [model.part_names.index(p) for p in RIGID_PARTS])
    normals = vertex_normals(base, model.triangles)
    detail = np.zeros_like(base)
    field = smooth_field(base, rng, bumps=detail_bumps, radius=(0.008, 0.025))
    detail[deformable] = (detail_mm * 1e-3 * field[:, None] * normals)[deformable]
    neutral = base + detail

    generic = BlendshapeRig.generic(model, definition)
    neutral = seal_lips(neutral, generic.deltas[definition.index("jawOpen")], model)
    config = replace(personal or PersonalRigConfig(), gain=rig_variation)
    true = make_personal_rig(base_deltas(generic, neutral), neutral, model, definition, rng, config)
    rig = BlendshapeRig(definition, neutral.astype(np.float32), true.deltas, model)
    detail = neutral - base  # everything outside the identity space, the lip seal included
    tint = np.array([1.0, 0.93, 0.88]) * rng.uniform(0.6, 1.1) + rng.uniform(-0.05, 0.05, 3)
    return SyntheticSubject(subject_id, identity, detail.astype(np.float32), rig, tint, true.gain)
