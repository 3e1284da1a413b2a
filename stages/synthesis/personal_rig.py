"""A synthetic subject's true personal rig: generic shapes adapted to the face, plus style.

People differ from a generic rig in more than amplitude (issue 8). The true rig starts
from the generic deltas transferred onto the subject's neutral (:func:`base_deltas`,
deformation transfer) and adds a person-specific *style* to every regressed shape, each a
seeded random effect whose largest magnitude :class:`PersonalRigConfig` sets:

- **direction**: the delta vectors turn about an axis (a smile that pulls more upward
  than sideways), one rotation per shape;
- **extent**: the support grows or shrinks: magnitudes ``m`` become ``M (m / M)^(1 - e)``
  (``M`` the shape's peak), so the peak stays and the falloff widens (e > 0) or narrows;
- **asymmetry**: a gain ``1 + a tanh(x / w)`` that differs between the face's halves and
  is smooth across the midline;
- **cross-talk**: a fraction of a related shape's delta (:data:`CROSS_TALK`);
- **extra motion**: a smooth displacement field the generic shape lacks, inside its
  support, at most a few mm;
- and the per-shape global gain of the earlier generator.

A left/right pair (``mouthSmile_L``/``_R``) shares one draw of the style parameters with
the rotation mirrored, so a face's two smiles are mirror images until asymmetry makes them
differ. Style acts on skin only, fading out within :attr:`PersonalRigConfig.rigid_fade_m`
of the teeth and gums; eyeballs, teeth and gums keep the transferred deltas times the
per-shape gain (a scaled rigid jaw motion stays rigid to first order). The eight
eye-following shapes get no style and no gain: their lids track an eyeball whose rotation
gaze fixes. Where the style breaks plausibility (:mod:`stages.synthesis.rig_plausibility`)
at a shape's full activation or in a prompt's art prior, it is faded out around the
vertices at fault, then halved (:func:`plausible_style`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from pipeline.errors import ConfigError
from rigs.definition import RigDefinition
from rigs.face_model import FaceModel
from rigs.rig import BlendshapeRig
from stages.synthesis import rig_plausibility

#: (shape, related shape) pairs of cross-talk; ``{s}`` is L and R in turn.
CROSS_TALK = (
    ("mouthSmile_{s}", "cheekSquint_{s}"),
    ("cheekSquint_{s}", "eyeSquint_{s}"),
    ("browInnerUp_{s}", "browOuterUp_{s}"),
    ("browOuterUp_{s}", "browInnerUp_{s}"),
    ("browDown_{s}", "eyeSquint_{s}"),
    ("noseSneer_{s}", "mouthUpperUp_{s}"),
    ("mouthUpperUp_{s}", "noseSneer_{s}"),
    ("mouthStretch_{s}", "mouthDimple_{s}"),
    ("mouthDimple_{s}", "mouthSmile_{s}"),
    ("mouthFrown_{s}", "mouthShrugLower"),
    ("mouthPucker", "mouthFunnel"),
    ("mouthFunnel", "mouthPucker"),
)
#: Parts that keep the transferred deltas (times the per-shape gain): no style.
NO_STYLE_PARTS = ("eyeball_left", "eyeball_right", "teeth", "gums_tongue")
#: Parts near which the style fades out (the skin lying on them must not sink in).
FADE_PARTS = ("teeth", "gums_tongue")
#: A vertex belongs to a shape's support when the shape moves it by more than this, metres.
SUPPORT_M = 1e-5


@dataclass(frozen=True)
class PersonalRigConfig:
    """Magnitudes of the true rig's departures from the transferred generic rig.

    Attributes:
        gain: per-shape global gain, uniform in [1 - gain/2, 1 + gain/2] (0.2: +-10 %).
        direction_deg: largest turn of a shape's delta vectors, degrees; each shape family
            draws an angle uniform in [0.5, 1] x this about a random axis (mirrored for
            ``_R``; the x axis for shapes across the midline), one rotation per shape.
        extent: largest falloff exponent change e (magnitudes m -> M (m/M)^(1-e)); each
            family draws +-[0.5, 1] x this. e = 0.4 lifts a vertex moving 10 % of the peak
            to 25 % (the support grows), e = -0.4 lowers it to 4 % (it shrinks).
        extent_gain_max: cap of the extent's per-vertex gain (m/M)^-e, so faint tails do
            not blow up.
        asymmetry: largest left/right gain difference a of ``1 + a tanh(x / w)``; each
            family draws +-[0.5, 1] x this (0.15: one side up to 15 % stronger, the other
            weaker).
        midline_m: w, the width over which the asymmetry gain crosses the midline, metres.
        cross_talk: largest fraction of the related shape's delta added (:data:`CROSS_TALK`);
            each pair draws uniform in [0.5, 1] x this.
        extra_mm: largest amplitude of the extra motion field, mm; each shape draws uniform
            in [0.5, 1] x this, capped by ``extra_fraction`` of the shape's peak.
        extra_fraction: cap of the extra motion as a fraction of the shape's peak magnitude.
        field_radius_m: (min, max) radius of the smooth fields' Gaussian bumps, metres.
        rigid_fade_m: the style fades linearly to zero within this of the teeth and gums.
        plausibility: cut each shape's style back where it breaks a plausibility check that
            the reference rig passes (:func:`plausible_style`).
        fade_radius_m: radius of the fade-out of the style around the vertices at fault.
        local_rounds: local fades of a failing pose before its shapes' style is halved.
        max_halvings: halvings before a shape's style is dropped.
    """

    gain: float = 0.2
    direction_deg: float = 25.0
    extent: float = 0.4
    extent_gain_max: float = 3.0
    asymmetry: float = 0.15
    midline_m: float = 0.04
    cross_talk: float = 0.25
    extra_mm: float = 2.0
    extra_fraction: float = 0.35
    field_radius_m: tuple[float, float] = field(default=(0.015, 0.035))
    rigid_fade_m: float = 0.004
    plausibility: bool = True
    fade_radius_m: float = 0.006
    local_rounds: int = 3
    max_halvings: int = 4

    def __post_init__(self) -> None:
        checks = {
            "gain": 0.0 <= self.gain < 2.0, "direction_deg": 0.0 <= self.direction_deg <= 60.0,
            "extent": 0.0 <= self.extent < 1.0,
            "extent_gain_max": self.extent_gain_max >= 1.0, "asymmetry": 0.0 <= self.asymmetry < 1.0,
            "midline_m": self.midline_m > 0.0, "cross_talk": 0.0 <= self.cross_talk <= 1.0,
            "extra_mm": 0.0 <= self.extra_mm <= 10.0, "extra_fraction": 0.0 <= self.extra_fraction <= 1.0,
            "field_radius_m": 0.0 < self.field_radius_m[0] <= self.field_radius_m[1],
            "rigid_fade_m": self.rigid_fade_m >= 0.0, "fade_radius_m": self.fade_radius_m > 0.0,
            "local_rounds": self.local_rounds >= 0, "max_halvings": self.max_halvings >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"personal rig config out of range: {', '.join(bad)}")

    def without_style(self) -> PersonalRigConfig:
        """The same gain with every style magnitude at zero."""
        return PersonalRigConfig(gain=self.gain, direction_deg=0.0, extent=0.0,
                                 asymmetry=0.0, cross_talk=0.0, extra_mm=0.0)


@dataclass(frozen=True, eq=False)
class PersonalRig:
    """The true deltas and what made them.

    Attributes:
        deltas: (K, n, 3) float32 true deltas, metres.
        base: (K, n, 3) float32 the transferred generic deltas the style was added to.
        gain: (K,) per-shape global gain.
        style_kept: (K,) the fraction (norm ratio) of each shape's drawn style kept for
            plausibility (1 where none was drawn).
        problems: what the dropped style broke, per shape name (for the docs and tests).
    """

    deltas: np.ndarray
    base: np.ndarray
    gain: np.ndarray
    style_kept: np.ndarray
    problems: dict[str, list[str]]


def base_deltas(generic: BlendshapeRig, neutral: np.ndarray) -> np.ndarray:
    """The generic deltas adapted to a subject's neutral by deformation transfer
    (:func:`rigs.deformation_transfer.transfer_deltas`; rigid parts keep the generic deltas).

    Args:
        neutral: (n, 3) the subject's neutral.

    Returns:
        (K, n, 3) float64 deltas, metres.
    """
    from rigs.deformation_transfer import transfer_deltas

    return np.asarray(transfer_deltas(generic, np.asarray(neutral, np.float64)), np.float64)


def family(name: str) -> str:
    """A shape's left/right family: the name without its ``_L``/``_R`` suffix."""
    return name[:-2] if name.endswith(("_L", "_R")) else name


