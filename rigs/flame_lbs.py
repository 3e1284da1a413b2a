"""FLAME's posed surface in torch: shape blendshapes, pose correctives, linear blend skinning.

The order of operations is FLAME's published one (Li et al. 2017, as in the SMPL family's
``lbs``):

1. ``v_shaped = v_template + shapedirs . [beta, psi]`` (identity and expression);
2. ``joints = J_regressor v_shaped`` (computed from the regressed template and bases, so
   no full-mesh product is needed when only some vertices are evaluated);
3. ``v_posed = v_shaped + posedirs . vec(R_j - I)`` over the non-root joints j (row-major
   3x3 blocks, joint after joint);
4. each joint's world transform ``G_j = G_parent(j) [R_j | J_j - J_parent(j)]`` down the
   kinematic chain, made relative to the rest pose: ``G_j [I | -J_j]``;
5. ``v = sum_j w_vj G_j v_posed`` (linear blend skinning).

The global rotation is the fit's rigid pose, so the root's rotation stays the identity;
the articulation of a scan is the axis-angles of the other joints in kintree order
(FLAME: neck, jaw, left eye, right eye: 12 numbers).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import ModelError
from rigs.face_model import LandmarkEmbedding
from rigs.flame import FlameArrays, load_flame_arrays, load_flame_landmarks


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula, exact and differentiable at zero (series below 1e-6 rad).

    Args:
        axis_angle: (..., 3) rotation vectors, radians.

    Returns:
        (..., 3, 3) rotation matrices.
    """
    if axis_angle.shape[-1] != 3:
        raise ModelError(f"axis-angles must be (..., 3), got {tuple(axis_angle.shape)}")
    theta2 = (axis_angle * axis_angle).sum(-1, keepdim=True)[..., None]  # (..., 1, 1)
    small = theta2 < 1e-12
    safe2 = torch.where(small, torch.ones_like(theta2), theta2)  # no 0/0 in either branch
    theta = safe2.sqrt()
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / safe2)
    x, y, z = axis_angle.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*axis_angle.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + a * k + b * (k @ k)


def rigid_chain(rotations: torch.Tensor, joints: torch.Tensor, parents: np.ndarray) -> torch.Tensor:
    """Skinning transforms of a kinematic chain, relative to the rest pose.

    Args:
        rotations: (S, J, 3, 3) local rotation of each joint.
        joints: (S, J, 3) rest-pose joint positions.
        parents: (J,) parent of each joint (-1 for the root, parents precede children).

    Returns:
        (S, J, 3, 4) ``[R | t]`` mapping a rest-pose point rigidly attached to joint j to
        its posed position.
    """
    rel = joints.clone()
    rel[:, 1:] = joints[:, 1:] - joints[:, parents[1:]]
    local = torch.cat([rotations, rel[..., None]], -1)  # (S, J, 3, 4)
    chain_r, chain_t = [local[:, 0, :, :3]], [local[:, 0, :, 3]]
    for j in range(1, len(parents)):  # a handful of joints: the loop is over the chain
        p = parents[j]
        chain_r.append(chain_r[p] @ local[:, j, :, :3])
        chain_t.append((chain_r[p] @ local[:, j, :, 3:])[..., 0] + chain_t[p])
    rot = torch.stack(chain_r, 1)
    trans = torch.stack(chain_t, 1) - (rot @ joints[..., None])[..., 0]  # undo the rest pose
    return torch.cat([rot, trans[..., None]], -1)


