"""Performances: how a synthetic subject executes prompts and an HMC capture script.

Prompts are performed imperfectly (SPEC §6): each prior shape reaches 60-100 % of its art
prior, a few other shapes co-activate, one-sided prompts leak to the other side, so art
priors are only approximately right. An HMC recording follows a capture script of
neutral, peak, eye-closure, wink, mouth-closed and speech blocks, with natural blinks,
saccadic gaze and headset slip (slow drift plus a re-donning jump).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rigs.definition import RigDefinition
from stages.synthesis.presets import ScriptTiming
from storage.capture_types import Segment


@dataclass(frozen=True, eq=False)
class Timeline:
    """Per-frame truth of an HMC recording.

    Attributes:
        b: (T, K) float32 activations in [0, 1], eye-following ones derived from gaze.
        gaze: (T, 4) float32 [left yaw, left pitch, right yaw, right pitch], radians.
        head_rotvec: (T, 3) float64 head-in-headset rotation vectors, radians.
        head_t: (T, 3) float64 head-in-headset translation, metres.
        segments: the capture script's annotations.
        timestamps_ns: (T,) int64.
    """

    b: np.ndarray
    gaze: np.ndarray
    head_rotvec: np.ndarray
    head_t: np.ndarray
    segments: tuple[Segment, ...]
    timestamps_ns: np.ndarray


@dataclass(frozen=True)
class HeadsetSlip:
    """Head-in-headset motion of a recording: slow drift plus re-donning jumps.

    Attributes:
        drift_mm: standard deviation of the drift on each translation axis, mm.
        drift_deg: standard deviation of the drift on each rotation-vector component, degrees.
        drift_smoothing_s: sigma of the Gaussian low-pass that makes the drift slow, seconds.
        jumps: re-donning jumps per recording; jump j falls uniformly in the (j + 1)-th of
            ``jumps + 2`` equal parts of the recording (one jump: the middle third).
        jump_mm: each jump is uniform in +-this on each translation axis, mm.
        jump_deg: and uniform in +-this on each rotation-vector component, degrees.
    """

    drift_mm: float = 1.0
    drift_deg: float = 0.5
    drift_smoothing_s: float = 3.0
    jumps: int = 1
    jump_mm: float = 3.0
    jump_deg: float = 1.5


def gaze_for_prior(definition: RigDefinition, prior: dict[str, float]) -> np.ndarray:
    """(4,) gaze that produces the eye-following part of an art prior."""
    return definition.gaze_from_eye_following([prior.get(n, 0.0) for n in definition.eye_following])


def perform_prompt(definition: RigDefinition, prompt: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One imperfect execution of a prompt.

    Returns:
        (b (K,) float32, gaze (4,) float32).
    """
    prior = definition.prompt(prompt).art_prior
    eye_following = set(definition.eye_following)
    b = np.zeros(definition.size)
    for name, value in prior.items():
        if name not in eye_following:
            b[definition.index(name)] = value * rng.uniform(0.6, 1.0)
    regressed = definition.indices(definition.regressed)
    if prior:  # co-activations the artist did not write down
        for k in rng.choice(regressed, size=rng.integers(1, 4), replace=False):
            b[k] = max(b[k], rng.uniform(0.05, 0.25))
        for name, value in prior.items():  # one-sided prompts leak to the twin
            twin = name[:-2] + ("_R" if name.endswith("_L") else "_L")
            if name[-2:] in ("_L", "_R") and twin in definition.blendshape_names and twin not in prior:
                b[definition.index(twin)] = max(b[definition.index(twin)], value * rng.uniform(0.0, 0.25))
    gaze = gaze_for_prior(definition, {k: v * rng.uniform(0.7, 1.0) for k, v in prior.items() if k in eye_following})
    b = _finish(definition, b[None], gaze[None])[0]
    return b.astype(np.float32), gaze.astype(np.float32)


def _finish(definition: RigDefinition, b: np.ndarray, gaze: np.ndarray) -> np.ndarray:
    """Clips to [0, 1], applies at-most constraints, derives eye-following shapes from gaze."""
    b = np.clip(b, 0.0, 1.0)
    for a, limit in definition.at_most:
        ia, il = definition.index(a), definition.index(limit)
        b[:, ia] = np.minimum(b[:, ia], b[:, il])
    b[:, definition.indices(definition.eye_following)] = definition.eye_following_from_gaze(gaze)
    return b


