"""Accuracy of the phone-scan geometry chain against a synthetic subject's truth.

**Face region.** Every figure here is measured on the face model's ``fitting_vertices``
(ICT: 7,801 of the 9,409 vertices of the ``face`` part: the facial skin from the forehead
to the chin and between the ears; no scalp, neck, ears, mouth or eye sockets, teeth or
eyeballs). On a mesh in another topology (a fused scan) a point counts as on the face
region when its closest point on the true mesh lies on a *face-region triangle*, a
triangle whose three corners are face-region vertices.

Measures (lengths in metres in, millimetres out):

- :func:`fused_scan_error`: fused scan -> true surface distance, scan points whose
  closest true point is on the face region; median, mean, 90th percentile.
- :func:`now_error`: the NoW protocol (:mod:`stages.metrics_geometry`) with the true
  mesh's face-region vertices as the "scan": rigid alignment (landmark Kabsch, then ICP),
  no scale, scan-to-mesh distance to the predicted surface; median, mean, std.
- :func:`vertex_error_rigid` / :func:`vertex_error_as_estimated`: per-vertex distance to
  the true mesh on the face region (same topology), either after a rigid Kabsch alignment
  over the face region (the shape alone; **the benchmark's targets use this one**), or in
  the head frame as estimated: both meshes mapped into the fusion reference camera, the
  estimate by its ``scan_from_head``, the truth by its true ``head_in_camera`` (shape and
  head pose together).
- :func:`refinement_gain`: ``1 - err(refined) / err(fit)``.
- :func:`linear_space_floor`: the per-vertex error left by the best fit inside the
  model's identity and expression spaces: what a fit cannot recover, by construction.

:func:`evaluate_subject` applies them to a subject's fusion / fit / refine artifacts (by
the artifact contract's keys, so this module needs no stage module) and returns records
for the benchmark and the QA report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.errors import StageError
from rigs.geometry import ClosestPoints
from stages.metrics_geometry import NowResult, now_scan_to_mesh
from stages.metrics_gt import per_vertex_error

#: A true vertex is "covered" by a fused scan when a scan vertex lies within this, mm (the
#: scans' vertex spacing is 0.5-1 mm).
COVERED_MM = 1.5

__all__ = [
    "DistanceSummary", "VertexErrorSummary", "coverage_split", "covered_vertices", "evaluate_subject", "face_region",
    "face_region_triangles", "fused_scan_error", "linear_space_floor", "now_error", "place", "refinement_gain",
    "vertex_error_as_estimated", "vertex_error_rigid",
]


def face_region(model: Any) -> np.ndarray:
    """(r,) int64 sorted vertex ids of the face region: the model's ``fitting_vertices``."""
    region = np.unique(np.asarray(model.fitting_vertices, dtype=np.int64))
    if region.size == 0:
        raise StageError(f"face model {model.name} has no fitting_vertices: no face region to measure on")
    return region


