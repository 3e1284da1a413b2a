"""Laplacian non-rigid refinement of the fitted meshes toward their fused scans (issue 7 step 3).

The joint fit (``stages/fit.py``) explains each expression's scan with the face model's
identity and expression spaces; whatever those spaces cannot hold (a subject's own bumps,
rig gains that differ from the generic shapes) is left as a scan-to-mesh residual. This
stage moves each fitted mesh toward its scan with a regularised Laplacian deformation of
the template (:mod:`rigs.deform`), keeping the template's topology:

* the scan is moved into the head frame with ``inv(scan_from_head)``;
* only the skin's fitting region (``model.fitting_vertices``) takes scan correspondences;
  the skin, neck and the mouth and eye sockets move with it (:data:`DEFORMABLE_PARTS`),
  and every other part (eyeballs, teeth, gums and tongue) keeps its fitted position
  exactly;
* scan points seen through the fitted mesh's mouth or eye openings (the Poisson membrane
  across an open mouth, the eyeballs) are never targets, so lips are neither dragged
  onto the membrane nor welded together.

Rejections are data: an expression the fit rejected, one without a fused scan, or one
with too few scan correspondences is a record with a reason (:attr:`RefinedSubject.rejected`
and the ``rows`` table). The method, config and measured accuracy are in docs/refine.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from pipeline.config import check_fields, config_section
from pipeline.errors import ConfigError, StageError
from rigs.deform import (
    DeformResult,
    LaplacianSystem,
    ScanTargets,
    deform_to_scan,
    opening_loops,
    opening_mask,
)
from rigs.face_model import FaceModel, load_ict_face_model
from rigs.geometry import ClosestPoints

#: Parts that follow the scan (directly or through the regulariser); all others are rigid.
DEFORMABLE_PARTS = ("face", "head_neck", "mouth_socket", "eye_socket_left", "eye_socket_right")
#: Parts whose borders with the skin are openings (mouth, eyes).
OPENING_PARTS = ("mouth_socket", "eye_socket_left", "eye_socket_right")
#: Weight of a data vertex's target; the other weights are relative to it.
DATA_WEIGHT = 1.0
#: The scan-to-mesh medians use at most this many scan points (an even stride): on the
#: tiny subject the median of 5,000 points is within 0.003 mm of all ~40,000.
METRIC_POINTS = 5000
#: Parts left out of the scan-to-mesh search: inside the mouth, never the face region's
#: nearest surface for a scan point outside the openings, and 30 % of the triangles.
METRIC_SKIPPED_PARTS = ("teeth", "gums_tongue")


@dataclass(frozen=True)
class RefineConfig:
    """Laplacian refinement of each fitted expression toward its fused scan (issue 7 step 3)."""

    iterations: int = 3
    """Correspondence-and-solve rounds; stiffness and distance go from their max to their
    min geometrically. >= 1."""
    stiffness_max: float = 1000.0
    """First round's weight of |L (x - x_fit)|^2 (graph Laplacian) relative to the data
    term's; large = smooth, small displacement. > 0."""
    stiffness_min: float = 30.0
    """Last round's Laplacian weight; lower keeps smaller detail (100 passes bumps of 8 mm
    radius on the ICT face's ~3 mm edges). In (0, stiffness_max]."""
    anchor_weight: float = 1e-3
    """Weight of |x - x_fit|^2 on every deformable vertex, relative to the data term's; keeps
    regions without data where the fit put them. > 0."""
    max_distance_mm: float = 10.0
    """First round's largest vertex-to-scan correspondence distance, mm. > 0."""
    min_distance_mm: float = 3.0
    """Last round's largest correspondence distance, mm. In (0, max_distance_mm]."""
    max_normal_angle_deg: float = 30.0
    """A correspondence is used only when the vertex's and the scan point's normals are
    within this angle, degrees; in (0, 90]."""
    opening_margin_mm: float = 1.0
    """Scan points inside the fitted mouth or eye opening (seen along the head's z axis),
    farther than this from its rim, are never targets, mm. >= 0."""
    respect_openings: bool = True
    """Leave out scan points seen through the openings (False only for ablations: the
    lips may then be pulled onto the Poisson membrane across an open mouth)."""
    min_matched_fraction: float = 0.25
    """An expression whose fitting-region vertices have a scan correspondence for less
    than this fraction (last round) is rejected; in [0, 1]."""

    def __post_init__(self) -> None:
        check_fields(self)
        rules = (
            ("iterations", self.iterations >= 1, ">= 1"),
            ("stiffness_max", self.stiffness_max > 0, "> 0"),
            ("stiffness_min", 0 < self.stiffness_min <= self.stiffness_max, "in (0, stiffness_max]"),
            ("anchor_weight", self.anchor_weight > 0, "> 0"),
            ("max_distance_mm", self.max_distance_mm > 0, "> 0"),
            ("min_distance_mm", 0 < self.min_distance_mm <= self.max_distance_mm, "in (0, max_distance_mm]"),
            ("max_normal_angle_deg", 0 < self.max_normal_angle_deg <= 90, "in (0, 90]"),
            ("opening_margin_mm", self.opening_margin_mm >= 0, ">= 0"),
            ("min_matched_fraction", 0.0 <= self.min_matched_fraction <= 1.0, "in [0, 1]"),
        )
        for name, ok, rule in rules:
            if not ok:
                raise ConfigError(f"refine.{name} must be {rule}, got {getattr(self, name)}")

    @property
    def stiffness(self) -> np.ndarray:
        """(iterations,) Laplacian weights, decreasing."""
        return np.geomspace(self.stiffness_max, self.stiffness_min, self.iterations)

    @property
    def distances_m(self) -> np.ndarray:
        """(iterations,) correspondence distances, metres, decreasing."""
        return np.geomspace(self.max_distance_mm, self.min_distance_mm, self.iterations) * 1e-3


