"""The population a rig is scored over: identities x expressions x donning offsets.

Identities are coefficient vectors of the face model's identity space (N(0, sigma^2)
per mode, the modes being scaled to unit variance); expressions are activation vectors
of the rig definition (the prompts' art priors, or each blendshape alone at 1); donning
offsets are head poses relative to the headset (the headset frame is the head frame at
the nominal donning). Only the template's ``face`` part is posed: its triangles are the
occluder, its region vertices (:mod:`stages.placement.regions`) the sample points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.config import check_fields
from pipeline.errors import ConfigError
from rigs.definition import RigDefinition
from rigs.face_model import FaceModel
from stages.placement.regions import Regions


@dataclass(frozen=True)
class PopulationConfig:
    """Who and how the faces are sampled."""

    identities: int = 20
    """Number of identities drawn from the identity space (>= 1); the first one is the
    mean face when ``include_mean_identity`` is set."""
    identity_modes: int = 100
    """Identity coefficients drawn (the rest are 0), at most the model's mode count."""
    identity_sigma: float = 1.0
    """Standard deviation of each identity coefficient (the modes have unit variance), >= 0."""
    include_mean_identity: bool = True
    """Make identity 0 the mean face (its coefficients all 0)."""
    expressions: Literal["prompts", "blendshapes"] = "prompts"
    """'prompts': the rig definition's prompts with a non-empty art prior, at their expected
    activations; 'blendshapes': each blendshape alone at activation 1."""
    max_expressions: int = 0
    """Keep only the first this-many expressions (0 = all)."""
    donnings: int = 5
    """Donning offsets per face (>= 1); offset 0 is the nominal donning."""
    donning_translation_mm: float = 3.0
    """Standard deviation of each axis of a donning offset's translation, millimetres (>= 0)."""
    donning_rotation_deg: float = 2.0
    """Standard deviation of each of a donning offset's yaw, pitch and roll, degrees (>= 0)."""
    seed: int = 0
    """Seed of the identity and donning draws."""

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("identities", "identity_modes", "donnings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"PopulationConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("identity_sigma", "donning_translation_mm", "donning_rotation_deg", "max_expressions"):
            if getattr(self, name) < 0:
                raise ConfigError(f"PopulationConfig.{name} must be >= 0, got {getattr(self, name)}")


def expression_set(definition: RigDefinition, which: str, limit: int = 0) -> tuple[tuple[str, ...], np.ndarray]:
    """Expression names and (E, K) activations in definition order (see PopulationConfig)."""
    k = definition.size
    if which == "blendshapes":
        names, weights = definition.blendshape_names, np.eye(k)
    else:
        prompts = [p for p in definition.prompts if p.art_prior]
        names = tuple(p.name for p in prompts)
        weights = np.zeros((len(prompts), k))
        for i, p in enumerate(prompts):
            for shape, value in p.art_prior.items():
                weights[i, definition.blendshape_names.index(shape)] = value
    if limit:
        names, weights = names[:limit], weights[:limit]
    return tuple(names), weights


def euler_rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """(3, 3) rotation R_y(yaw) R_x(pitch) R_z(roll), radians (head frame: +y up, +z forward)."""
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return ry @ rx @ rz


def donning_offsets(config: PopulationConfig) -> tuple[np.ndarray, np.ndarray]:
    """(D, 3, 3) rotations and (D, 3) translations (metres) of the head in the headset frame.

    A head point x sits at R x + t in the headset frame; offset 0 is (I, 0).
    """
    rng = np.random.default_rng([config.seed, 1])
    angles = np.deg2rad(config.donning_rotation_deg) * rng.standard_normal((config.donnings, 3))
    shifts = 1e-3 * config.donning_translation_mm * rng.standard_normal((config.donnings, 3))
    angles[0], shifts[0] = 0.0, 0.0
    return np.stack([euler_rotation(*a) for a in angles]), shifts


def identity_coefficients(config: PopulationConfig, model: FaceModel) -> np.ndarray:
    """(N, k) identity coefficients (k = min(identity_modes, model's modes))."""
    k = min(config.identity_modes, len(model.identity_basis))
    rng = np.random.default_rng([config.seed, 0])
    c = config.identity_sigma * rng.standard_normal((config.identities, k))
    if config.include_mean_identity:
        c[0] = 0.0
    return c


@dataclass(frozen=True, eq=False)
class FaceSubset:
    """The posed part of the template: the ``face`` triangles, re-indexed compactly.

    Attributes:
        vertex_ids: (n,) template ids of the vertices the face triangles use.
        triangles: (m, 3) triangles indexing ``vertex_ids``.
        sample_index: (P,) index into ``vertex_ids`` of each region sample point.
        normal_triangles: (q,) ids of the triangles that touch a sample point.
        sample_normal_matrix: (P, q) sparse: sums the (area-weighted) normals of those
            triangles around each sample point.
    """

    vertex_ids: np.ndarray
    triangles: np.ndarray
    sample_index: np.ndarray
    normal_triangles: np.ndarray
    sample_normal_matrix: object

    @classmethod
    def build(cls, model: FaceModel, regions: Regions) -> FaceSubset:
        from scipy import sparse

        tris = model.triangles[model.part_triangle_mask("face")]
        ids, compact = np.unique(tris, return_inverse=True)
        compact = compact.reshape(tris.shape)
        where = np.searchsorted(ids, regions.samples)
        if not np.array_equal(ids[np.minimum(where, len(ids) - 1)], regions.samples):
            raise ConfigError("placement sample points must lie on the face part's triangles")
        row_of = np.full(len(ids), -1)
        row_of[where] = np.arange(len(where))
        rows = row_of[compact]  # (m, 3) sample row of each corner, -1 if none
        touching = np.flatnonzero((rows >= 0).any(1))
        rows = rows[touching].ravel()
        keep = rows >= 0
        cols = np.repeat(np.arange(len(touching)), 3)[keep]
        matrix = sparse.csr_matrix((np.ones(keep.sum()), (rows[keep], cols)), shape=(len(where), len(touching)))
        return cls(ids, compact.astype(np.int32), where, touching, matrix)

    def pose(self, model: FaceModel, identity: np.ndarray, deltas: np.ndarray,
             activations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posed subset vertices and sample normals of one identity, neutral first.

        Args:
            model: the face model.
            identity: (k,) identity coefficients.
            deltas: (K, n_subset, 3) expression deltas on the subset, definition order.
            activations: (E, K) expressions.

        Returns:
            (vertices (E + 1, n_subset, 3), sample normals (E + 1, P, 3) unit), head frame;
            pose 0 is the identity's neutral.
        """
        basis = model.identity_basis[: len(identity), self.vertex_ids]
        neutral = model.neutral[self.vertex_ids] + np.tensordot(identity, basis, axes=1)
        weights = np.concatenate([np.zeros((1, len(deltas))), activations])
        verts = neutral[None] + np.tensordot(weights, deltas, axes=1)  # (E+1, n, 3)
        corners = verts[:, self.triangles[self.normal_triangles]]  # (E+1, q, 3, 3)
        face_normals = np.cross(corners[:, :, 1] - corners[:, :, 0], corners[:, :, 2] - corners[:, :, 0])
        e, m = face_normals.shape[:2]
        summed = self.sample_normal_matrix @ face_normals.transpose(1, 0, 2).reshape(m, e * 3)
        normals = summed.reshape(-1, e, 3).transpose(1, 0, 2)
        normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-20)
        return verts, normals


def subset_deltas(model: FaceModel, definition: RigDefinition, subset: FaceSubset) -> np.ndarray:
    """(K, n_subset, 3) the model's expression deltas in definition order, on the subset."""
    order = [model.expression_names.index(n) for n in definition.blendshape_names]
    return model.expression_basis[order][:, subset.vertex_ids].astype(np.float64)


@dataclass(eq=False)
class Population:
    """The posed faces a rig is scored over.

    Attributes:
        model: the face model.
        regions: regions and sample points on its template.
        subset: the posed part of the template.
        deltas: (K, n_subset, 3) expression deltas, definition order.
        identities: (N, k) identity coefficients.
        expression_names: (E,) expression names.
        activations: (E, K) expression activations.
        rotations: (D, 3, 3) donning rotations (head in headset frame).
        shifts: (D, 3) donning translations, metres.
        keep_scenes: keep each identity's ray-casting scenes for the next call (the
            placement search scores the same faces many times).
    """

    model: FaceModel
    regions: Regions
    subset: FaceSubset
    deltas: np.ndarray
    identities: np.ndarray
    expression_names: tuple[str, ...]
    activations: np.ndarray
    rotations: np.ndarray
    shifts: np.ndarray
    keep_scenes: bool = False

    def __post_init__(self) -> None:
        self._cache: dict[int, tuple] = {}

    @classmethod
    def build(cls, config: PopulationConfig, model: FaceModel, definition: RigDefinition,
              regions: Regions, keep_scenes: bool = False) -> Population:
        """Draws the population of ``config`` on ``model`` (see :class:`PopulationConfig`)."""
        subset = FaceSubset.build(model, regions)
        names, activations = expression_set(definition, config.expressions, config.max_expressions)
        rotations, shifts = donning_offsets(config)
        return cls(model, regions, subset, subset_deltas(model, definition, subset),
                   identity_coefficients(config, model), names, activations, rotations, shifts, keep_scenes)

    @property
    def size(self) -> tuple[int, int, int]:
        """(identities, expressions, donnings)."""
        return len(self.identities), len(self.activations), len(self.shifts)

    def posed(self, i: int) -> tuple[np.ndarray, np.ndarray, list]:
        """Identity ``i``'s (E + 1) poses: vertices, sample normals, ray-casting scenes."""
        if i in self._cache:
            return self._cache[i]
        from rigs.raycast import Scene

        verts, normals = self.subset.pose(self.model, self.identities[i], self.deltas, self.activations)
        posed = (verts, normals, [Scene(v, self.subset.triangles) for v in verts])
        if self.keep_scenes:
            self._cache[i] = posed
        return posed