def smooth_field(points: np.ndarray, rng: np.random.Generator, bumps: int, radius: tuple[float, float]) -> np.ndarray:
    """A smooth random scalar field: a sum of Gaussian bumps of amplitude uniform in [-1, 1].

    Args:
        points: (n, 3) positions (the bump centres are drawn among them), metres.
        bumps: number of bumps.
        radius: (min, max) bump radius, metres.

    Returns:
        (n,) float64 field, roughly in [-1, 1].
    """
    centres = points[rng.integers(0, len(points), bumps)]
    radii = rng.uniform(*radius, bumps)
    amps = rng.uniform(-1, 1, bumps)
    d2 = ((points[:, None, :] - centres[None]) ** 2).sum(-1)
    return (amps * np.exp(-d2 / (2 * radii**2))).sum(1)


def rotate(vectors: np.ndarray, rotvec: np.ndarray) -> np.ndarray:
    """Rodrigues rotation of each (v, 3) vector by its own (v, 3) rotation vector."""
    angle = np.linalg.norm(rotvec, axis=1, keepdims=True)
    axis = rotvec / np.maximum(angle, 1e-12)
    cos, sin = np.cos(angle), np.sin(angle)
    return (vectors * cos + np.cross(axis, vectors) * sin
            + axis * (axis * vectors).sum(1, keepdims=True) * (1 - cos))