# ------------------------------------------------------------------------- the fit input


@dataclass(frozen=True, eq=False)
class FitInput:
    """The parts of the fit stage's ``FittedSubject`` artifact this stage reads.

    Attributes:
        subject_id: the subject.
        expressions: fitted expressions, capture order.
        rejected: expression -> the fit's reason for not fitting it.
        neutral_expression: the prompt used as neutral.
        vertices: expression -> (n, 3) float32 fitted mesh, head frame, metres.
        scan_from_head: expression -> (4, 4) float64 ``x_refcam = R x_head + t``.
        identity_neutral: (n, 3) float32 identity-only mesh, or None when absent.
    """

    subject_id: str
    expressions: tuple[str, ...]
    rejected: dict[str, str]
    neutral_expression: str
    vertices: dict[str, np.ndarray]
    scan_from_head: dict[str, np.ndarray]
    identity_neutral: np.ndarray | None = None

    @classmethod
    def from_output(cls, output: Any) -> FitInput:
        """Reads the contract keys of a ``FittedSubject.to_output()``.

        Raises:
            StageError: a key is missing or an array has the wrong shape.
        """
        meta, arrays = output.meta, output.arrays
        missing = {"subject_id", "expressions", "rejected", "neutral_expression"} - set(meta)
        for e in meta.get("expressions", []):
            missing |= {f"{e}.vertices", f"{e}.scan_from_head"} - set(arrays)
        if missing:
            raise StageError(f"fit output lacks {', '.join(sorted(missing))}")
        expressions = tuple(str(e) for e in meta["expressions"])
        verts = {e: np.asarray(arrays[f"{e}.vertices"], np.float32) for e in expressions}
        poses = {e: np.asarray(arrays[f"{e}.scan_from_head"], np.float64) for e in expressions}
        for e in expressions:
            if verts[e].ndim != 2 or verts[e].shape[1] != 3 or poses[e].shape != (4, 4):
                raise StageError(f"fit output {e!r}: vertices must be (n, 3) and scan_from_head (4, 4), "
                                 f"got {verts[e].shape}, {poses[e].shape}")
        neutral = arrays.get("neutral")
        return cls(str(meta["subject_id"]), expressions, {str(k): str(v) for k, v in meta["rejected"].items()},
                   str(meta["neutral_expression"]), verts, poses,
                   None if neutral is None else np.asarray(neutral, np.float32))


