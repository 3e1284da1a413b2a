"""The rig definition: blendshape names, order, version, constraints and capture prompts.

Everything the product knows about a rig's semantics lives in one JSON file (the embedded
default is ``rigs/data/ict_rig_definition.json``); no code hard-codes a blendshape name
except where a metric is defined on a named shape (SPEC §5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.errors import ModelError

DEFAULT_DEFINITION = Path(__file__).parent / "data" / "ict_rig_definition.json"

#: SPEC §3 eye-following convention: shape -> (gaze column, sign), activation =
#: clip(sign * gaze[column] / theta_max, 0, 1); gaze columns are [left yaw, left pitch,
#: right yaw, right pitch]. Yaw > 0 turns an eye toward +x (the subject's left): out for
#: the left eye, in for the right. The one place that names these shapes' semantics.
GAZE_DRIVES: dict[str, tuple[int, int]] = {
    "eyeLookUp_L": (1, 1), "eyeLookDown_L": (1, -1), "eyeLookOut_L": (0, 1), "eyeLookIn_L": (0, -1),
    "eyeLookUp_R": (3, 1), "eyeLookDown_R": (3, -1), "eyeLookOut_R": (2, -1), "eyeLookIn_R": (2, 1),
}


@dataclass(frozen=True)
class Prompt:
    """One phone-capture prompt and the artist's expected activations.

    Attributes:
        name: identifier, also the phone-capture folder name.
        description: the instruction shown to the subject.
        art_prior: sparse blendshape name -> expected activation in (0, 1].
    """

    name: str
    description: str
    art_prior: dict[str, float]


@dataclass(frozen=True)
class RigDefinition:
    """Names, order and semantics of a blendshape rig.

    Attributes:
        name: rig name.
        version: semantic version; written into every label row.
        blendshape_names: (K,) names in rig order.
        eye_following: names of the shapes driven by gaze, not regressed.
        gaze_theta_max: gaze angle (radians) at which an eye-following shape reaches 1.
        antagonistic_pairs: pairs that should not be active together.
        at_most: pairs (a, b) with the constraint b_a <= b_b (e.g. mouthClose <= jawOpen).
        prompts: the phone-capture prompts in capture order.
    """

    name: str
    version: str
    blendshape_names: tuple[str, ...]
    eye_following: tuple[str, ...]
    gaze_theta_max: float
    antagonistic_pairs: tuple[tuple[str, str], ...]
    at_most: tuple[tuple[str, str], ...]
    prompts: tuple[Prompt, ...]

    def __post_init__(self) -> None:
        known = set(self.blendshape_names)
        if len(known) != len(self.blendshape_names):
            raise ModelError(f"rig {self.name}: duplicate blendshape names")
        used = set(self.eye_following)
        used |= {n for pair in self.antagonistic_pairs + self.at_most for n in pair}
        used |= {n for p in self.prompts for n in p.art_prior}
        unknown = sorted(used - known)
        if unknown:
            raise ModelError(f"rig {self.name}: unknown blendshape names {unknown}")
        for p in self.prompts:
            bad = {k: v for k, v in p.art_prior.items() if not 0.0 < v <= 1.0}
            if bad:
                raise ModelError(f"rig {self.name}: prompt {p.name} has priors outside (0, 1]: {bad}")

    @property
    def size(self) -> int:
        return len(self.blendshape_names)

    @property
    def regressed(self) -> tuple[str, ...]:
        """Names of the shapes a labeller regresses from images (not eye-following)."""
        return tuple(n for n in self.blendshape_names if n not in self.eye_following)

    def index(self, name: str) -> int:
        return self.blendshape_names.index(name)

    def indices(self, names: tuple[str, ...] | list[str]) -> np.ndarray:
        return np.array([self.blendshape_names.index(n) for n in names], dtype=np.int64)

    def prompt(self, name: str) -> Prompt:
        for p in self.prompts:
            if p.name == name:
                return p
        raise ModelError(f"rig {self.name}: no prompt named {name!r}")

    def art_prior_vector(self, prompt: str) -> np.ndarray:
        """(K,) float32 art prior of a prompt in rig order (0 where unset)."""
        vec = np.zeros(self.size, np.float32)
        for name, value in self.prompt(prompt).art_prior.items():
            vec[self.index(name)] = value
        return vec

    def art_priors(self) -> dict[str, dict[str, float]]:
        return {p.name: dict(p.art_prior) for p in self.prompts}

    def eye_following_from_gaze(self, gaze: np.ndarray) -> np.ndarray:
        """Eye-following activations from gaze, SPEC §3 (convention).

        ``lookUp = clip(pitch / theta_max, 0, 1)``, likewise down, in and out. Yaw > 0
        turns an eye toward +x (the subject's left): out for the left eye, in for the right.

        Args:
            gaze: (..., 4) [left yaw, left pitch, right yaw, right pitch] radians.

        Returns:
            (..., 8) activations in the order of ``eye_following``.
        """
        g = np.asarray(gaze, np.float64) / self.gaze_theta_max
        drive = [sign * g[..., axis] for axis, sign in self._gaze_drives()]
        if not drive:
            return np.zeros(g.shape[:-1] + (0,))
        return np.clip(np.stack(drive, -1), 0.0, 1.0)

    def _gaze_drives(self) -> list[tuple[int, int]]:
        """(gaze column, sign) of each eye-following shape, in ``eye_following`` order."""
        missing = [n for n in self.eye_following if n not in GAZE_DRIVES]
        if missing:
            raise ModelError(f"rig {self.name}: no gaze convention for {missing}")
        return [GAZE_DRIVES[n] for n in self.eye_following]

    def gaze_from_eye_following(self, activations: np.ndarray) -> np.ndarray:
        """Gaze that :meth:`eye_following_from_gaze` maps back to the given activations.

        Per eye, pitch = (up - down) * theta_max and yaw = (out - in) * theta_max for the
        left eye, (in - out) * theta_max for the right. Exact inverse where each eye's
        opposite shapes are not both active (e.g. an art prior's look prompt).

        Args:
            activations: (..., 8) eye-following activations in the order of
                ``eye_following``.

        Returns:
            (..., 4) [left yaw, left pitch, right yaw, right pitch] radians.
        """
        a = np.asarray(activations, np.float64)
        if a.shape[-1:] != (len(self.eye_following),):
            raise ModelError(f"rig {self.name}: need (..., {len(self.eye_following)}) activations, got {a.shape}")
        gaze = np.zeros(a.shape[:-1] + (4,))
        for k, (axis, sign) in enumerate(self._gaze_drives()):
            gaze[..., axis] += sign * a[..., k]
        return gaze * self.gaze_theta_max


def load_rig_definition(path: str | Path) -> RigDefinition:
    """Reads a rig definition JSON. Raises ModelError naming the file on any problem."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        constraints = raw.get("constraints", {})
        return RigDefinition(
            name=str(raw["name"]),
            version=str(raw["version"]),
            blendshape_names=tuple(raw["blendshapes"]),
            eye_following=tuple(raw.get("eye_following", ())),
            gaze_theta_max=float(np.deg2rad(raw.get("gaze_theta_max_deg", 30.0))),
            antagonistic_pairs=tuple(tuple(p) for p in constraints.get("antagonistic_pairs", ())),
            at_most=tuple(tuple(p) for p in constraints.get("at_most", ())),
            prompts=tuple(
                Prompt(p["name"], p.get("description", ""), {k: float(v) for k, v in p["art_prior"].items()})
                for p in raw.get("prompts", ())
            ),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: invalid rig definition: {exc!r}") from exc
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from exc


@lru_cache(maxsize=1)
def load_default_rig_definition() -> RigDefinition:
    """The embedded ICT/ARKit 53-shape rig definition."""
    return load_rig_definition(DEFAULT_DEFINITION)