def face_region_triangles(triangles: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(m,) bool: triangles whose three corners are all in ``region`` (vertex ids)."""
    triangles, region = np.asarray(triangles), np.asarray(region)
    inside = np.zeros(max(int(triangles.max()), int(region.max(initial=0))) + 1, bool)
    inside[region] = True
    return inside[triangles].all(axis=1)


def place(vertices: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """(n, 3) ``R x + t`` for a (3, 4) or (4, 4) rigid ``pose`` [R | t]."""
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape not in ((3, 4), (4, 4)) or not np.all(np.isfinite(pose[:3])):
        raise StageError(f"pose must be a finite (3, 4) or (4, 4) matrix, got shape {pose.shape}")
    return np.asarray(vertices, dtype=np.float64) @ pose[:3, :3].T + pose[:3, 3]


@dataclass(frozen=True)
class DistanceSummary:
    """Distances of points to a surface.

    Attributes:
        median_mm, mean_mm, p90_mm: median, mean and 90th percentile, mm.
        count: points measured.
    """

    median_mm: float
    mean_mm: float
    p90_mm: float
    count: int

    @classmethod
    def of(cls, distances_m: np.ndarray) -> DistanceSummary:
        mm = np.asarray(distances_m, dtype=np.float64) * 1000.0
        if mm.size == 0:
            raise StageError("no distances to summarise (nothing on the face region)")
        return cls(float(np.median(mm)), float(mm.mean()), float(np.percentile(mm, 90)), int(mm.size))


def fused_scan_error(
    scan_vertices: np.ndarray,
    true_vertices: np.ndarray,
    true_pose: np.ndarray,
    triangles: np.ndarray,
    region_triangles: np.ndarray,
) -> DistanceSummary:
    """Fused scan -> true surface distance on the face region.

    Args:
        scan_vertices: (V, 3) fused mesh vertices, reference camera frame, metres.
        true_vertices: (n, 3) true expression mesh, head frame.
        true_pose: (3, 4) or (4, 4) true reference-camera-from-head.
        triangles: (m, 3) the true mesh's triangles.
        region_triangles: (m,) bool face-region triangles (:func:`face_region_triangles`).

    Returns:
        Distances of the scan vertices whose closest true point is on a face-region triangle.
    """
    scan = np.asarray(scan_vertices, dtype=np.float64)
    if scan.ndim != 2 or scan.shape[1] != 3 or len(scan) == 0:
        raise StageError(f"scan vertices must be (V>0, 3), got {scan.shape}")
    _, dist, tri, _ = ClosestPoints(place(true_vertices, true_pose), np.asarray(triangles)).query(scan)
    return DistanceSummary.of(dist[np.asarray(region_triangles)[tri]])


def now_error(
    vertices: np.ndarray,
    triangles: np.ndarray,
    true_vertices: np.ndarray,
    region: np.ndarray,
    landmarks: np.ndarray,
) -> NowResult:
    """NoW protocol: the true face region as the scan, against the predicted surface.

    Args:
        vertices: (n, 3) predicted mesh, any rigid frame, metres.
        triangles: (m, 3) its triangles (the whole mesh is the predicted surface).
        true_vertices: (n', 3) true mesh; its ``region`` vertices are the reference scan.
        region: face-region vertex ids of the true mesh.
        landmarks: (L, 2) int vertex ids [predicted, true] of L >= 3 landmarks for the
            initial Kabsch (for one topology, the same ids twice, e.g. the 68 set).

    Returns:
        :class:`stages.metrics_geometry.NowResult` (median, mean, std in mm).
    """
    landmarks = np.asarray(landmarks)
    v, tv = np.asarray(vertices, np.float64), np.asarray(true_vertices, np.float64)
    return now_scan_to_mesh(v, triangles, tv[np.asarray(region)],
                            mesh_landmarks=v[landmarks[:, 0]], reference_landmarks=tv[landmarks[:, 1]])


@dataclass(frozen=True)
class VertexErrorSummary:
    """Per-vertex distance to the true mesh (same topology) on the face region.

    Attributes:
        mean_mm, median_mm: over the face-region vertices, mm.
        per_vertex_mm: (r,) the distances, in ``region`` order.
    """

    mean_mm: float
    median_mm: float
    per_vertex_mm: np.ndarray

    @classmethod
    def of(cls, mm: np.ndarray) -> VertexErrorSummary:
        return cls(float(mm.mean()), float(np.median(mm)), mm.astype(np.float32))


def _same_topology(est: np.ndarray, true: np.ndarray) -> None:
    if np.shape(est) != np.shape(true) or np.ndim(est) != 2 or np.shape(est)[1] != 3:
        raise StageError(f"need two (n, 3) meshes of one topology, got {np.shape(est)} and {np.shape(true)}")


def vertex_error_rigid(est: np.ndarray, true: np.ndarray, region: np.ndarray) -> VertexErrorSummary:
    """Per-vertex error after the rigid (Kabsch, no scale) alignment over the face region.

    Args:
        est: (n, 3) estimated mesh, metres (any rigid frame).
        true: (n, 3) true mesh, same topology.
        region: face-region vertex ids.
    """
    _same_topology(est, true)
    region = np.asarray(region)
    return VertexErrorSummary.of(per_vertex_error(np.asarray(est)[region], np.asarray(true)[region], align=True).per_vertex_mm)


def vertex_error_as_estimated(
    est: np.ndarray,
    est_pose: np.ndarray,
    true: np.ndarray,
    true_pose: np.ndarray,
    region: np.ndarray,
) -> VertexErrorSummary:
    """Per-vertex error in the reference camera, each mesh placed by its own head pose.

    Args:
        est: (n, 3) estimated mesh, estimated head frame.
        est_pose: (4, 4) estimated reference-camera-from-head (``scan_from_head``).
        true: (n, 3) true mesh, true head frame.
        true_pose: (3, 4) or (4, 4) true reference-camera-from-head.
        region: face-region vertex ids.
    """
    _same_topology(est, true)
    region = np.asarray(region)
    d = np.linalg.norm(place(np.asarray(est)[region], est_pose) - place(np.asarray(true)[region], true_pose), axis=1)
    return VertexErrorSummary.of(d * 1000.0)


def refinement_gain(err_refined: float, err_fit: float) -> float:
    """``1 - err_refined / err_fit``: 0.25 = the refinement removed a quarter of the error."""
    if not err_fit > 0:
        raise StageError(f"the fit's error must be > 0 to compare against, got {err_fit}")
    return 1.0 - float(err_refined) / float(err_fit)


def linear_space_floor(model: Any, true_neutral: np.ndarray, true_expressions: np.ndarray,
                       region: np.ndarray) -> dict[str, Any]:
    """The best a fit inside the model's linear spaces can do on the face region.

    Identity: least squares of the true neutral on the identity basis (all modes, no prior,
    head frame, no alignment). Expressions: with that identity, bounded least squares
    (weights in [0, 1]) of each true expression mesh on the expression basis. What is
    left is outside the spaces (the subject's detail, its personal rig's deviation from the
    generic shapes): a fit cannot go below it; only the refinement can.

    Args:
        model: the face model (``neutral``, ``identity_basis``, ``expression_basis``).
        true_neutral: (n, 3) the true neutral, head frame, metres.
        true_expressions: (P, n, 3) true expression meshes, head frame.
        region: face-region vertex ids.

    Returns:
        ``{"neutral": VertexErrorSummary, "expressions": [VertexErrorSummary per mesh]}``.
    """
    from scipy.optimize import lsq_linear

    region = np.asarray(region)
    base = np.asarray(model.neutral, np.float64)[region]
    a_id = np.asarray(model.identity_basis, np.float64)[:, region].reshape(len(model.identity_basis), -1).T
    a_ex = np.asarray(model.expression_basis, np.float64)[:, region].reshape(len(model.expression_basis), -1).T
    y = (np.asarray(true_neutral, np.float64)[region] - base).ravel()
    x = np.linalg.lstsq(a_id, y, rcond=None)[0]
    ident = base + (a_id @ x).reshape(-1, 3)

    def residual(fitted: np.ndarray, true: np.ndarray) -> VertexErrorSummary:
        return VertexErrorSummary.of(np.linalg.norm(fitted - true, axis=1) * 1000.0)

    out: dict[str, Any] = {"neutral": residual(ident, np.asarray(true_neutral, np.float64)[region]), "expressions": []}
    # ||A w - y|| = ||R w - Q^T y|| + const with A = QR: the bounded solves run on 53 x 53.
    q, r = np.linalg.qr(a_ex)
    for true in np.asarray(true_expressions, np.float64):
        w = lsq_linear(r, q.T @ (true[region] - ident).ravel(), bounds=(0.0, 1.0)).x
        out["expressions"].append(residual(ident + (a_ex @ w).reshape(-1, 3), true[region]))
    return out


# --------------------------------------------------------------------- one subject


def _meta(output: Any) -> dict:
    return dict(getattr(output, "meta", {}) or {})


def covered_vertices(true: np.ndarray, true_pose: np.ndarray, region: np.ndarray, scan_vertices: np.ndarray,
                     covered_mm: float = COVERED_MM) -> np.ndarray:
    """(r,) bool, face-region vertices whose true position (placed by ``true_pose`` in the
    scan's frame) has a scan vertex within ``covered_mm``."""
    from scipy.spatial import cKDTree

    t = place(np.asarray(true)[np.asarray(region)], true_pose)
    return cKDTree(np.asarray(scan_vertices, np.float64)).query(t)[0] < covered_mm * 1e-3


def coverage_split(est: np.ndarray, est_pose: np.ndarray, true: np.ndarray, true_pose: np.ndarray,
                   region: np.ndarray, scan_vertices: np.ndarray, triangles: np.ndarray,
                   covered_mm: float = COVERED_MM) -> dict[str, float]:
    """Where the as-estimated per-vertex error comes from: the face-region vertices the scan
    covers (true position within ``covered_mm`` of a scan vertex) against the rest, and on
    the covered ones its components along the true surface normal (off the surface) and
    across it (sliding along the surface: a correspondence error no scan term can see).

    Args:
        est, est_pose, true, true_pose, region: as :func:`vertex_error_as_estimated`.
        scan_vertices: (V, 3) the fused scan, reference camera frame.
        triangles: (m, 3) the template's triangles (for the true normals).

    Returns:
        ``covered_fraction``; ``covered_mean_mm``, ``covered_normal_mm``,
        ``covered_tangential_mm`` (means over covered vertices); ``uncovered_mean_mm``.
    """
    from rigs.raycast import vertex_normals

    region = np.asarray(region)
    t = place(true, true_pose)
    diff = place(np.asarray(est)[region], est_pose) - t[region]
    covered = covered_vertices(true, true_pose, region, scan_vertices, covered_mm)
    err = np.linalg.norm(diff, axis=1) * 1e3
    normal = np.abs((diff * vertex_normals(t, np.asarray(triangles))[region]).sum(1)) * 1e3
    tangential = np.sqrt(np.maximum(err**2 - normal**2, 0.0))

    def mean(x: np.ndarray, m: np.ndarray) -> float | None:
        return float(x[m].mean()) if m.any() else None

    return {"covered_fraction": float(covered.mean()), "covered_mean_mm": mean(err, covered),
            "covered_normal_mm": mean(normal, covered), "covered_tangential_mm": mean(tangential, covered),
            "uncovered_mean_mm": mean(err, ~covered)}


def _mesh_records(kind: str, output: Any, truth: Any, fusion: Any, region: np.ndarray, prompts: list[str],
                  true_vertices: np.ndarray) -> list[dict]:
    """Per-expression per-vertex errors of a fit or refine artifact (contract keys)."""
    rows = []
    model_triangles = truth.rig.model.triangles
    for e in _meta(output).get("expressions", []):
        est = output.arrays[f"{e}.vertices"]
        true = true_vertices[prompts.index(e)]
        row = {"stage": kind, "expression": e, **{f"rigid_{k}": v for k, v in _scalars(vertex_error_rigid(est, true, region)).items()}}
        f = fusion.expressions.get(e)
        pose = output.arrays.get(f"{e}.scan_from_head")
        if f is not None and f.reference >= 0 and pose is not None and np.all(np.isfinite(pose)):
            true_pose = truth.phone(e)["head_in_camera"][f.reference]
            est_err = vertex_error_as_estimated(est, pose, true, true_pose, region)
            row.update({f"estimated_{k}": v for k, v in _scalars(est_err).items()})
            if f.ok:
                row.update(coverage_split(est, pose, true, true_pose, region, f.vertices, model_triangles))
        rows.append(row)
    return rows


def _decomposition(output: Any, truth: Any, fusion: Any, region: np.ndarray, prompts: list[str],
                   true_vertices: np.ndarray) -> dict | None:
    """:func:`stages.error_decomposition.error_decomposition` over the artifact's expressions
    that have a fused scan; None when none has."""
    from stages.error_decomposition import error_decomposition

    est, true, covered = [], [], []
    for e in _meta(output).get("expressions", []):
        f = fusion.expressions.get(e)
        if f is None or not f.ok or e not in prompts:
            continue
        t = true_vertices[prompts.index(e)]
        est.append(output.arrays[f"{e}.vertices"])
        true.append(t)
        covered.append(covered_vertices(t, truth.phone(e)["head_in_camera"][f.reference], region, f.vertices))
    return error_decomposition(est, true, covered, region, truth.rig.model.triangles) if est else None


def _scalars(summary: Any) -> dict:
    return {k: v for k, v in asdict(summary).items() if np.isscalar(v)}


def evaluate_subject(truth: Any, fusion: Any, fit: Any = None, refine: Any = None) -> dict:
    """Every measure of this module on one subject's artifacts.

    Args:
        truth: :class:`stages.synthesis.truth.SubjectTruth`.
        fusion: :class:`stages.fusion.FusedScans`.
        fit: the fit stage's output (``FittedSubject.to_output()`` contract) or None.
        refine: the refine stage's output (``RefinedSubject.to_output()``) or None.

    Returns:
        ``{"fusion": [per expression], "fit": [...], "refine": [...], "neutral": {...},
        "floor": {...}, "decomposition": {"fit": {...}, "refine": {...}}}``; per-expression
        records hold ``expression`` and the measures' scalars (mm); ``floor`` is
        :func:`linear_space_floor` (no artifact needed); ``decomposition`` is
        :func:`stages.error_decomposition.error_decomposition` per stage.
    """
    model = truth.rig.model
    region = face_region(model)
    region_tri = face_region_triangles(model.triangles, region)
    ex = truth.expressions()
    prompts, true_vertices = [str(p) for p in ex["prompts"]], ex["vertices"]
    out: dict[str, Any] = {"fusion": [], "fit": [], "refine": [], "neutral": {}}
    floor = linear_space_floor(model, truth.rig.neutral, true_vertices, region)
    out["floor"] = {"neutral": _scalars(floor["neutral"]),
                    "expressions": [{"expression": e, **_scalars(f)} for e, f in zip(prompts, floor["expressions"], strict=True)]}
    for e, f in fusion.expressions.items():
        if not f.ok or e not in prompts:
            continue
        pose = truth.phone(e)["head_in_camera"][f.reference]
        s = fused_scan_error(f.vertices, true_vertices[prompts.index(e)], pose, model.triangles, region_tri)
        out["fusion"].append({"expression": e, **asdict(s)})
    true_neutral = np.asarray(truth.rig.neutral, dtype=np.float64)
    lm = np.stack([model.landmarks68, model.landmarks68], axis=1)
    for kind, output in (("fit", fit), ("refine", refine)):
        if output is None:
            continue
        out[kind] = _mesh_records(kind, output, truth, fusion, region, prompts, true_vertices)
        out.setdefault("decomposition", {})[kind] = _decomposition(output, truth, fusion, region, prompts, true_vertices)
        if "neutral" in output.arrays:
            neutral = output.arrays["neutral"]
            now = now_error(neutral, model.triangles, true_neutral, region, lm)
            out["neutral"][kind] = {
                "now_median_mm": now.median_mm, "now_mean_mm": now.mean_mm, "now_std_mm": now.std_mm,
                **{f"rigid_{k}": v for k, v in _scalars(vertex_error_rigid(neutral, true_neutral, region)).items()},
            }
    return out