# ------------------------------------------------------------------------------ output


@dataclass(frozen=True, eq=False)
class RefinedExpression:
    """One expression's refined mesh.

    Attributes:
        vertices: (n, 3) float32 refined mesh, head frame, metres.
        scan_from_head: (4, 4) float64, copied from the fit.
        displacement_mm: (n,) float32 |refined - fitted|, mm.
        fit_median_mm: scan-to-mesh median distance of the fitted mesh (face region), mm.
        refined_median_mm: the same for the refined mesh, mm.
        matched_fraction: fitting-region vertices with a scan correspondence (last round).
    """

    vertices: np.ndarray
    scan_from_head: np.ndarray
    displacement_mm: np.ndarray
    fit_median_mm: float
    refined_median_mm: float
    matched_fraction: float


#: Columns of the ``rows`` table, with their Arrow types.
ROW_COLUMNS = (("subject_id", "string"), ("expression", "string"), ("status", "string"),
               ("reason", "string"), ("fit_median_mm", "float64"), ("refined_median_mm", "float64"),
               ("matched_fraction", "float64"), ("displacement_p90_mm", "float64"))


@dataclass(frozen=True, eq=False)
class RefinedSubject:
    """Every expression of one subject, refined (the ``refine`` stage's artifact).

    Attributes:
        subject_id: the subject.
        neutral_expression: the prompt used as neutral.
        neutral: (n, 3) float32 the refined mesh of the neutral expression, head frame; when
            that expression was not refined, the fit's mesh of it (or the fit's
            identity-only mesh), as ``neutral_source`` says.
        neutral_source: ``"refined"``, ``"fit"`` or ``"identity"``.
        refined: expression -> its :class:`RefinedExpression`, capture order.
        rejected: expression -> why it was not refined.
        order: every expression (refined and rejected), capture order.
    """

    subject_id: str
    neutral_expression: str
    neutral: np.ndarray
    neutral_source: str
    refined: dict[str, RefinedExpression]
    rejected: dict[str, str]
    order: tuple[str, ...]

    @property
    def expressions(self) -> list[str]:
        """Refined expressions, capture order."""
        return [e for e in self.order if e in self.refined]

    def rows(self) -> Any:
        """One record per expression: ``refined`` or ``rejected`` with its reason."""
        import pyarrow as pa

        cols: dict[str, list] = {name: [] for name, _ in ROW_COLUMNS}
        for e in self.order:
            r = self.refined.get(e)
            values = {
                "subject_id": self.subject_id, "expression": e,
                "status": "refined" if r else "rejected", "reason": self.rejected.get(e, ""),
                "fit_median_mm": r.fit_median_mm if r else float("nan"),
                "refined_median_mm": r.refined_median_mm if r else float("nan"),
                "matched_fraction": r.matched_fraction if r else float("nan"),
                "displacement_p90_mm": float(np.percentile(r.displacement_mm, 90)) if r else float("nan"),
            }
            for name, value in values.items():
                cols[name].append(value)
        return pa.table(cols, schema=pa.schema([(n, getattr(pa, t)()) for n, t in ROW_COLUMNS]))

    def to_output(self) -> Any:
        """A :class:`pipeline.serialize.StageOutput` with the contract's keys (docs/refine.md)."""
        from pipeline.serialize import StageOutput

        arrays: dict[str, np.ndarray] = {"neutral": np.asarray(self.neutral, np.float32)}
        for e, r in self.refined.items():
            arrays[f"{e}.vertices"] = np.asarray(r.vertices, np.float32)
            arrays[f"{e}.scan_from_head"] = np.asarray(r.scan_from_head, np.float64)
            arrays[f"{e}.displacement_mm"] = np.asarray(r.displacement_mm, np.float32)
        meta = {
            "subject_id": self.subject_id, "expressions": self.expressions, "rejected": dict(self.rejected),
            "neutral_expression": self.neutral_expression, "neutral_source": self.neutral_source,
            "order": list(self.order),
            "scores": {e: [r.fit_median_mm, r.refined_median_mm, r.matched_fraction] for e, r in self.refined.items()},
        }
        return StageOutput(arrays=arrays, meta=meta, tables={"rows": self.rows()})

    @classmethod
    def from_output(cls, output: Any) -> RefinedSubject:
        """Inverse of :meth:`to_output`.

        Raises:
            StageError: a part is missing.
        """
        meta, arrays = output.meta, output.arrays
        need = {"subject_id", "expressions", "rejected", "neutral_expression", "neutral_source", "order", "scores"}
        missing = (need - set(meta)) | ({"neutral"} - set(arrays))
        for e in meta.get("expressions", []):
            missing |= {f"{e}.{k}" for k in ("vertices", "scan_from_head", "displacement_mm")} - set(arrays)
        if missing:
            raise StageError(f"refine output lacks {', '.join(sorted(missing))}")
        refined = {}
        for e in meta["expressions"]:
            fit_mm, ref_mm, matched = (float(v) for v in meta["scores"][e])
            refined[e] = RefinedExpression(
                np.asarray(arrays[f"{e}.vertices"]), np.asarray(arrays[f"{e}.scan_from_head"]),
                np.asarray(arrays[f"{e}.displacement_mm"]), fit_mm, ref_mm, matched)
        return cls(str(meta["subject_id"]), str(meta["neutral_expression"]), np.asarray(arrays["neutral"]),
                   str(meta["neutral_source"]), refined, {str(k): str(v) for k, v in meta["rejected"].items()},
                   tuple(str(e) for e in meta["order"]))


