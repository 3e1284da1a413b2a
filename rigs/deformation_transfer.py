"""Deformation transfer of a generic rig onto a subject's neutral (Sumner & Popovic 2004).

Each generic shape's relative deformation gradients ``M_k = S_k - I`` (generic neutral ->
generic shape k, :mod:`rigs.gradients`) are applied to the subject's neutral triangle by
triangle, and one Poisson solve on the subject's neutral (factorised once, all shapes as
stacked right-hand sides) turns them into vertex deltas. These are the initial personal
shapes of example-based rigging (:mod:`rigs.example_rig`) and its regularisation target.

Rigid rule: the eyeballs, teeth and gums/tongue are separate components of the template
and are not in the gradient domain; they keep the generic deltas unchanged (the eyeballs
do not move in any shape; gaze rotates them at pose time). Anchors: the domain vertices
that no generic shape moves (by more than ``static_tol``) keep the generic delta (zero
within the tolerance); if the domain has fewer than ``min_anchors`` such vertices (a
face-only sub-mesh), the ``min_anchors`` least-moving vertices are anchored instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import StageError
from rigs.face_model import FaceModel
from rigs.gradients import PoissonSystem, deformation_gradients, triangle_areas
from rigs.rig import BlendshapeRig

#: Template parts that move rigidly and stay out of the gradient domain.
RIGID_PARTS = ("eyeball_left", "eyeball_right", "teeth", "gums_tongue")
#: A domain vertex moved by no generic shape by more than this (metres) is an anchor.
STATIC_TOL = 1e-6
#: Fewest anchors; below this the least-moving vertices are anchored.
MIN_ANCHORS = 32
#: A triangle smaller than this (m^2) is degenerate (ICT's smallest is 4.6e-9 m^2).
DEGENERATE_AREA = 1e-13
#: Largest fraction of flipped triangles an input mesh may have against its reference.
#: Measured: ICT's own shapes flip up to 2.1 % (mouthClose, lips), 1-sigma identities
#: ~0.1 % of tiny mouth-corner triangles; a mesh with scrambled vertex order flips ~50 %.
MAX_FLIPPED_FRACTION = 0.05


@dataclass(frozen=True, eq=False)
class GradientDomain:
    """Which triangles the Poisson solve covers and which vertices it anchors.

    Attributes:
        triangles: (m_d, 3) int64 template triangles of the domain.
        rigid: (r,) int64 vertex ids outside the domain (they keep the generic deltas).
        anchors: (a,) int64 domain vertex ids whose deltas are the generic ones.
    """

    triangles: np.ndarray
    rigid: np.ndarray
    anchors: np.ndarray


def gradient_domain(
    triangles: np.ndarray,
    rigid: np.ndarray,
    generic_deltas: np.ndarray,
    static_tol: float = STATIC_TOL,
    min_anchors: int = MIN_ANCHORS,
) -> GradientDomain:
    """The gradient domain: triangles touching no rigid vertex; anchors that do not move.

    Args:
        triangles: (m, 3) template triangles.
        rigid: (r,) vertex ids of the rigid parts.
        generic_deltas: (K, n, 3) generic shape deltas (decide which vertices are static).
        static_tol: a vertex is static when no shape moves it further (metres).
        min_anchors: fewest anchors; the least-moving domain vertices fill up to this.

    Returns:
        The domain.
    """
    t = np.asarray(triangles, np.int64)
    rigid = np.unique(np.asarray(rigid, np.int64))
    dom_tris = t[~np.isin(t, rigid).any(1)]
    domain = np.unique(dom_tris)
    motion = np.linalg.norm(np.asarray(generic_deltas)[:, domain], axis=2).max(0)
    anchors = domain[motion <= static_tol]
    if len(anchors) < min_anchors:
        anchors = domain[np.argsort(motion, kind="stable")[:min_anchors]]
    outside = np.setdiff1d(np.arange(generic_deltas.shape[1]), domain)
    return GradientDomain(dom_tris, outside, np.sort(anchors))


def model_domain(model: FaceModel, generic_deltas: np.ndarray) -> GradientDomain:
    """:func:`gradient_domain` of a face model with its rigid parts (those it has)."""
    parts = [p for p in RIGID_PARTS if p in model.part_names]
    rigid = model.part_vertices(*parts) if parts else np.zeros(0, np.int64)
    return gradient_domain(model.triangles, rigid, generic_deltas)


def check_mesh(name: str, vertices: np.ndarray, reference: np.ndarray, triangles: np.ndarray,
               max_flipped_fraction: float = MAX_FLIPPED_FRACTION) -> None:
    """Raises if a mesh is unusable: wrong shape, non-finite, degenerate or flipped triangles.

    Args:
        name: the mesh's name for the message.
        vertices: (n, 3) the mesh.
        reference: (n, 3) a mesh it should resemble (flips are counted against it).
        triangles: (m, 3) the triangles to check (the gradient domain).
        max_flipped_fraction: most triangles whose normal may reverse against ``reference``.

    Raises:
        StageError: naming the mesh and the count of bad triangles.
    """
    v = np.asarray(vertices)
    if v.shape != reference.shape:
        raise StageError(f"mesh {name}: shape {v.shape}, expected {reference.shape}")
    if not np.isfinite(v).all():
        raise StageError(f"mesh {name}: {int((~np.isfinite(v).all(1)).sum())} non-finite vertices")
    small = int((triangle_areas(v, triangles) < DEGENERATE_AREA).sum())
    if small:
        raise StageError(f"mesh {name}: {small} degenerate triangles (area < {DEGENERATE_AREA:g} m^2)")
    t = np.asarray(triangles, np.int64)

    def normals(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        return np.cross(x[t[:, 1]] - x[t[:, 0]], x[t[:, 2]] - x[t[:, 0]])

    flipped = int((np.einsum("ij,ij->i", normals(v), normals(reference)) < 0).sum())
    if flipped > max_flipped_fraction * len(t):
        raise StageError(
            f"mesh {name}: {flipped} of {len(t)} triangles flipped against its reference "
            f"(more than {max_flipped_fraction:.0%})"
        )


def transfer_gradients(source_neutral: np.ndarray, source_deltas: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Relative gradients ``M_k`` of each source shape against the source neutral.

    Args:
        source_neutral: (n, 3) generic neutral.
        source_deltas: (K, n, 3) generic deltas.
        triangles: (m, 3) domain triangles.

    Returns:
        (K, m, 3, 3) float64 relative gradients (the transferred gradients: deformation
        transfer applies them unchanged to the target's triangles).
    """
    neutral = np.asarray(source_neutral, np.float64)
    return deformation_gradients(neutral, neutral + np.asarray(source_deltas, np.float64), triangles)