@dataclass(frozen=True)
class FamilyStyle:
    """One draw of style parameters, shared by a left/right pair."""

    axis: np.ndarray
    angle: float
    extent: float
    asymmetry: float
    cross_talk: float


def draw_family(rng: np.random.Generator, config: PersonalRigConfig) -> FamilyStyle:
    """One family's style: every magnitude is [0.5, 1] x its configured largest value
    (with a random sign where it has one), so no effect comes out negligible."""
    axis = rng.normal(size=3)

    def draw(largest: float, signed: bool = False) -> float:
        sign = rng.choice([-1.0, 1.0]) if signed else 1.0
        return float(sign * rng.uniform(0.5, 1.0) * largest)

    return FamilyStyle(
        axis=axis / np.linalg.norm(axis),
        angle=draw(np.deg2rad(config.direction_deg)),
        extent=draw(config.extent, signed=True),
        asymmetry=draw(config.asymmetry, signed=True),
        cross_talk=draw(config.cross_talk),
    )


def rotation_vector(name: str, style: FamilyStyle) -> np.ndarray:
    """(3,) the shape's constant rotation vector: the family's axis for ``_L`` shapes, its
    mirror image (x -> -x turns a rotation about (a, b, c) into one about (a, -b, -c)) for
    ``_R``, and a rotation about the x axis (the only mirror-symmetric one) for shapes that
    span the midline."""
    ax = style.axis
    if name.endswith("_R"):
        ax = ax * np.array([1.0, -1.0, -1.0])
    elif not name.endswith("_L"):
        ax = np.array([np.sign(ax[0]) or 1.0, 0.0, 0.0])
    return style.angle * ax


def shape_style(name: str, delta: np.ndarray, related: np.ndarray | None, points: np.ndarray,
                style: FamilyStyle, rng: np.random.Generator, config: PersonalRigConfig) -> np.ndarray:
    """The style displacement of one shape on its skin vertices (to add to its delta).

    Args:
        name: the shape's name (its ``_L``/``_R`` suffix mirrors the rotation).
        delta: (v, 3) the shape's base delta on the skin vertices.
        related: (v, 3) the cross-talk source's base delta there, or None.
        points: (v, 3) the skin vertices at neutral (x = 0 is the midline).

    Returns:
        (v, 3) float64 style displacement, metres.
    """
    mag = np.linalg.norm(delta, axis=1)
    support = mag > SUPPORT_M
    out = np.zeros_like(delta)
    if support.sum() < 4:
        return out
    peak = mag.max()
    d, m, p = delta[support], mag[support], points[support]
    # Extent: m -> M (m / M)^(1 - e), the peak kept.
    styled = d * np.minimum((m / peak) ** -style.extent, config.extent_gain_max)[:, None]
    # Direction: one rotation for the whole shape. A rotation that varied over the face
    # would add |delta| x (its angle's gradient) of strain: on jawOpen's 40 mm that flips
    # lip triangles at any useful angle.
    rotvec = rotation_vector(name, style)
    styled = rotate(styled, np.broadcast_to(rotvec, styled.shape))
    # Asymmetry: the subject's left (+x) stronger or weaker, smooth across the midline.
    styled *= (1.0 + style.asymmetry * np.tanh(p[:, 0] / config.midline_m))[:, None]
    if related is not None:
        styled += style.cross_talk * related[support]
    # Extra motion: a smooth field, full where the shape moves >= 25 % of its peak.
    amp = min(config.extra_mm * 1e-3 * rng.uniform(0.5, 1.0), config.extra_fraction * peak)
    extra = np.stack([smooth_field(p, rng, 6, config.field_radius_m) for _ in range(3)], 1)
    extra *= amp / max(np.linalg.norm(extra, axis=1).max(), 1e-12)
    styled += extra * np.clip(m / (0.25 * peak), 0, 1)[:, None]
    out[support] = styled - d
    return out