# ------------------------------------------------------------------------ pure functions


@lru_cache(maxsize=4)
def refinement_system(model: FaceModel, anchor_weight: float) -> LaplacianSystem:
    """The factorised system of a face model (cached: every subject shares it)."""
    return LaplacianSystem(model.n_vertices, model.triangles, model.part_vertices(*DEFORMABLE_PARTS),
                           model.fitting_vertices, DATA_WEIGHT, anchor_weight)


@lru_cache(maxsize=4)
def _metric_triangles(model: FaceModel) -> tuple[np.ndarray, np.ndarray]:
    """(searched triangles (s, 3), (s,) bool: every corner in the fitting region)."""
    inside = np.zeros(model.n_vertices, bool)
    inside[model.fitting_vertices] = True
    skipped = [p for p in METRIC_SKIPPED_PARTS if p in model.part_names]
    keep = ~np.isin(model.triangles, model.part_vertices(*skipped)).any(1)
    tri = model.triangles[keep]
    return tri, inside[tri].all(1)


@lru_cache(maxsize=4)
def _openings(model: FaceModel) -> dict[str, np.ndarray]:
    """The model's mouth and eye opening loops (cached per model)."""
    return opening_loops(model.triangles, model.vertex_part, model.part_names, "face", OPENING_PARTS)


