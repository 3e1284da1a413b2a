"""Deformable face models for fitting (torch), and the torch geometry the fit needs.

:class:`DeformableModel` is what the joint fit (``stages/fit.py``) optimises: a shared
identity, a per-scan expression and per-scan articulation (extra pose parameters such as
FLAME's jaw, neck and eyes) map to vertices in the head frame (+y up, face toward +z, +x
toward the subject's left), metres. :class:`LinearFaceModel` is the embedded ICT model as
such a model: neutral + identity basis + the rig definition's generic expression shapes.

Tensors are float64 throughout (:data:`DTYPE`): the fit resolves tenths of a millimetre on
coordinates of ~0.3 m, and L-BFGS line searches on float32 energies stall there.

A model may also offer ``subset(vertex_ids) -> DeformableModel`` (:class:`Subsettable`),
a model over only some vertices, so that the optimisation evaluates only the vertices its
terms read; :class:`LinearFaceModel` does.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from pipeline.errors import ModelError
from rigs.definition import RigDefinition
from rigs.face_model import FaceModel, LandmarkEmbedding

#: dtype of every tensor of the fit.
DTYPE = torch.float64
#: Name of the landmark embedding the fit uses.
LANDMARK_SET = "mediapipe478"


class DeformableModel(Protocol):
    """A face model the joint fit can optimise (see the module docstring)."""

    name: str
    triangles: np.ndarray  # (m, 3) int
    fitting_vertices: np.ndarray  # (f,) int: vertices the scan term uses (the face region)
    landmarks: LandmarkEmbedding | None  # the "mediapipe478" embedding on this topology
    n_identity: int
    n_expression: int
    n_articulation: int  # extra per-scan pose parameters (0 for a linear model)
    expression_bounds: tuple[float, float] | None  # (0, 1) for blendshape weights; None = unbounded

    def vertices(self, identity: torch.Tensor, expression: torch.Tensor,
                 articulation: torch.Tensor) -> torch.Tensor:
        """identity (k,), expression (S, e), articulation (S, j) -> (S, n, 3) head frame, metres."""
        ...


@runtime_checkable
class Subsettable(Protocol):
    """A model that can evaluate a subset of its vertices (an optional speed-up)."""

    def subset(self, vertex_ids: np.ndarray) -> DeformableModel:
        """The same model over ``vertex_ids`` only: vertex i of the result is
        ``vertex_ids[i]``; triangles, fitting vertices and landmarks are dropped (empty/None)."""
        ...


class LinearFaceModel:
    """The face model's linear identity space plus a rig definition's expression shapes.

    ``vertices = neutral + sum_k c_k B^id_k + sum_j w_j B^expr_j`` with the expression
    shapes in the definition's blendshape order and weights in [0, 1]; no articulation.

    Args:
        model: the face model (e.g. :func:`rigs.face_model.load_ict_face_model`).
        definition: the rig definition whose blendshapes name the expression shapes.

    Raises:
        ModelError: the face model lacks one of the definition's shapes.
    """

    n_articulation = 0
    expression_bounds: tuple[float, float] | None = (0.0, 1.0)

    def __init__(self, model: FaceModel, definition: RigDefinition) -> None:
        missing = [n for n in definition.blendshape_names if n not in model.expression_names]
        if missing:
            raise ModelError(f"face model {model.name} lacks the rig's shapes {missing}")
        order = [model.expression_names.index(n) for n in definition.blendshape_names]
        self.name = f"{model.name}@{model.version}"
        self.triangles = np.asarray(model.triangles, np.int64)
        self.fitting_vertices = np.asarray(model.fitting_vertices, np.int64)
        self.landmarks = model.embeddings.get(LANDMARK_SET)
        n = model.n_vertices
        self._neutral = torch.as_tensor(model.neutral, dtype=DTYPE).reshape(-1)
        self._identity = torch.as_tensor(model.identity_basis, dtype=DTYPE).reshape(-1, 3 * n)
        self._expression = torch.as_tensor(model.expression_basis[order], dtype=DTYPE).reshape(-1, 3 * n)
        self.n_identity, self.n_expression = len(self._identity), len(self._expression)

    @property
    def n_vertices(self) -> int:
        return len(self._neutral) // 3

    def vertices(self, identity: torch.Tensor, expression: torch.Tensor,
                 articulation: torch.Tensor | None = None) -> torch.Tensor:
        """Vertices of S scans.

        Args:
            identity: (k,) identity coefficients.
            expression: (S, e) expression weights (rig order).
            articulation: (S, 0) or None (the model has none).

        Returns:
            (S, n, 3) float64 vertices, head frame, metres.
        """
        if identity.shape != (self.n_identity,) or expression.ndim != 2 or expression.shape[1] != self.n_expression:
            raise ModelError(f"need identity ({self.n_identity},) and expression (S, {self.n_expression}), "
                             f"got {tuple(identity.shape)}, {tuple(expression.shape)}")
        shape = self._neutral + identity.to(DTYPE) @ self._identity  # (3n,)
        flat = shape[None] + expression.to(DTYPE) @ self._expression  # (S, 3n)
        return flat.reshape(len(expression), -1, 3)

    def jacobian(self, identity: torch.Tensor, expression: torch.Tensor,
                 articulation: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Vertex derivatives (constant: the model is linear), shared by all scans.

        Returns:
            (d/d identity (1, n, 3, k), d/d expression (1, n, 3, e), d/d articulation (1, n, 3, 0)).
        """
        n = self.n_vertices
        return (self._identity.T.reshape(1, n, 3, -1), self._expression.T.reshape(1, n, 3, -1),
                torch.zeros(1, n, 3, 0, dtype=DTYPE))

    def subset(self, vertex_ids: np.ndarray) -> LinearFaceModel:
        """The model over ``vertex_ids`` only (see :class:`Subsettable`)."""
        ids = np.asarray(vertex_ids, np.int64)
        if ids.ndim != 1 or (len(ids) and (ids.min() < 0 or ids.max() >= self.n_vertices)):
            raise ModelError(f"vertex ids must be (p,) in [0, {self.n_vertices}), got shape {ids.shape}")
        cols = torch.as_tensor((3 * ids[:, None] + np.arange(3)).ravel())
        sub = object.__new__(LinearFaceModel)
        sub.name, sub.n_identity, sub.n_expression = self.name, self.n_identity, self.n_expression
        sub.triangles, sub.fitting_vertices, sub.landmarks = np.zeros((0, 3), np.int64), np.zeros(0, np.int64), None
        sub._neutral = self._neutral[cols].contiguous()
        sub._identity = self._identity[:, cols].contiguous()
        sub._expression = self._expression[:, cols].contiguous()
        return sub