def cross_talk_sources(definition: RigDefinition) -> dict[int, int]:
    """Shape index -> index of the shape whose delta leaks into it (names the rig lacks are skipped)."""
    names = set(definition.blendshape_names)
    out = {}
    for target, source in CROSS_TALK:
        for s in ("L", "R"):
            t, r = target.format(s=s), source.format(s=s)
            if t in names and r in names:
                out[definition.index(t)] = definition.index(r)
    return out


def style_weight(neutral: np.ndarray, model: FaceModel, fade: float) -> np.ndarray:
    """(n,) weight of the style per vertex: 0 on rigid parts, rising linearly to 1 at
    ``fade`` metres from the teeth and gums."""
    weight = np.ones(len(neutral))
    weight[model.part_vertices(*NO_STYLE_PARTS)] = 0.0
    near = model.part_vertices(*FADE_PARTS)
    if fade > 0 and len(near):
        skin = weight > 0
        dist, _ = cKDTree(neutral[near]).query(neutral[skin])
        weight[skin] = np.clip(dist / fade, 0.0, 1.0)
    return weight


def make_personal_rig(base: np.ndarray, neutral: np.ndarray, model: FaceModel, definition: RigDefinition,
                      rng: np.random.Generator, config: PersonalRigConfig | None = None) -> PersonalRig:
    """Draws a subject's true deltas from the transferred generic ones.

    Args:
        base: (K, n, 3) transferred generic deltas (:func:`base_deltas`).
        neutral: (n, 3) the subject's neutral.
        rng: the subject's random stream (seeded: the same stream gives the same rig).

    Returns:
        The true rig's deltas with their gains, style scales and plausibility problems.
    """
    config = config or PersonalRigConfig()
    neutral = np.asarray(neutral, np.float64)
    base = np.asarray(base, np.float64)
    k_total = definition.size
    eye_following = set(definition.indices(definition.eye_following).tolist())
    gain = rng.uniform(1 - config.gain / 2, 1 + config.gain / 2, k_total)
    gain[list(eye_following)] = 1.0
    families = {}
    for name in definition.blendshape_names:  # definition order: reproducible
        families.setdefault(family(name), draw_family(rng, config))
    weight = style_weight(neutral, model, config.rigid_fade_m)
    skin = np.flatnonzero(weight > 0)
    sources = cross_talk_sources(definition)
    style = np.zeros_like(base)
    for k, name in enumerate(definition.blendshape_names):
        if k in eye_following:
            continue
        related = base[sources[k]][skin] if k in sources else None
        local = shape_style(name, base[k][skin], related, neutral[skin], families[family(name)], rng, config)
        style[k][skin] = local * weight[skin, None]
    style *= gain[:, None, None]
    drawn = np.linalg.norm(style.reshape(k_total, -1), axis=1)
    problems: dict[str, list[str]] = {}
    if config.plausibility:
        style, problems = plausible_style(neutral, base * gain[:, None, None], style, model, definition, config)
    kept = np.linalg.norm(style.reshape(k_total, -1), axis=1) / np.maximum(drawn, 1e-12)
    deltas = gain[:, None, None] * base + style
    return PersonalRig(deltas.astype(np.float32), base.astype(np.float32), gain, np.where(drawn > 0, kept, 1.0), problems)


