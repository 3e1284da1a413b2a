"""Generator variants: the default image formation and an alternative one.

The labeller must not rely on the generator's own image formation. ``pgt synth --variant
alt`` makes subjects whose IR shading, sensor noise, headset slip, identity distribution
and keypoint errors all differ from the default's (docs/synthetic-data.md lists the
figures side by side); the phone part differs only through the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stages.synthesis.ir import IrShading, SensorNoise
from stages.synthesis.keypoints import KeypointDetector
from stages.synthesis.performance import HeadsetSlip


@dataclass(frozen=True)
class IdentityStyle:
    """How identities are drawn, relative to the preset's ``identity_std`` and ``detail_mm``.

    Attributes:
        scale: multiplies the standard deviation of the identity coefficients.
        skew: bends each standard-normal draw z to z + skew (z^2 - 1) / 2 (0 = Gaussian).
        detail_scale: multiplies the detail amplitude.
        detail_bumps: number of Gaussian bumps of the detail field.
    """

    scale: float = 1.0
    skew: float = 0.0
    detail_scale: float = 1.0
    detail_bumps: int = 16


@dataclass(frozen=True)
class GeneratorVariant:
    """Everything a variant changes.

    Attributes:
        name: the variant's name (``pgt synth --variant``).
        shading: IR LED shading and sensor response.
        noise: IR sensor noise.
        slip: headset slip of the HMC recordings.
        identity: identity distribution.
        keypoints: the simulated keypoint detector's errors.
    """

    name: str = "default"
    shading: IrShading = field(default_factory=IrShading)
    noise: SensorNoise = field(default_factory=SensorNoise)
    slip: HeadsetSlip = field(default_factory=HeadsetSlip)
    identity: IdentityStyle = field(default_factory=IdentityStyle)
    keypoints: KeypointDetector = field(default_factory=KeypointDetector)


VARIANTS: dict[str, GeneratorVariant] = {
    "default": GeneratorVariant(),
    "alt": GeneratorVariant(
        name="alt",
        # An LED ring 14 mm off the lens with a wide beam (softer falloff), a skin sheen,
        # less ambient fill, milder vignetting and a raised black level with gamma 1.8.
        shading=IrShading(
            led_offset_m=(0.012, -0.008, 0.0), ambient=0.05, falloff_power=1.6, gain=0.9,
            sheen=0.12, sheen_exponent=24.0, vignette_power=2.5, background=0.02, gamma=1.8, black_level=0.03,
        ),
        noise=SensorNoise(read_std=0.03, shot_gain=0.006, prnu_std=0.03, column_std=0.006),
        slip=HeadsetSlip(drift_mm=1.8, drift_deg=0.9, drift_smoothing_s=1.5, jumps=2, jump_mm=2.0, jump_deg=1.0),
        identity=IdentityStyle(scale=1.25, skew=0.4, detail_scale=1.6, detail_bumps=28),
        keypoints=KeypointDetector(
            bias_px=3.5, noise_px=2.5, noise_tail_dof=4.0, outlier_rate=0.03, outlier_px=(20.0, 60.0),
            border_margin_px=10.0, confidence=(0.5, 1.0),
        ),
    ),
}


def get_variant(name: str) -> GeneratorVariant:
    """The variant called ``name``; raises ConfigError for an unknown one."""
    from pipeline.errors import ConfigError

    if name not in VARIANTS:
        raise ConfigError(f"unknown generator variant {name!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[name]