def vertex_jacobian(model: DeformableModel, identity: torch.Tensor, expression: torch.Tensor,
                    articulation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Derivatives of S scans' vertices with respect to the model's parameters.

    Uses the model's own ``jacobian`` when it has one (a linear model's is its bases),
    else forward-mode autodiff: one JVP per identity parameter and one per per-scan
    parameter (the scans are independent, so one tangent serves all of them).

    Args:
        identity: (k,); expression: (S, e); articulation: (S, j).

    Returns:
        (d/d identity (S', n, 3, k), d/d expression (S', n, 3, e), d/d articulation
        (S', n, 3, j)) with S' = S, or 1 when the same for every scan (broadcastable).
    """
    own = getattr(model, "jacobian", None)
    if own is not None:
        return own(identity, expression, articulation)
    from torch.func import jvp

    def f(c: torch.Tensor, w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return model.vertices(c, w, a)

    primals = (identity, expression, articulation)
    out = []
    for which, size in ((0, identity.shape[0]), (1, expression.shape[1]), (2, articulation.shape[1])):
        cols = []
        for i in range(size):
            tangents = [torch.zeros_like(p) for p in primals]
            if which == 0:
                tangents[0][i] = 1.0
            else:
                tangents[which][:, i] = 1.0
            cols.append(jvp(f, primals, tuple(tangents))[1])
        shape = (*model.vertices(*primals).shape, 0) if not cols else None
        out.append(torch.stack(cols, -1) if cols else torch.zeros(shape, dtype=DTYPE))
    return out[0], out[1], out[2]


# ------------------------------------------------------------------- torch geometry


def so3_exp(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rotation matrices of axis-angle vectors (Rodrigues), smooth at zero.

    Args:
        axis_angle: (..., 3) rotation vectors, radians.

    Returns:
        (..., 3, 3) rotation matrices.
    """
    r = axis_angle
    theta2 = (r * r).sum(-1, keepdim=True)[..., None]  # (..., 1, 1)
    small = theta2 < 1e-12
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = theta2_safe.sqrt()
    # sin(t)/t and (1 - cos t)/t^2, with their Taylor series near 0
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2_safe)
    zero = torch.zeros_like(r[..., 0])
    x, y, z = r[..., 0], r[..., 1], r[..., 2]
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*r.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=r.dtype, device=r.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def landmark_points(vertices: torch.Tensor, embedding: LandmarkEmbedding, triangles: np.ndarray) -> torch.Tensor:
    """Embedded landmark positions on posed vertices (torch twin of ``LandmarkEmbedding.points``).

    Args:
        vertices: (..., n, 3) vertices.
        embedding: triangle + barycentric of each of L landmarks.
        triangles: (m, 3) the vertices' triangles.

    Returns:
        (..., L, 3) landmark positions.
    """
    corners = torch.as_tensor(np.asarray(triangles)[embedding.triangle].astype(np.int64))  # (L, 3)
    bary = torch.as_tensor(embedding.barycentric, dtype=vertices.dtype)
    return (vertices[..., corners, :] * bary[..., None]).sum(-2)


def project(points_cam: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Pinhole projection (no distortion; pixel centres at integers, OpenCV).

    Args:
        points_cam: (..., 3) camera-frame points (x right, y down, z forward), z > 0.
        K: (3, 3) or (..., 3, 3) intrinsics broadcastable to the points' leading shape.

    Returns:
        (..., 2) pixel coordinates (u, v).
    """
    K = torch.as_tensor(K, dtype=points_cam.dtype)
    h = (K @ points_cam[..., None])[..., 0] if K.ndim > 2 else points_cam @ K.T
    return h[..., :2] / h[..., 2:3]


def rigid_transform(points: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """``R x + t`` batched: points (S, n, 3), rotation (S, 3, 3), translation (S, 3) -> (S, n, 3)."""
    return points @ rotation.transpose(-1, -2) + translation[..., None, :]