def _envelope(n: int, ramp: int) -> np.ndarray:
    """(n,) smoothstep up over ``ramp`` frames, hold, smoothstep down."""
    env = np.ones(n)
    if ramp > 0:
        x = np.linspace(0, 1, ramp + 2)[1:-1]
        up = x * x * (3 - 2 * x)
        env[:ramp], env[n - ramp :] = up, up[::-1]
    return env


def _smooth_noise(rng: np.random.Generator, n: int, dims: int, cutoff_frames: float) -> np.ndarray:
    """(n, dims) low-pass noise with unit standard deviation."""
    from scipy.ndimage import gaussian_filter1d

    x = gaussian_filter1d(rng.normal(size=(n + 200, dims)), cutoff_frames, axis=0, mode="wrap")[100:-100]
    return x / np.maximum(x.std(0), 1e-9)


def hmc_timeline(
    definition: RigDefinition,
    rng: np.random.Generator,
    peak_prompts: list[str],
    timing: ScriptTiming,
    *,
    fps: float = 30.0,
    wink_eye: str = "left",
    slip: HeadsetSlip = HeadsetSlip(),
) -> Timeline:
    """A recording following the capture script, with its segment annotations."""
    f = lambda seconds: max(1, round(seconds * fps))  # noqa: E731
    idx = definition.index
    rest = ("rest", f(timing.rest_s), {})
    blocks: list[tuple[str, int, dict]] = [rest, ("neutral", f(timing.neutral_s), {})]
    for p in peak_prompts:
        blocks += [rest, ("peak", f(timing.peak_s), {"prompt": p})]
    blocks += [
        rest, ("eye_closure", f(timing.eye_event_s), {}),
        rest, ("wink", f(timing.eye_event_s), {"eye": wink_eye}),
        rest, ("mouth_closed", f(timing.mouth_closed_s), {}),
        rest, ("speech", f(timing.speech_s), {}),
        rest,
    ]
    total = sum(n for _, n, _ in blocks)
    b = np.zeros((total, definition.size))
    gaze_target = np.zeros((total, 4))
    no_blink = np.zeros(total, bool)
    segments: list[Segment] = []
    ramp = min(f(0.2), f(timing.peak_s) // 4)
    t = 0
    for kind, n, extra in blocks:
        window = slice(t, t + n)
        if kind == "neutral":
            no_blink[window] = True
            segments.append(Segment("neutral", t, t + n))
        elif kind == "peak":
            pb, pg = perform_prompt(definition, extra["prompt"], rng)
            env = _envelope(n, ramp)[:, None]
            b[window] = np.maximum(b[window], env * pb)
            gaze_target[window] = env * pg
            segments.append(Segment("peak", t + ramp, t + n - ramp, prompt=extra["prompt"]))
        elif kind in ("eye_closure", "wink"):
            env = _envelope(n + 2 * f(0.1), f(0.1))
            start = max(0, t - f(0.1))
            span = slice(start, start + len(env))
            eyes = ("_L", "_R") if kind == "eye_closure" else (("_L",) if extra["eye"] == "left" else ("_R",))
            for s in eyes:
                b[span, idx(f"eyeBlink{s}")] = np.maximum(b[span, idx(f"eyeBlink{s}")], env[: len(b[span])] * rng.uniform(0.95, 1.0))
            if kind == "wink":  # the other cheek and eye stay relaxed, the winking cheek lifts
                closed = "_L" if extra["eye"] == "left" else "_R"
                b[window, idx(f"cheekSquint{closed}")] = rng.uniform(0.1, 0.3)
            no_blink[span] = True
            segments.append(Segment(kind, t, t + n, eye=extra.get("eye")))
        elif kind == "mouth_closed":
            # A light press only: ICT's mouthPress parts the lips by ~0.7 mm at 0.2.
            b[window, idx("mouthPress_L")] = b[window, idx("mouthPress_R")] = rng.uniform(0.0, 0.08)
            segments.append(Segment("mouth_closed", t, t + n))
        elif kind == "speech":
            b[window] = np.maximum(b[window], _speech(definition, rng, n, fps))
            segments.append(Segment("speech", t, t + n))
        t += n

    # Natural blinks every 2-5 s outside the windows that must stay open or neutral.
    t = int(rng.integers(0, f(2.0)))
    while t < total:
        dur = f(rng.uniform(0.15, 0.3))
        span = slice(t, min(total, t + dur))
        if not no_blink[span].any():
            env = np.sin(np.linspace(0, np.pi, span.stop - span.start)) ** 2
            for s in ("_L", "_R"):
                b[span, idx(f"eyeBlink{s}")] = np.maximum(b[span, idx(f"eyeBlink{s}")], env)
        t += f(rng.uniform(2.0, 5.0))

    gaze = gaze_target + _saccades(rng, total, fps)
    b = _finish(definition, b, gaze)
    rotvec, trans = _headset_slip(rng, total, fps, slip)
    timestamps = (np.arange(total) * (1e9 / fps)).astype(np.int64) + int(rng.integers(0, 10**9))
    return Timeline(b.astype(np.float32), gaze.astype(np.float32), rotvec, trans, tuple(segments), timestamps)


def _speech(definition: RigDefinition, rng: np.random.Generator, n: int, fps: float) -> np.ndarray:
    """(n, K) speech-like mouth motion: jaw at a syllable rate, lip shapes per syllable."""
    out = np.zeros((n, definition.size))
    rate = rng.uniform(3.5, 5.0)
    phase = np.cumsum(np.full(n, rate / fps)) + rng.uniform()
    syllable = np.floor(phase).astype(int)
    open_amount = rng.uniform(0.15, 0.45, syllable.max() + 1)[syllable]
    out[:, definition.index("jawOpen")] = open_amount * np.sin(np.pi * (phase % 1.0)) ** 2
    lip_shapes = ["mouthFunnel", "mouthPucker", "mouthStretch_L", "mouthStretch_R", "mouthUpperUp_L", "mouthUpperUp_R", "mouthClose"]
    choice = rng.integers(0, len(lip_shapes), syllable.max() + 1)[syllable]
    strength = rng.uniform(0.1, 0.4, syllable.max() + 1)[syllable] * np.sin(np.pi * (phase % 1.0))
    for k, name in enumerate(lip_shapes):
        out[choice == k, definition.index(name)] = strength[choice == k]
    return out


def _saccades(rng: np.random.Generator, n: int, fps: float) -> np.ndarray:
    """(n, 4) fixations with quick saccades between them; both eyes move together."""
    gaze = np.zeros((n, 2))
    t = 0
    current = np.zeros(2)
    while t < n:
        target = rng.normal(0, np.deg2rad(6), 2)
        steps = max(1, round(0.04 * fps))
        for k in range(steps):
            if t + k < n:
                gaze[t + k] = current + (target - current) * (k + 1) / steps
        hold = round(rng.uniform(0.4, 1.8) * fps)
        gaze[t + steps : t + steps + hold] = target
        current = target
        t += steps + hold
    vergence = np.deg2rad(1.0)  # the eyes converge slightly on a near target
    return np.c_[gaze[:, 0] - vergence, gaze[:, 1], gaze[:, 0] + vergence, gaze[:, 1]]


def _headset_slip(rng: np.random.Generator, n: int, fps: float, slip: HeadsetSlip) -> tuple[np.ndarray, np.ndarray]:
    """(rotation vectors (n, 3) radians, translations (n, 3) metres) of the head in the headset."""
    drift_t = _smooth_noise(rng, n, 3, cutoff_frames=slip.drift_smoothing_s * fps) * (slip.drift_mm * 1e-3)
    drift_r = _smooth_noise(rng, n, 3, cutoff_frames=slip.drift_smoothing_s * fps) * np.deg2rad(slip.drift_deg)
    parts = slip.jumps + 2
    for j in range(slip.jumps):
        lo = (j + 1) * n // parts
        jump_at = int(rng.integers(lo, max(lo + 1, (j + 2) * n // parts)))
        step = (np.arange(n) >= jump_at)[:, None]
        drift_t = drift_t + step * rng.uniform(-1, 1, 3) * (slip.jump_mm * 1e-3)
        drift_r = drift_r + step * rng.uniform(-1, 1, 3) * np.deg2rad(slip.jump_deg)
    return drift_r, drift_t
