"""Cheap plausibility checks of a posed rig against a reference posed the same way.

A synthetic true rig must stay physically plausible at full activation: skin triangles
do not flip, the lips and eyelids do not cross each other, and skin does not sink into
the rigid parts it lies against (eyeballs, teeth and gums). Generic rigs already break
these a little at some full activations (a fully rolled lip folds a few triangles), so
every check is *relative*: a pose of the checked rig fails only where it is worse than the
reference rig (the rig the style was added to) in the same pose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from rigs.deform import opening_loops
from rigs.face_model import FaceModel
from rigs.rig import EYELID_PAIRS, INNER_LIP_PAIRS

#: Parts whose surface others must not sink into, grouped by what moves them together.
CONTACT_GROUPS = (("eyeball_left",), ("eyeball_right",), ("teeth", "gums_tongue"))
#: Skin parts checked for flipped triangles, crossings and contact.
SKIN_PARTS = ("face", "head_neck", "mouth_socket", "eye_socket_left", "eye_socket_right")
#: Face vertices within this of a contact group at neutral (lids, lips) are checked
#: against it, metres. Only the face part: the sockets wrap behind eyeballs and gums.
CONTACT_RADIUS = 0.004
#: Group vertices (nearest at neutral) among which a skin vertex's contact point is sought.
CONTACT_CANDIDATES = 16
#: A vertex closer than this to its neutral position has not moved, metres.
STILL_M = 1e-8
#: A pose fails when it is worse than the reference by more than this, metres.
TOLERANCE_M = 0.0003
#: Openings whose two rims are checked for crossing, and the central fraction of their width.
OPENINGS = ("mouth_socket", "eye_socket_left", "eye_socket_right")
CENTRAL_FRACTION = 0.8
#: Multi-PIE 68 pairs (upper, lower) where the lips and lids meet, checked like the rims.
CONTACT_PAIRS = {
    "inner_lips": ((61, 67), *INNER_LIP_PAIRS, (63, 65)),
    "eyelids_left": EYELID_PAIRS["left"],
    "eyelids_right": EYELID_PAIRS["right"],
}


@dataclass(frozen=True, eq=False)
class RimPairs:
    """Vertex pairs across one opening: an upper-rim vertex and the lower-rim one below it.

    Attributes:
        upper: (p,) int vertex ids on the upper rim.
        lower: (p,) int vertex ids on the lower rim, at the nearest x.
    """

    upper: np.ndarray
    lower: np.ndarray


@dataclass(frozen=True, eq=False)
class ContactGroup:
    """A rigid part group and the face vertices lying against it.

    Attributes:
        ids: (g,) the group's vertex ids.
        triangles: (t, 3) its triangles.
        incidence: (g, t) sparse 0/1, which triangles each group vertex belongs to (sums
            area-weighted face normals into vertex normals).
        skin: (c,) face vertex ids within :data:`CONTACT_RADIUS` of it at neutral.
        candidates: (c, k) indices into ``ids``: each skin vertex's nearest group vertices
            at neutral, among which its nearest posed one is taken (the skin lying on a
            rigid part slides along it by millimetres, not centimetres).
    """

    ids: np.ndarray
    triangles: np.ndarray
    incidence: sp.csr_matrix
    skin: np.ndarray
    candidates: np.ndarray
    last: list[np.ndarray] = field(default_factory=list)  # [positions, normals] of the last call

    def normals(self, vertices: np.ndarray) -> np.ndarray:
        """(g, 3) unit vertex normals of the posed group (recomputed only when it moved)."""
        here = vertices[self.ids]
        if self.last and np.array_equal(self.last[0], here):
            return self.last[1]
        v = vertices[self.triangles]
        n = self.incidence @ np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-20)
        self.last[:] = [here, n]
        return n


def contact_group(group: tuple[str, ...], neutral: np.ndarray, model: FaceModel) -> ContactGroup:
    ids = model.part_vertices(*group)
    triangles = model.triangles[model.part_triangle_mask(*group)]
    local = np.searchsorted(ids, triangles)  # ids are sorted; triangles lie in the group
    rows = local.ravel()
    cols = np.repeat(np.arange(len(triangles)), 3)
    incidence = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(ids), len(triangles)))
    skin = model.part_vertices("face")
    tree = cKDTree(neutral[ids])
    dist, _ = tree.query(neutral[skin])
    skin = skin[dist < CONTACT_RADIUS]
    _, candidates = tree.query(neutral[skin], k=CONTACT_CANDIDATES)
    return ContactGroup(ids, triangles, incidence, skin, candidates.reshape(len(skin), -1))


@dataclass(frozen=True, eq=False)
class Probe:
    """What the checks need from the neutral mesh, computed once per subject.

    Attributes:
        neutral: (n, 3) float64 the neutral vertices.
        triangles: (s, 3) skin triangles.
        normals: (s, 3) their unit normals at neutral.
        rims: opening or landmark-pair set name -> its upper/lower vertex pairs.
        contacts: the contact groups.
    """

    neutral: np.ndarray
    triangles: np.ndarray
    normals: np.ndarray
    rims: dict[str, RimPairs]
    contacts: tuple[ContactGroup, ...]


def rim_pairs(loop: np.ndarray, neutral: np.ndarray) -> RimPairs:
    """Splits an opening's loop at its corners (extreme x) into upper and lower rims and
    pairs each central upper vertex with the lower vertex at the nearest x.

    Args:
        loop: (k,) ordered vertex ids around the opening.
        neutral: (n, 3) vertices.
    """
    x = neutral[loop, 0]
    a, b = sorted((int(np.argmin(x)), int(np.argmax(x))))
    rims = [loop[a:b + 1], np.concatenate([loop[b:], loop[:a + 1]])]
    upper, lower = sorted(rims, key=lambda r: -neutral[r, 1].mean())
    centre, half = (x.max() + x.min()) / 2, (x.max() - x.min()) / 2
    upper = upper[np.abs(neutral[upper, 0] - centre) <= CENTRAL_FRACTION * half]
    nearest = np.abs(neutral[upper, 0][:, None] - neutral[lower, 0][None]).argmin(1)
    return RimPairs(upper, lower[nearest])


def make_probe(neutral: np.ndarray, model: FaceModel) -> Probe:
    """Precomputes the skin triangles, rim pairs and contact vertices of a neutral mesh.

    Args:
        neutral: (n, 3) neutral vertices of the rig to check.
    """
    neutral = np.asarray(neutral, np.float64)
    skin_tri = model.part_triangle_mask(*SKIN_PARTS)
    triangles = model.triangles[skin_tri]
    loops = opening_loops(model.triangles, model.vertex_part, model.part_names, sockets=OPENINGS)
    rims = {name: rim_pairs(loop, neutral) for name, loop in loops.items()}
    for name, pairs in CONTACT_PAIRS.items():
        ids = model.landmarks68[np.asarray(pairs)]
        rims[name] = RimPairs(ids[:, 0], ids[:, 1])
    contacts = tuple(contact_group(group, neutral, model) for group in CONTACT_GROUPS)
    return Probe(neutral, triangles, _triangle_normals(neutral, triangles), rims, contacts)


def _triangle_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    v = vertices[triangles]
    n = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-20)


def flipped(probe: Probe, vertices: np.ndarray, among: np.ndarray | None = None) -> np.ndarray:
    """(s,) bool, skin triangles whose normal turned by more than 90 degrees from neutral.

    Args:
        vertices: (n, 3) posed vertices.
        among: optional (s,) bool, the only triangles tested (others count as not flipped).
    """
    moved = (np.abs(vertices - probe.neutral) > STILL_M).any(1)[probe.triangles].any(1)
    if among is not None:
        moved &= among
    out = np.zeros(len(probe.triangles), bool)
    out[moved] = (_triangle_normals(vertices, probe.triangles[moved]) * probe.normals[moved]).sum(1) <= 0.0
    return out


def rim_crossing(probe: Probe, vertices: np.ndarray) -> dict[str, np.ndarray]:
    """Per opening, how far (metres, >= 0) each upper-rim vertex has sunk below its
    lower-rim partner, (p,)."""
    return {name: np.maximum(0.0, vertices[r.lower, 1] - vertices[r.upper, 1]) for name, r in probe.rims.items()}


def contact_depth(probe: Probe, vertices: np.ndarray) -> list[np.ndarray]:
    """Per contact group, how deep (metres, >= 0) each nearby face vertex lies behind the
    tangent plane of the posed group's nearest vertex (the group's vertex normals give the
    outside), (c,)."""
    out = []
    for group in probe.contacts:
        surface = vertices[group.ids]
        normals = group.normals(vertices)
        skin = vertices[group.skin]
        near = ((surface[group.candidates] - skin[:, None]) ** 2).sum(-1).argmin(1)
        j = group.candidates[np.arange(len(skin)), near]
        out.append(np.maximum(0.0, -((skin - surface[j]) * normals[j]).sum(1)))
    return out


@dataclass(frozen=True, eq=False)
class Measures:
    """The checked quantities of one posed rig.

    Attributes:
        flipped: (s,) bool, flipped skin triangles.
        crossing: per rim set, (p,) crossing depth of each pair, metres.
        contact: per contact group, (c,) sinking depth of each nearby face vertex, metres.
    """

    flipped: np.ndarray
    crossing: dict[str, np.ndarray]
    contact: list[np.ndarray]


def measure(probe: Probe, vertices: np.ndarray) -> Measures:
    """The checked quantities of a posed rig, (n, 3) vertices."""
    vertices = np.asarray(vertices, np.float64)
    return Measures(flipped(probe, vertices), rim_crossing(probe, vertices), contact_depth(probe, vertices))


@dataclass(frozen=True)
class Verdict:
    """What a posed rig breaks that the reference rig in the same pose does not.

    Attributes:
        problems: one line per broken check (empty when plausible).
        vertices: (b,) int ids of the vertices at fault (corners of new flips, crossing rim
            vertices, sinking face vertices).
    """

    problems: list[str]
    vertices: np.ndarray


def violations(probe: Probe, vertices: np.ndarray, reference: np.ndarray, measured: Measures | None = None) -> Verdict:
    """Checks a posed rig against the reference rig in the same pose.

    Args:
        vertices: (n, 3) the checked rig, posed.
        reference: (n, 3) the reference rig in the same pose.
        measured: :func:`measure` of ``reference`` if already known (it is reused across
            the attempts at one pose).
    """
    vertices = np.asarray(vertices, np.float64)
    reference = np.asarray(reference, np.float64)
    ref = measured or measure(probe, reference)
    problems, bad = [], []
    changed = (np.abs(vertices - reference) > STILL_M).any(1)[probe.triangles].any(1)
    new_flips = flipped(probe, vertices, among=changed) & ~ref.flipped
    if new_flips.any():
        problems.append(f"{int(new_flips.sum())} skin triangles flip")
        bad.append(probe.triangles[new_flips].ravel())
    for name, depth in rim_crossing(probe, vertices).items():
        limit = ref.crossing[name].max()
        if depth.max() > limit + TOLERANCE_M:
            problems.append(f"{name} rims cross by {depth.max() * 1e3:.2f} mm (reference {limit * 1e3:.2f})")
            r, at = probe.rims[name], depth > limit + TOLERANCE_M
            bad += [r.upper[at], r.lower[at]]
    for group, depth, ref_depth in zip(probe.contacts, contact_depth(probe, vertices), ref.contact, strict=True):
        limit = ref_depth.max(initial=0.0)
        if depth.max(initial=0.0) > limit + TOLERANCE_M:
            problems.append(f"skin sinks {depth.max() * 1e3:.2f} mm into a rigid part (reference {limit * 1e3:.2f})")
            bad.append(group.skin[depth > limit + TOLERANCE_M])
    return Verdict(problems, np.unique(np.concatenate(bad)) if bad else np.zeros(0, np.int64))