def transfer_arrays(
    source_neutral: np.ndarray,
    source_deltas: np.ndarray,
    target_neutral: np.ndarray,
    domain: GradientDomain,
    system: PoissonSystem | None = None,
) -> np.ndarray:
    """Deformation transfer on arrays.

    Args:
        source_neutral: (n, 3) generic neutral.
        source_deltas: (K, n, 3) generic deltas.
        target_neutral: (n, 3) subject neutral (same topology).
        domain: the gradient domain and anchors (:func:`gradient_domain`).
        system: optional Poisson system of ``target_neutral`` on ``domain`` (reused).

    Returns:
        (K, n, 3) float64 subject deltas; rigid vertices and anchors carry the generic ones.
    """
    source_deltas = np.asarray(source_deltas, np.float64)
    system = system or PoissonSystem(np.asarray(target_neutral, np.float64), domain.triangles, domain.anchors)
    grads = transfer_gradients(source_neutral, source_deltas, domain.triangles)
    out = system.solve_deltas(grads, source_deltas[:, system.anchors])
    out[:, domain.rigid] = source_deltas[:, domain.rigid]
    return out


def transfer_deltas(generic: BlendshapeRig, subject_neutral: np.ndarray) -> np.ndarray:
    """The generic rig's shapes transferred onto a subject's neutral.

    Args:
        generic: the generic rig (its neutral and deltas are the source).
        subject_neutral: (n, 3) the subject's neutral in the rig's topology, metres.

    Returns:
        (K, n, 3) float32 deltas in the rig's definition order.

    Raises:
        StageError: the neutral has the wrong shape, non-finite vertices, or degenerate or
            flipped triangles.
    """
    domain = model_domain(generic.model, generic.deltas)
    check_mesh("subject neutral", subject_neutral, generic.neutral, domain.triangles)
    return transfer_arrays(generic.neutral, generic.deltas, subject_neutral, domain).astype(np.float32)
