"""Placement search: the pose of one camera that maximises a weighted placement score.

The feasible set, in the headset frame: the camera centre inside a box around its
starting position (half-widths ``box_mm``), its optical axis inside a cone of half-angle
``cone_deg`` around the starting axis. Five unknowns in [-1, 1]: the box offset
(x, y, z) / half-width, and (a, b), the axis turned by ``cone_deg * min(1, |(a, b)|)``
about the camera-frame axis (b, a, 0): (a, b) = (1, 0) turns it toward image right, (0, 1)
toward image up, and every point of the square maps inside the cone. The objective, maximised over a
fixed population with scipy's bounded Nelder-Mead (derivative-free):

    score = sum_r w_r V_occ(r) + motion_weight * sum_r w_r M(r)      (weights sum to 1)

with V_occ and M the population means of :mod:`stages.placement.scoring`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import check_fields
from pipeline.errors import ConfigError
from rigs.camera import Camera
from stages.placement.population import Population
from stages.placement.rigfile import rotation_about
from stages.placement.scoring import Mesh, ScoreConfig, score_cameras


@dataclass(frozen=True)
class SearchConfig:
    """What the placement search may change and what it maximises."""

    box_mm: float = 10.0
    """Half-width of the feasible box of camera centres on each headset axis, mm (>= 0)."""
    cone_deg: float = 15.0
    """Half-angle of the feasible cone of optical axes around the start's, degrees (>= 0)."""
    motion_weight: float = 0.02
    """Weight of M (pixels) against V (0..1) in the score, per pixel (>= 0)."""
    max_evaluations: int = 60
    """Most objective evaluations (>= 6, one per simplex corner at least)."""
    initial_step: float = 0.5
    """Size of the first simplex, as a fraction of the feasible half-ranges, in (0, 1]."""
    weights: Mapping[str, float] = field(default_factory=dict)
    """Region -> weight (>= 0, not all 0); empty = the camera's target regions, equally."""

    def __post_init__(self) -> None:
        check_fields(self)
        if min(self.box_mm, self.cone_deg, self.motion_weight) < 0 or self.max_evaluations < 6:
            raise ConfigError("SearchConfig: box_mm, cone_deg, motion_weight >= 0 and max_evaluations >= 6")
        if not 0 < self.initial_step <= 1:
            raise ConfigError(f"SearchConfig.initial_step must be in (0, 1], got {self.initial_step}")
        if self.weights and (min(self.weights.values()) < 0 or sum(self.weights.values()) <= 0):
            raise ConfigError("SearchConfig.weights must be >= 0 and not all 0")


@dataclass(frozen=True)
class SearchResult:
    """Where the search ended.

    Attributes:
        start: the starting camera.
        best: the best camera found.
        start_score: objective of the start.
        best_score: objective of the best camera.
        evaluations: objective evaluations used.
        offset_mm: (3,) best centre minus start centre, headset frame, mm.
        turn_deg: angle between the best and the start optical axes, degrees.
        history: (evaluations,) objective values in evaluation order.
    """

    start: Camera
    best: Camera
    start_score: float
    best_score: float
    evaluations: int
    offset_mm: np.ndarray
    turn_deg: float
    history: np.ndarray


def candidate(start: Camera, x: np.ndarray, config: SearchConfig) -> Camera:
    """The camera at normalised parameters x (5,) in [-1, 1] (module docstring)."""
    x = np.clip(np.asarray(x, float), -1.0, 1.0)
    position = start.t_world_from_camera + 1e-3 * config.box_mm * x[:3]
    a, b = x[3], x[4]
    radius = np.hypot(a, b)
    rotation = start.R_world_from_camera
    if radius > 0 and config.cone_deg > 0:
        turn = np.deg2rad(config.cone_deg) * min(1.0, radius)
        rotation = rotation @ rotation_about(np.array([b, a, 0.0]) / radius, turn)
    return Camera(start.intrinsics, start.distortion, rotation, position, start.model)


def weighted_scores(cameras: Sequence[Camera], population: Population, weights: Mapping[str, float],
                    config: SearchConfig, score_config: ScoreConfig, proxy: Mesh | None = None) -> list[float]:
    """The search objective (module docstring) of each camera, scored in one pass."""
    names = population.regions.names
    w = np.array([weights.get(n, 0.0) for n in names], float)
    w /= w.sum()
    s = score_cameras(cameras, population, score_config, [proxy] * len(cameras))
    return [float(w @ s.v_occluded[c].mean((0, 1)) + config.motion_weight * (w @ s.motion[c].mean((0, 1))))
            for c in range(len(cameras))]


def search_camera(start: Camera, population: Population, weights: Mapping[str, float],
                  config: SearchConfig | None = None, score_config: ScoreConfig | None = None,
                  proxy: Mesh | None = None) -> SearchResult:
    """Maximises the weighted score of one camera over its feasible box and cone.

    Args:
        start: the camera's starting pose (headset frame); also the feasible set's centre.
        population: the faces (pass one built with ``keep_scenes=True``: the same faces
            are ray-cast at every evaluation).
        weights: region -> weight.
    """
    from scipy.optimize import minimize

    config, score_config = config or SearchConfig(), score_config or ScoreConfig()
    unknown = sorted(set(weights) - set(population.regions.names))
    if unknown or not weights:
        raise ConfigError(f"search weights must name regions of {population.regions.names}, got {sorted(weights)}")
    history: list[float] = []

    def negative(x: np.ndarray) -> float:
        history.append(weighted_scores([candidate(start, x, config)], population, weights, config, score_config, proxy)[0])
        return -history[-1]

    simplex = np.vstack([np.zeros(5), config.initial_step * np.eye(5)])
    result = minimize(negative, np.zeros(5), method="Nelder-Mead", bounds=[(-1.0, 1.0)] * 5,
                      options={"initial_simplex": simplex, "maxfev": config.max_evaluations,
                               "xatol": 1e-3, "fatol": 1e-5})
    best = candidate(start, result.x, config)
    axes = start.R_world_from_camera[:, 2] @ best.R_world_from_camera[:, 2]
    return SearchResult(
        start, best, history[0], -float(result.fun), len(history),
        1e3 * (best.t_world_from_camera - start.t_world_from_camera),
        float(np.rad2deg(np.arccos(np.clip(axes, -1.0, 1.0)))), np.array(history),
    )
