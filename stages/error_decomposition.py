"""Where a subject's per-vertex error lies, and how much of it each kind of signal can reach.

The benchmark's per-vertex error (:func:`stages.geometry_eval.vertex_error_rigid`: each
expression Kabsch-aligned to its truth over the face region) is split, per face-region
vertex and expression, into

- *uncovered*: the vertex's true position has no fused-scan vertex near it (under the chin,
  toward the ears): only the model's spaces extrapolate there;
- on covered vertices, the component along the true surface normal (*off the surface*:
  what a scan term sees) and the rest (*along the surface*: sliding, which no
  point-to-surface term sees), the latter split into its mean over the subject's
  expressions (*common*: the same slide in every expression, an identity-level
  correspondence error) and the remainder (*per expression*).

The *ceilings* are the gains (``1 - err / err_fit``, mean per-vertex error, same alignment)
that ideal corrections would give: a perfect geometric refinement (covered off-surface part
removed), plus a perfect cross-expression alignment (photometric consistency with the
neutral, landmarks with a per-landmark bias shared by the expressions: the per-expression
sliding removed), and a perfect correspondence on everything the scan sees (all covered
error removed). Numbers and their reading: docs/refine.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.errors import StageError
from stages.metrics_geometry import rigid_fit


def error_decomposition(est: Sequence[np.ndarray], true: Sequence[np.ndarray], covered: Sequence[np.ndarray],
                        region: np.ndarray, triangles: np.ndarray) -> dict[str, float]:
    """The decomposition of the module docstring over one subject's expressions.

    Args:
        est: per expression (n, 3) estimated mesh, any rigid frame, metres.
        true: per expression (n, 3) true mesh, the true head frame (shared by all).
        covered: per expression (r,) bool, face-region vertices the fused scan covers
            (``region`` order).
        region: (r,) face-region vertex ids.
        triangles: (m, 3) the template's triangles (for the true normals).

    Returns:
        mm (means over expressions and vertices): ``all_mm``, ``uncovered_mm``,
        ``covered_mm``, ``covered_normal_mm``, ``covered_along_mm``,
        ``covered_along_common_mm``, ``covered_along_per_expression_mm``; fractions:
        ``covered_fraction``, ``uncovered_share`` (of the summed error);
        gains: ``ceiling_normal``, ``ceiling_normal_per_expression``, ``ceiling_covered``.

    Raises:
        StageError: no expressions, or mismatched shapes.
    """
    from rigs.raycast import vertex_normals

    region = np.asarray(region)
    if not len(est) or not (len(est) == len(true) == len(covered)):
        raise StageError(f"need one estimate, truth and coverage per expression, got {len(est)}, {len(true)}, {len(covered)}")
    diffs, normal_parts, covs = [], [], []
    for e, t, c in zip(est, true, covered, strict=True):
        e, t = np.asarray(e, np.float64)[region], np.asarray(t, np.float64)
        if e.shape != t[region].shape or np.shape(c) != (len(region),):
            raise StageError(f"shapes disagree: {e.shape}, {t[region].shape}, {np.shape(c)}")
        r, s = rigid_fit(e, t[region])
        d = e @ r.T + s - t[region]
        n = vertex_normals(t, np.asarray(triangles))[region].astype(np.float64)
        diffs.append(d)
        normal_parts.append((d * n).sum(1, keepdims=True) * n)
        covs.append(np.asarray(c, bool))
    D, N, C = np.stack(diffs), np.stack(normal_parts), np.stack(covs)  # (X, r, 3), (X, r, 3), (X, r)
    along = D - N
    common = np.broadcast_to(along.mean(0), along.shape)
    per_expression = along - common
    norm = np.linalg.norm
    err = norm(D, axis=-1)
    base = float(err.mean())

    def gain(removed: np.ndarray) -> float:
        left = D.copy()
        left[C] -= removed[C]
        return 1.0 - float(norm(left, axis=-1).mean()) / base if base > 0 else 0.0

    def mean_mm(x: np.ndarray, m: np.ndarray) -> float:
        return float(x[m].mean() * 1e3) if m.any() else float("nan")

    return {
        "all_mm": base * 1e3, "uncovered_mm": mean_mm(err, ~C), "covered_mm": mean_mm(err, C),
        "covered_normal_mm": mean_mm(norm(N, axis=-1), C), "covered_along_mm": mean_mm(norm(along, axis=-1), C),
        "covered_along_common_mm": mean_mm(norm(common, axis=-1), C),
        "covered_along_per_expression_mm": mean_mm(norm(per_expression, axis=-1), C),
        "covered_fraction": float(C.mean()), "uncovered_share": float(err[~C].sum() / max(err.sum(), 1e-300)),
        "ceiling_normal": gain(N), "ceiling_normal_per_expression": gain(N + per_expression), "ceiling_covered": gain(D),
    }