def probe_poses(definition: RigDefinition) -> list[tuple[str, np.ndarray]]:
    """The poses checked: every regressed shape alone at 1 (with the shapes it must not
    exceed, e.g. jawOpen for mouthClose, at 1 too), then every prompt's art prior."""
    poses = []
    for name in definition.regressed:
        b = np.zeros(definition.size)
        b[definition.index(name)] = 1.0
        for low, high in definition.at_most:
            if low == name:
                b[definition.index(high)] = 1.0
        poses.append((name, b))
    poses += [(f"prompt {p.name}", definition.art_prior_vector(p.name).astype(np.float64))
              for p in definition.prompts if p.art_prior]
    return poses


def plausible_style(neutral: np.ndarray, reference: np.ndarray, style: np.ndarray, model: FaceModel,
                    definition: RigDefinition, config: PersonalRigConfig) -> tuple[np.ndarray, dict[str, list[str]]]:
    """The style cut back until every probe pose of ``reference + style`` breaks nothing
    that ``reference`` keeps (:func:`rig_plausibility.violations`).

    A failing pose first fades the style of its active shapes out around the vertices at
    fault (a factor ``1 - exp(-d^2 / 2 r^2)`` of the neutral distance d to them, r =
    ``fade_radius_m``), ``local_rounds`` times; if it still fails, their style is halved
    until it passes (dropped after ``max_halvings``). Poses are revisited until none fails.

    Args:
        neutral: (n, 3) the subject's neutral.
        reference: (K, n, 3) the reference deltas (the gained transferred ones).
        style: (K, n, 3) the drawn style (gained).

    Returns:
        (K, n, 3) the plausible style and, per shape whose style was cut, the problems seen.
    """
    probe = rig_plausibility.make_probe(neutral, model)
    mask = np.ones(style.shape[:2])
    halvings = np.zeros(definition.size, int)
    version = np.zeros(definition.size, int)  # bumped whenever a shape's style is cut
    problems: dict[str, list[str]] = {}
    poses = probe_poses(definition)
    checked: dict[str, np.ndarray] = {}  # pose -> the versions it passed with
    references: dict[str, rig_plausibility.Measures] = {}
    while True:
        todo = [(label, b) for label, b in poses
                if label not in checked or (checked[label] != version[b > 0]).any()]
        if not todo:
            return style * mask[..., None], problems
        for label, b in todo:
            active = np.flatnonzero(b > 0)
            if not style[active].any():  # nothing drawn for these shapes: nothing to check
                checked[label] = version[active].copy()
                continue
            ref = neutral + np.tensordot(b[active], reference[active], axes=1)
            if label not in references:
                references[label] = rig_plausibility.measure(probe, ref)
            for rounds in range(1, 2 + config.local_rounds + config.max_halvings):
                posed = ref.copy()
                for k in active:
                    posed += (b[k] * mask[k])[:, None] * style[k]
                verdict = rig_plausibility.violations(probe, posed, ref, references[label])
                if not verdict.problems:
                    break
                for k in active:
                    problems.setdefault(definition.blendshape_names[k], []).append(f"{label}: {'; '.join(verdict.problems)}")
                version[active] += 1
                if rounds <= config.local_rounds:
                    dist, _ = cKDTree(neutral[verdict.vertices]).query(neutral)
                    mask[active] *= 1.0 - np.exp(-(dist**2) / (2 * config.fade_radius_m**2))
                else:
                    halvings[active] += 1
                    mask[active] *= np.where(halvings[active] > config.max_halvings, 0.0, 0.5)[:, None]
            checked[label] = version[active].copy()


def shape_differences(true: np.ndarray, other: np.ndarray, moving_m: float = 5e-4) -> np.ndarray:
    """Per shape, mean and max per-vertex distance (mm) between two rigs' deltas over the
    vertices the true shape moves by at least ``moving_m`` (issue 8's per-basis error).

    Args:
        true: (K, n, 3) the true deltas, metres.
        other: (K, n, 3) the deltas compared with them.

    Returns:
        (K, 2) float64 [mean, max] mm (NaN for a shape that moves nothing that far).
    """
    out = np.full((len(true), 2), np.nan)
    for k in range(len(true)):
        moving = np.linalg.norm(true[k], axis=1) >= moving_m
        if moving.any():
            err = np.linalg.norm(np.asarray(true[k], np.float64) - other[k], axis=1)[moving] * 1e3
            out[k] = err.mean(), err.max()
    return out