def scan_to_mesh_mm(vertices: np.ndarray, model: FaceModel, points: np.ndarray) -> float:
    """Median distance from scan points to the mesh's face region, mm.

    Each point's closest point on the mesh (teeth and gums left out) is found; points
    whose closest triangle lies outside the fitting region (hair, neck, eyeballs) are not
    counted. At most
    :data:`METRIC_POINTS` points, an even stride through them, are used.

    Args:
        vertices: (n, 3) mesh vertices, head frame, metres.
        model: the face model (topology and region).
        points: (p, 3) scan points, head frame, metres.

    Returns:
        The median in mm; NaN when no point lands on the region.
    """
    if len(points) == 0:
        return float("nan")
    points = points[:: -(-len(points) // METRIC_POINTS)]
    triangles, in_region = _metric_triangles(model)
    _, dist, tri, _ = ClosestPoints(vertices, triangles).query(points)
    on_region = in_region[tri]
    return float(np.median(dist[on_region]) * 1e3) if on_region.any() else float("nan")


def refine_expression(
    fitted: np.ndarray,
    scan_vertices: np.ndarray,
    scan_triangles: np.ndarray,
    scan_from_head: np.ndarray,
    model: FaceModel,
    cfg: RefineConfig = RefineConfig(),
) -> tuple[DeformResult, ScanTargets]:
    """Refines one fitted mesh toward its fused scan.

    Args:
        fitted: (n, 3) fitted mesh, head frame, metres.
        scan_vertices: (V, 3) fused scan vertices in its reference camera frame, metres.
        scan_triangles: (F, 3) scan triangles.
        scan_from_head: (4, 4) rigid ``x_cam = R x_head + t``.
        model: the face model (topology, parts, fitting region).
        cfg: the refine config.

    Returns:
        (the deformation's result, the scan's usable points in the head frame).

    Raises:
        StageError: malformed arrays or a non-rigid ``scan_from_head``.
    """
    x_fit = np.asarray(fitted, np.float64)
    if x_fit.shape != (model.n_vertices, 3):
        raise StageError(f"fitted mesh must be ({model.n_vertices}, 3) for {model.name}, got {x_fit.shape}")
    pose = np.asarray(scan_from_head, np.float64)
    rot = pose[:3, :3] if pose.shape == (4, 4) else np.full((3, 3), np.nan)
    if not np.isfinite(pose).all() or not np.allclose(rot.T @ rot, np.eye(3), atol=1e-6) or np.linalg.det(rot) < 0:
        raise StageError("scan_from_head must be a finite (4, 4) rigid transform")
    head_from_scan = np.linalg.inv(pose)
    sv = np.asarray(scan_vertices, np.float64) @ head_from_scan[:3, :3].T + head_from_scan[:3, 3]
    excluded = None
    if cfg.respect_openings:
        excluded = opening_mask(sv, x_fit, _openings(model), cfg.opening_margin_mm * 1e-3)
    scan = ScanTargets.build(sv, scan_triangles, head_from_scan[:3, 3], excluded)
    result = deform_to_scan(refinement_system(model, cfg.anchor_weight), x_fit, scan,
                            stiffness=cfg.stiffness, max_distance=cfg.distances_m,
                            max_angle_deg=cfg.max_normal_angle_deg)
    return result, scan


# ----------------------------------------------------------------------------- the stage


def refine_subject(fit: FitInput, fused: Any, cfg: RefineConfig, model: FaceModel | None = None,
                   order: tuple[str, ...] | None = None) -> RefinedSubject:
    """Refines every fitted expression of a subject toward its fused scan.

    Args:
        fit: the fit artifact's contract keys.
        fused: the fusion stage's :class:`stages.fusion.FusedScans`.
        cfg: the refine section.
        model: the face model of the fit (the embedded ICT model by default).
        order: every expression in capture order (fitted and rejected); the fit's
            expressions then its rejected ones by default.

    Raises:
        StageError: the fit's meshes do not match the model, or the subjects differ.
    """
    model = model or load_ict_face_model()
    if fused.subject_id != fit.subject_id:
        raise StageError(f"fit is of subject {fit.subject_id!r}, fusion of {fused.subject_id!r}")
    order = order or fit.expressions + tuple(e for e in fit.rejected if e not in fit.expressions)
    refined: dict[str, RefinedExpression] = {}
    rejected: dict[str, str] = {}
    for e in order:
        scan = fused.expressions.get(e)
        if e not in fit.expressions:
            rejected[e] = f"not fitted: {fit.rejected.get(e, 'absent from the fit')}"
        elif scan is None or not scan.ok:
            rejected[e] = f"no fused scan: {scan.reason if scan is not None else 'absent from the fusion'}"
        else:
            r, why = _refine_one(fit.vertices[e], scan, fit.scan_from_head[e], model, cfg)
            if r is None:
                rejected[e] = why
            else:
                refined[e] = r
    ne = fit.neutral_expression
    if ne in refined:
        neutral, source = refined[ne].vertices, "refined"
    elif ne in fit.vertices:
        neutral, source = fit.vertices[ne], "fit"
    elif fit.identity_neutral is not None:
        neutral, source = fit.identity_neutral, "identity"
    else:
        raise StageError(f"no neutral: {ne!r} was neither refined nor fitted, and the fit has no identity mesh")
    return RefinedSubject(fit.subject_id, ne, np.asarray(neutral, np.float32), source, refined, rejected, tuple(order))


def _refine_one(fitted: np.ndarray, scan: Any, pose: np.ndarray, model: FaceModel,
                cfg: RefineConfig) -> tuple[RefinedExpression | None, str]:
    """(refined expression, "") or (None, the reason it was rejected)."""
    result, targets = refine_expression(fitted, scan.vertices, scan.triangles, pose, model, cfg)
    matched = float(result.accepted.mean())
    if matched < cfg.min_matched_fraction:
        return None, (f"too few scan correspondences: {matched:.1%} of the face region "
                      f"< min_matched_fraction={cfg.min_matched_fraction:.1%}")
    fit_mm = scan_to_mesh_mm(fitted, model, targets.points)
    ref_mm = scan_to_mesh_mm(result.vertices, model, targets.points)
    if not ref_mm <= fit_mm:  # NaN fails too
        return None, (f"refinement moved away from the scan: scan-to-mesh median {ref_mm:.3f} mm "
                      f"> fit's {fit_mm:.3f} mm")
    verts = result.vertices.astype(np.float32)
    disp = (np.linalg.norm(verts.astype(np.float64) - np.asarray(fitted, np.float64), axis=1) * 1e3).astype(np.float32)
    return RefinedExpression(verts, np.asarray(pose, np.float64), disp, fit_mm, ref_mm, matched), ""


def refine_capture(capture: Any, fusion: Any, fit: Any, config: Any = None) -> Any:
    """Stage ``refine``: each fitted expression refined toward its fused scan.

    Args:
        capture: the capture folder (the engine's ``"capture"`` input) or an opened Capture;
            it gives the expressions' capture order.
        fusion: the ``fusion`` stage's loaded artifact.
        fit: the ``fit`` stage's loaded artifact (a ``FittedSubject.to_output()``).
        config: the engine's config view declaring ``refine``, or a :class:`RefineConfig`.

    Returns:
        ``RefinedSubject.to_output()``.
    """

    from stages.flame_mode import needs_registration, register_rig
    from stages.fusion import FusedScans
    from storage.capture import Capture

    cap = Capture.of(capture)
    fitted = FitInput.from_output(fit)
    cfg = config_section(config, "refine", RefineConfig)
    n_fit = len(next(iter(fitted.vertices.values()))) if fitted.vertices else None
    if needs_registration(fit, n_fit, load_ict_face_model()):  # FLAME mode: the rig onto FLAME's meshes
        fitted = register_rig(fit, fitted, load_ict_face_model(), cfg)
    known = set(fitted.expressions) | set(fitted.rejected)
    order = tuple(e for e in cap.phone_expressions if e in known)
    order += tuple(e for e in fitted.expressions + tuple(fitted.rejected) if e not in order)
    return refine_subject(fitted, FusedScans.from_output(fusion), cfg, order=order).to_output()