class FlameModel:
    """A FLAME model posed by linear blend skinning (implements ``DeformableModel``).

    Identity ``beta`` (k,) and expression ``psi`` (S, e) are coefficients of the Gaussian
    shape spaces (prior N(0, 1), so ``expression_bounds`` is None); articulation (S, 3 (J-1))
    is the axis-angle of each non-root joint. The root stays unrotated: the rigid head
    pose is the fit's. Tensors take the dtype of the ``identity`` argument (float64
    recommended); the model's arrays are converted once per dtype and device.

    Args:
        arrays: checked arrays with skinning (:func:`rigs.flame.load_flame_arrays`).
        landmarks: the ``"mediapipe478"`` embedding (:func:`rigs.flame.load_flame_landmarks`).
        name: model name (with version) recorded in the fit's artifact.
    """

    def __init__(self, arrays: FlameArrays, landmarks: LandmarkEmbedding | None = None, name: str = "flame") -> None:
        if not arrays.has_skinning:
            raise ModelError(f"{name}: the FLAME file has no skinning arrays (J_regressor, weights, kintree_table, posedirs)")
        self.name = name
        self.arrays = arrays
        self.triangles = arrays.triangles
        self.fitting_vertices = arrays.fitting_vertices
        self.landmarks = landmarks
        self.n_identity = arrays.n_shape
        self.n_expression = arrays.shapedirs.shape[2] - arrays.n_shape
        self.parents = arrays.parents
        self.n_joints = len(arrays.parents)
        self.n_articulation = 3 * (self.n_joints - 1)
        self.expression_bounds: tuple[float, float] | None = None
        # joints are linear in the shape coefficients: regress template and bases once
        self._joint_template = arrays.J_regressor @ arrays.v_template  # (J, 3)
        self._joint_dirs = np.einsum("jn,nck->jck", arrays.J_regressor, arrays.shapedirs)  # (J, 3, K)
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self._subset: np.ndarray | None = None  # vertex ids this model evaluates (None = all)

    @classmethod
    def from_npz(
        cls, path: str | Path, landmarks: str | Path | None = None, n_shape: int | None = None
    ) -> FlameModel:
        """Loads a converted FLAME ``.npz`` (and optionally its landmark embedding file)."""
        arrays = load_flame_arrays(path, n_shape)
        emb = None if landmarks is None else load_flame_landmarks(landmarks, arrays.triangles)
        return cls(arrays, emb, name=f"flame:{Path(path).stem}")

    @property
    def n_vertices(self) -> int:
        return len(self.arrays.v_template) if self._subset is None else len(self._subset)

    def subset(self, vertex_ids: np.ndarray) -> FlameModel:
        """The same model over ``vertex_ids`` only (``rigs.deformable.Subsettable``).

        Vertex i of the result is ``vertex_ids[i]``; the joints still come from the whole
        shape, so the subset's vertices equal the full model's. Triangles, fitting
        vertices and landmarks are dropped (empty / None).
        """
        ids = np.asarray(vertex_ids, np.int64)
        full = len(self.arrays.v_template)
        if ids.ndim != 1 or (len(ids) and (ids.min() < 0 or ids.max() >= full)):
            raise ModelError(f"{self.name}: vertex ids must be (p,) in [0, {full}), got shape {ids.shape}")
        sub = copy.copy(self)  # shares the arrays; its own tensors, cut to the subset
        sub._subset = ids if self._subset is None else self._subset[ids]
        sub._cache = {}
        sub.triangles, sub.fitting_vertices, sub.landmarks = np.zeros((0, 3), np.int64), np.zeros(0, np.int64), None
        return sub

    def _tensors(self, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """The model's arrays as tensors (per-vertex ones cut to the subset), cached."""
        key = (dtype, device)
        if key not in self._cache:
            a = self.arrays
            rows = slice(None) if self._subset is None else self._subset
            as_t = lambda x: torch.as_tensor(np.ascontiguousarray(x), dtype=dtype, device=device)  # noqa: E731
            self._cache[key] = {
                "template": as_t(a.v_template[rows]), "shapedirs": as_t(a.shapedirs[rows]),
                "posedirs": as_t(a.posedirs[rows]), "weights": as_t(a.weights[rows]),
                "joint_template": as_t(self._joint_template), "joint_dirs": as_t(self._joint_dirs),
            }
        return self._cache[key]

    def _check(self, identity: torch.Tensor, expression: torch.Tensor, articulation: torch.Tensor) -> int:
        s = expression.shape[0] if expression.ndim == 2 else -1
        if identity.shape != (self.n_identity,):
            raise ModelError(f"{self.name}: identity must be ({self.n_identity},), got {tuple(identity.shape)}")
        if expression.shape != (s, self.n_expression):
            raise ModelError(f"{self.name}: expression must be (S, {self.n_expression}), got {tuple(expression.shape)}")
        if articulation.shape != (s, self.n_articulation):
            raise ModelError(f"{self.name}: articulation must be ({s}, {self.n_articulation}), got {tuple(articulation.shape)}")
        return s

    def joints(self, identity: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """(S, J, 3) rest-pose joints of the shaped model (``J_regressor v_shaped``)."""
        t = self._tensors(identity.dtype, identity.device)
        coeffs = torch.cat([identity.expand(len(expression), -1), expression], 1)  # (S, K)
        return t["joint_template"] + torch.einsum("jck,sk->sjc", t["joint_dirs"], coeffs)

    def vertices(
        self,
        identity: torch.Tensor,
        expression: torch.Tensor,
        articulation: torch.Tensor,
        vertex_ids: np.ndarray | None = None,
    ) -> torch.Tensor:
        """Posed vertices in the head frame, metres.

        Args:
            identity: (k,) beta.
            expression: (S, e) psi.
            articulation: (S, 3 (J-1)) axis-angles of the non-root joints (kintree order).
            vertex_ids: optional (v,) vertices to evaluate (of a :meth:`subset`, indices
                into it); joints still use the whole shape. None = all.

        Returns:
            (S, n, 3) (or (S, v, 3)) vertices, the dtype of ``identity``.
        """
        s = self._check(identity, expression, articulation)
        t = self._tensors(identity.dtype, identity.device)
        ids = slice(None) if vertex_ids is None else torch.as_tensor(np.asarray(vertex_ids, np.int64), device=identity.device)
        coeffs = torch.cat([identity.expand(s, -1), expression], 1)
        v_shaped = t["template"][ids] + torch.einsum("nck,sk->snc", t["shapedirs"][ids], coeffs)
        joints = self.joints(identity, expression)
        root = torch.zeros(s, 1, 3, dtype=identity.dtype, device=identity.device)
        rot = axis_angle_to_matrix(torch.cat([root, articulation.reshape(s, -1, 3)], 1))  # (S, J, 3, 3)
        eye = torch.eye(3, dtype=identity.dtype, device=identity.device)
        pose_feature = (rot[:, 1:] - eye).reshape(s, -1)  # (S, 9 (J-1))
        v_posed = v_shaped + torch.einsum("ncp,sp->snc", t["posedirs"][ids], pose_feature)
        skin = rigid_chain(rot, joints, self.parents)  # (S, J, 3, 4)
        blend = torch.einsum("nj,sjab->snab", t["weights"][ids], skin)  # (S, n, 3, 4)
        return (blend[..., :3] @ v_posed[..., None])[..., 0] + blend[..., 3]

    def vertices_np(
        self, identity: np.ndarray, expression: np.ndarray, articulation: np.ndarray | None = None
    ) -> np.ndarray:
        """Numpy wrapper of :meth:`vertices` in float64: (k,), (S, e), (S, 3 (J-1)) -> (S, n, 3)."""
        expression = np.atleast_2d(np.asarray(expression, np.float64))
        if articulation is None:
            articulation = np.zeros((len(expression), self.n_articulation))
        with torch.no_grad():
            out = self.vertices(
                torch.as_tensor(np.asarray(identity, np.float64)), torch.as_tensor(expression),
                torch.as_tensor(np.atleast_2d(np.asarray(articulation, np.float64))),
            )
        return out.numpy()
