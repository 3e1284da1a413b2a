"""Facial regions on the template, for camera-placement scores (docs/camera-placement.md).

Every region is a set of vertices of the template's ``face`` part, chosen on the mean
neutral by 3-D distance to *anchors* built from the template's Multi-PIE 68 landmarks
(``FaceModel.landmarks68``; 36-41 and 17-21 are the subject's right eye and brow, 42-47
and 22-26 the left ones):

=========  =============================================================  ==========
region     anchors                                                        radius mm
=========  =============================================================  ==========
eye_R/L    the eye contour 36-41 / 42-47 (closed polyline: the lids)      6
brow_R/L   the brow polyline 17-21 / 22-26                                10
lips       the outer and inner lip contours 48-59, 60-67 (closed)         6
nose       the bridge 27-30 and the base 31-35 (polylines)                8
glabella   one point: the mean of 21, 22 and 27 (between the brows)       18
jaw        the lower jaw line 5-11 (chin and its sides)                   14
cheek_R/L  one point: the mean of 1, 31, 41, 48 / 15, 35, 46, 54          25
=========  =============================================================  ==========

Polylines are densified to 1 mm steps before distances are taken. A vertex near several
anchors goes to the first region of :data:`REGION_NAMES` that claims it (eyes before
brows before lips ...), so regions are disjoint. Each region keeps at most
``samples`` vertices by farthest-point sampling (deterministic, from the vertex nearest
the region's centroid): these are the region's sample points for visibility and its
keypoints for range of motion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import ModelError
from rigs.face_model import FaceModel

#: Region name -> (landmark polylines (each a tuple, closed if the first id repeats at the
#: end), or a single tuple whose mean is the one anchor point; radius in metres; mean-point anchor?)
_REGION_ANCHORS: dict[str, tuple[tuple[tuple[int, ...], ...], float, bool]] = {
    "eye_R": (((36, 37, 38, 39, 40, 41, 36),), 0.006, False),
    "eye_L": (((42, 43, 44, 45, 46, 47, 42),), 0.006, False),
    "brow_R": (((17, 18, 19, 20, 21),), 0.010, False),
    "brow_L": (((22, 23, 24, 25, 26),), 0.010, False),
    "lips": ((tuple(range(48, 60)) + (48,), tuple(range(60, 68)) + (60,)), 0.006, False),
    "nose": (((27, 28, 29, 30), (31, 32, 33, 34, 35)), 0.008, False),
    "glabella": (((21, 22, 27),), 0.018, True),
    "jaw": ((tuple(range(5, 12)),), 0.014, False),
    "cheek_R": (((1, 31, 41, 48),), 0.025, True),
    "cheek_L": (((15, 35, 46, 54),), 0.025, True),
}
#: Region names in claiming order (also the column order of every score table).
REGION_NAMES: tuple[str, ...] = tuple(_REGION_ANCHORS)


@dataclass(frozen=True, eq=False)
class Regions:
    """Facial regions and their sample points on a face model's template.

    Attributes:
        names: (R,) region names.
        vertices: per region, (n_r,) int template vertex ids of the whole region.
        samples: (P,) int template vertex ids of all sample points, region by region.
        sample_region: (P,) int region index of each sample point.
    """

    names: tuple[str, ...]
    vertices: tuple[np.ndarray, ...]
    samples: np.ndarray
    sample_region: np.ndarray

    def counts(self) -> dict[str, tuple[int, int]]:
        """Region name -> (vertices in the region, sample points kept)."""
        kept = np.bincount(self.sample_region, minlength=len(self.names))
        return {n: (len(v), int(k)) for n, v, k in zip(self.names, self.vertices, kept, strict=True)}


def _densify(points: np.ndarray, step: float = 0.001) -> np.ndarray:
    """(k, 3) polyline -> points every ``step`` metres along it (ends included)."""
    out = [points[:1]]
    for a, b in zip(points[:-1], points[1:], strict=True):
        n = max(1, int(np.ceil(np.linalg.norm(b - a) / step)))
        out.append(a + (b - a) * (np.arange(1, n + 1)[:, None] / n))
    return np.concatenate(out)


def _anchor_points(landmarks: np.ndarray, lines: tuple[tuple[int, ...], ...], mean_point: bool) -> np.ndarray:
    if mean_point:
        return landmarks[list(lines[0])].mean(0, keepdims=True)
    return np.concatenate([_densify(landmarks[list(line)]) for line in lines])


def farthest_point_sample(points: np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` points spread over ``points`` (n, 3) (all of them if n <= k).

    Starts from the point nearest the centroid, then repeatedly adds the point farthest
    from those chosen; deterministic.
    """
    n = len(points)
    if n <= k:
        return np.arange(n)
    chosen = [int(np.argmin(np.linalg.norm(points - points.mean(0), axis=1)))]
    dist = np.linalg.norm(points - points[chosen[0]], axis=1)
    for _ in range(k - 1):
        chosen.append(int(np.argmax(dist)))
        dist = np.minimum(dist, np.linalg.norm(points - points[chosen[-1]], axis=1))
    return np.sort(np.array(chosen))


def template_regions(model: FaceModel, samples: int = 64) -> Regions:
    """The regions of :data:`REGION_NAMES` on ``model``'s mean neutral (module docstring).

    Args:
        model: a face model with a ``face`` part and the 68 landmarks.
        samples: most sample points kept per region (>= 1).

    Raises:
        ModelError: the model lacks the part or the landmarks, or a region comes out empty.
    """
    if "face" not in model.part_names or len(model.landmarks68) != 68:
        raise ModelError(f"face model {model.name}: placement regions need a 'face' part and 68 landmarks")
    if samples < 1:
        raise ModelError(f"samples per region must be >= 1, got {samples}")
    face = model.part_vertices("face")
    positions = model.neutral[face].astype(np.float64)
    landmarks = model.neutral[model.landmarks68].astype(np.float64)
    free = np.ones(len(face), bool)
    vertices, sample_ids, sample_region = [], [], []
    for r, (lines, radius, mean_point) in enumerate(_REGION_ANCHORS.values()):
        anchors = _anchor_points(landmarks, lines, mean_point)
        near = np.full(len(face), np.inf)
        for chunk in np.array_split(np.arange(len(anchors)), max(1, len(anchors) // 64)):
            d = np.linalg.norm(positions[:, None] - anchors[chunk][None], axis=-1).min(1)
            near = np.minimum(near, d)
        members = np.flatnonzero(free & (near <= radius))
        if not members.size:
            raise ModelError(f"face model {model.name}: placement region {REGION_NAMES[r]} is empty")
        free[members] = False
        vertices.append(face[members])
        picked = face[members][farthest_point_sample(positions[members], samples)]
        sample_ids.append(picked)
        sample_region.append(np.full(len(picked), r))
    return Regions(REGION_NAMES, tuple(vertices), np.concatenate(sample_ids), np.concatenate(sample_region))
