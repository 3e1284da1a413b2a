"""Generator presets: a tiny one for tests and a standard one for benchmarks (SPEC §6)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScriptTiming:
    """Durations (seconds) of the HMC capture script's blocks.

    Attributes:
        neutral_s: neutral window; Neutralness trims 0.5 s at each end, so keep > 1 s.
        peak_s: one prompted peak, ramps included (the annotated window excludes them).
        eye_event_s: an eye closure or a wink.
        mouth_closed_s: a mouth-closed window.
        speech_s: speech.
        rest_s: relaxed transition between blocks.
    """

    neutral_s: float = 2.5
    peak_s: float = 1.6
    eye_event_s: float = 0.8
    mouth_closed_s: float = 1.0
    speech_s: float = 2.0
    rest_s: float = 0.3


@dataclass(frozen=True)
class SynthConfig:
    """What one synthetic subject contains.

    Attributes:
        name: preset name, recorded in the ground truth.
        prompts: phone-capture prompts to scan; empty = every prompt of the rig.
        phone_frames_per_prompt: RGBD frames per prompt burst (head angles differ).
        phone_width: phone image width, pixels (height = 4/3 of it, portrait).
        phone_hfov_deg: phone horizontal field of view, degrees.
        phone_distance_m: (min, max) camera-to-face distance, metres.
        hmc_size: HMC image side, pixels (the rig's 400 x 400 scaled down if smaller).
        hmc_recordings: number of HMC recordings.
        hmc_peaks_per_recording: prompted peak windows per recording.
        script: durations of the capture script's blocks.
        fps: HMC frame rate, Hz.
        identity_std: standard deviation of identity coefficients (1 = the model's prior).
        detail_mm: amplitude of the identity detail outside the shape space, mm.
        rig_variation: per-shape gain range of the true personal rig (0.2 = +-10 %); the rest of
            its style is :class:`stages.synthesis.personal_rig.PersonalRigConfig`'s.
        phone_yaw_deg: the phone burst's head turn: each frame's camera yaw around the face
            is uniform in +-this, degrees (large values make bursts with large head turns).
        phone_pitch_deg: likewise the camera pitch, uniform in +-this, degrees.
        phone_only: write the phone part in full but, in place of the HMC recordings, one
            minimal recording (:data:`PHONE_ONLY_HMC`) that keeps the capture valid. The
            phone frames and the subject are byte-identical to the full subject's.
        variant: generator variant (:data:`stages.synthesis.variants.VARIANTS`): "default",
            or "alt", whose IR shading, sensor noise, headset slip, identity distribution
            and keypoint errors differ (docs/synthetic-data.md).
    """

    name: str
    prompts: tuple[str, ...] = ()
    phone_frames_per_prompt: int = 4
    phone_width: int = 480
    phone_hfov_deg: float = 60.0
    phone_distance_m: tuple[float, float] = (0.30, 0.38)
    hmc_size: int = 400
    hmc_recordings: int = 4
    hmc_peaks_per_recording: int = 4
    script: ScriptTiming = field(default_factory=ScriptTiming)
    fps: float = 30.0
    identity_std: float = 1.0
    detail_mm: float = 1.5
    rig_variation: float = 0.2
    phone_yaw_deg: float = 18.0
    phone_pitch_deg: float = 10.0
    phone_only: bool = False
    variant: str = "default"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from pipeline.errors import ConfigError

        # Beyond 80 degrees of yaw the camera sees the ear, not the face.
        if not 0.0 <= self.phone_yaw_deg <= 80.0:
            raise ConfigError(f"synth.phone_yaw_deg must be in [0, 80] degrees, got {self.phone_yaw_deg}")
        if not 0.0 <= self.phone_pitch_deg <= 60.0:
            raise ConfigError(f"synth.phone_pitch_deg must be in [0, 60] degrees, got {self.phone_pitch_deg}")


#: The one short recording of a ``phone_only`` subject: 64 x 64 pixels at 10 Hz with the
#: ``tiny`` script and one peak, 71 frames (the capture contract needs a recording).
PHONE_ONLY_HMC = {
    "size": 64, "fps": 10.0, "peaks": 1,
    "script": ScriptTiming(neutral_s=2.0, peak_s=1.0, eye_event_s=0.5, mouth_closed_s=0.5, speech_s=0.8, rest_s=0.1),
}


PRESETS: dict[str, SynthConfig] = {
    # Seconds per subject: few prompts and frames, one short recording with every segment
    # type, reduced resolutions at which MediaPipe still finds the face.
    "tiny": SynthConfig(
        name="tiny",
        prompts=("neutral", "jaw_drop_max", "smile_closed", "wink_left", "brows_raise"),
        phone_frames_per_prompt=2,
        phone_width=240,
        hmc_size=160,
        hmc_recordings=1,
        hmc_peaks_per_recording=2,
        script=ScriptTiming(neutral_s=2.0, peak_s=1.0, eye_event_s=0.5, mouth_closed_s=0.5, speech_s=0.8, rest_s=0.1),
    ),
    # Benchmarks: all 60 prompts, realistic resolutions, 4 x 16.5 s = 66 s of HMC.
    "standard": SynthConfig(name="standard"),
}


def get_preset(name: str) -> SynthConfig:
    from pipeline.errors import ConfigError

    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
