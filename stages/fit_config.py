"""The fit stage's config section (``fit``), kept free of torch so that importing the chain
(and its config) stays light: the solver modules import torch only when a fit runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.config import check_fields, path_field
from pipeline.errors import ConfigError

#: Robust kernels of the scan and landmark terms.
DistanceLoss = Literal["geman_mcclure", "huber", "l2"]
#: Inner solvers.
Solver = Literal["gauss_newton", "lbfgs"]

@dataclass(frozen=True)
class FitConfig:
    """Joint morphable-model fit of all expressions of a subject (issue 7 step 3)."""

    neutral_expression: str = "neutral"
    """The prompt fitted as the subject's neutral; missing or rejected is fatal."""
    min_expressions: int = 1
    """Fewer usable (fused) expressions than this is fatal, with the missing prompts named. >= 1."""
    landmark_init: bool = True
    """Initialise each scan's head pose by PnP of the mean model's landmarks in the reference
    frame; False (ablation) starts from the template centred on the scan, facing the camera."""
    distance_loss: DistanceLoss = "geman_mcclure"
    """Robust kernel of the scan term (and of the landmark term); "l2" is the ablation."""
    scan_sigma_mm: float = 1.0
    """Final scale of the scan kernel, mm (Geman-McClure: residuals well above it stop pulling). > 0."""
    landmark_sigma_mm: float = 4.0
    """Scale of the landmark kernel, mm at the landmark's depth (MediaPipe sits ~3-4 mm off the
    embedding). > 0."""
    landmark_weight: float = 0.1
    """Weight of the landmark term relative to the scan term (a guide, not the main term). >= 0."""
    identity_prior: float = 1e-4
    """lambda of |identity|^2 (coefficients ~ N(0, 1)). >= 0."""
    expression_prior: float = 1e-3
    """lambda of |weights - art prior|^2 per scan. >= 0."""
    articulation_prior: float = 1e-2
    """lambda of |articulation|^2 per scan. >= 0."""
    max_distance_mm: float = 20.0
    """Correspondence distance of the first outer iteration, mm. > 0."""
    min_distance_mm: float = 3.0
    """Correspondence distance of the last outer iteration, mm. in (0, max_distance_mm]."""
    max_normal_angle_deg: float = 60.0
    """Pairs whose model and scan normals differ by more than this are dropped, degrees. in (0, 180]."""
    rigid_iterations: int = 2
    """Outer iterations of the rigid stage (poses only). >= 0."""
    outer_iterations: int = 5
    """Outer iterations of the joint stage (correspondences re-found each time). >= 1."""
    solver: Solver = "gauss_newton"
    """Inner solver of each outer iteration: Levenberg-Marquardt Gauss-Newton (IRLS for the
    kernel, Schur complement on the shared identity) or L-BFGS-B on autograd gradients."""
    gn_steps: int = 2
    """Gauss-Newton steps per outer iteration. >= 1."""
    lbfgs_steps: int = 40
    """L-BFGS-B iterations per outer iteration. >= 1."""
    lbfgs_memory: int = 20
    """Correction pairs L-BFGS-B keeps (its Hessian approximation's rank). >= 1."""
    scan_vertices: int = 3000
    """The scan term uses this fixed random sample of the fitting vertices (0 = all); the
    model normals use all of them, the reported residuals all scan points. >= 0."""
    max_scan_median_mm: float = 1.0
    """A fitted expression whose median scan-to-model distance exceeds this is rejected, mm
    (fitted scans measure 0.13-0.16 mm on the tiny subject; a scan blown up 25 %, 2.9). > 0."""
    flame_model: str = path_field(kind="file")
    """Converted FLAME ``.npz`` (``python -m rigs.flame``, docs/flame.md): the fit then uses
    FLAME's spaces and skinning, and the refine stage registers the rig onto its meshes;
    "" = the embedded ICT model. Its bytes enter the cache key."""
    flame_landmarks: str = path_field(kind="file")
    """FLAME's ``mediapipe_landmark_embedding.npz`` (or this product's format) for
    ``flame_model``; "" = no landmark term. Needs ``flame_model``."""
    landmark_embedding: str = path_field(kind="file")
    """A calibrated MediaPipe embedding for the ICT model (``mediapipe478_triangle`` /
    ``_barycentric``, written by ``python -m workflows.calibrate_embedding``): the landmark
    term and the PnP start read the landmarks where the detector puts them instead of
    the template's definition (2-3 mm apart, the same for every subject); "" = the
    model's own embedding. Not with ``flame_model``. Its bytes enter the cache key."""

    def __post_init__(self) -> None:
        check_fields(self)
        rules = (
            ("neutral_expression", bool(self.neutral_expression), "a prompt name"),
            ("min_expressions", self.min_expressions >= 1, ">= 1"),
            ("scan_sigma_mm", self.scan_sigma_mm > 0, "> 0"),
            ("landmark_sigma_mm", self.landmark_sigma_mm > 0, "> 0"),
            ("landmark_weight", self.landmark_weight >= 0, ">= 0"),
            ("identity_prior", self.identity_prior >= 0, ">= 0"),
            ("expression_prior", self.expression_prior >= 0, ">= 0"),
            ("articulation_prior", self.articulation_prior >= 0, ">= 0"),
            ("max_distance_mm", self.max_distance_mm > 0, "> 0"),
            ("min_distance_mm", 0 < self.min_distance_mm <= self.max_distance_mm, "in (0, max_distance_mm]"),
            ("max_normal_angle_deg", 0 < self.max_normal_angle_deg <= 180, "in (0, 180]"),
            ("rigid_iterations", self.rigid_iterations >= 0, ">= 0"),
            ("outer_iterations", self.outer_iterations >= 1, ">= 1"),
            ("gn_steps", self.gn_steps >= 1, ">= 1"),
            ("lbfgs_steps", self.lbfgs_steps >= 1, ">= 1"),
            ("lbfgs_memory", self.lbfgs_memory >= 1, ">= 1"),
            ("scan_vertices", self.scan_vertices >= 0, ">= 0"),
            ("max_scan_median_mm", self.max_scan_median_mm > 0, "> 0"),
            ("flame_landmarks", not self.flame_landmarks or bool(self.flame_model), "set only with fit.flame_model"),
            ("landmark_embedding", not (self.landmark_embedding and self.flame_model), "unset with fit.flame_model"),
        )
        for name, ok, rule in rules:
            if not ok:
                raise ConfigError(f"fit.{name} must be {rule}, got {getattr(self, name)!r}")

    def distances_m(self, n: int) -> np.ndarray:
        """(n,) correspondence distances of n outer iterations, metres, decreasing."""
        return np.geomspace(self.max_distance_mm, self.min_distance_mm, n) * 1e-3
