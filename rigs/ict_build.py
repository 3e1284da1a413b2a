"""One-time conversion of ICT Face Model Light into the package's compact data files.

Run: ``python -m rigs.ict_build ../shared/data/ict-facekit rigs/data``

What is kept and why:
- every part an HMC camera can see (face, head and neck, mouth socket, eye sockets, gums
  and tongue, teeth, eyeballs); the lacrimal fluid, eye blend, eye occlusion and eyelash
  strips are dropped: they are transparent shading helpers that a ray caster would treat
  as opaque and that no fit uses;
- all 100 identity modes, stored as int8 with one float32 scale per mode (quantisation
  error <= 0.053 mm, measured below), because the fit's identity space is all of them;
- the 53 canonical expression shapes as float16 metres (error <= 17 um at 3.5 cm).
Units are converted from centimetres to metres. Quads are split into triangles.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

CM_TO_M = 0.01
#: Inclusive vertex ranges of the kept parts (ICT README); the rest are dropped.
KEPT_PARTS: tuple[tuple[str, int, int], ...] = (
    ("face", 0, 9408),
    ("head_neck", 9409, 11247),
    ("mouth_socket", 11248, 13293),
    ("eye_socket_left", 13294, 13677),
    ("eye_socket_right", 13678, 14061),
    ("gums_tongue", 14062, 17038),
    ("teeth", 17039, 21450),
    ("eyeball_left", 21451, 23020),
    ("eyeball_right", 23021, 24590),
)
N_KEPT = KEPT_PARTS[-1][2] + 1
#: Within each eyeball the first 770 vertices are sclera, the next 800 iris (ICT README).
N_SCLERA = 770


def parse_obj(path: Path) -> tuple[np.ndarray, np.ndarray, list[list[int]], list[list[int]]]:
    """Reads positions, UVs and polygon (vertex, uv) index lists of an OBJ file (0-based).

    Not :func:`rigs.geometry.read_obj`: trimesh stores one UV per vertex, so on this
    file's UV seams it splits the 26 719 vertices into 257 701 and loses the vertex
    numbering that ``KEPT_PARTS`` and ``vertex_indices.json`` refer to.
    """
    positions, uvs, faces, face_uvs = [], [], [], []
    with open(path) as f:
        for line in f:
            if line.startswith("v "):
                positions.append([float(x) for x in line.split()[1:4]])
            elif line.startswith("vt "):
                uvs.append([float(x) for x in line.split()[1:3]])
            elif line.startswith("f "):
                corners = [c.split("/") for c in line.split()[1:]]
                faces.append([int(c[0]) - 1 for c in corners])
                face_uvs.append([int(c[1]) - 1 for c in corners])
    return np.asarray(positions), np.asarray(uvs), faces, face_uvs


def triangulate(polys: list[list[int]]) -> np.ndarray:
    """Fan-splits polygons into triangles. Returns (m, 3) int."""
    tris = [[p[0], p[i], p[i + 1]] for p in polys for i in range(1, len(p) - 1)]
    return np.asarray(tris, dtype=np.int64)


def sphere_fit(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares sphere through (n, 3) points. Returns (centre (3,), radius)."""
    a = np.c_[2 * points, np.ones(len(points))]
    b = (points**2).sum(1)
    sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    centre = sol[:3]
    return centre, float(np.sqrt(sol[3] + centre @ centre))


def build(src: Path, dst: Path) -> dict:
    """Converts ``src`` (the ICT folder) into ``dst`` (package data). Returns size facts."""
    dst.mkdir(parents=True, exist_ok=True)
    shapes = np.load(src / "shapes.npz")
    indices = json.loads((src / "vertex_indices.json").read_text())
    positions, uvs, polys, poly_uvs = parse_obj(src / "generic_neutral_mesh.obj")
    if not np.allclose(positions, shapes["neutral"], atol=1e-4):
        raise ValueError("OBJ neutral and shapes.npz neutral disagree")

    tris, tri_uv = triangulate(polys), triangulate(poly_uvs)
    keep = (tris < N_KEPT).all(1)
    tris, tri_uv = tris[keep], tri_uv[keep]
    used_uv = np.unique(tri_uv)
    uv_remap = np.full(len(uvs), -1, np.int64)
    uv_remap[used_uv] = np.arange(len(used_uv))

    neutral = shapes["neutral"][:N_KEPT].astype(np.float64) * CM_TO_M
    vertex_part = np.zeros(N_KEPT, np.int8)
    for part_id, (_, first, last) in enumerate(KEPT_PARTS):
        vertex_part[first : last + 1] = part_id
    eye_centres, eye_radii = [], []
    for name in ("eyeball_left", "eyeball_right"):
        first = next(p[1] for p in KEPT_PARTS if p[0] == name)
        centre, radius = sphere_fit(neutral[first : first + N_SCLERA])
        eye_centres.append(centre)
        eye_radii.append(radius)

    names = list(indices["expressions"])
    all_names = [str(n) for n in shapes["expression_names"]]
    order = [all_names.index(n) for n in names]
    expression = shapes["expression"][order, :N_KEPT] * CM_TO_M
    identity = shapes["identity"][:, :N_KEPT] * CM_TO_M
    scale = np.abs(identity).reshape(len(identity), -1).max(1) / 127.0
    identity_q = np.round(identity / scale[:, None, None]).astype(np.int8)
    quant_err = np.abs(identity_q * scale[:, None, None] - identity).max()

    np.savez_compressed(
        dst / "ict_mesh.npz",
        neutral=neutral.astype(np.float32),
        triangles=tris.astype(np.int32),
        uv=uvs[used_uv].astype(np.float32),
        triangle_uv=uv_remap[tri_uv].astype(np.int32),
        vertex_part=vertex_part,
        part_names=np.array([p[0] for p in KEPT_PARTS]),
        n_sclera=np.int32(N_SCLERA),
        eye_centres=np.asarray(eye_centres, np.float32),
        eye_radii=np.asarray(eye_radii, np.float32),
        landmarks68=np.asarray(indices["idx_to_landmark_verts"], np.int32),
        fitting_vertices=np.asarray(indices["idx_to_fitting_verts"], np.int32),
        rigid_vertices=np.asarray(indices["idx_to_rigid_verts"], np.int32),
    )
    np.savez_compressed(
        dst / "ict_expressions.npz",
        names=np.array(names),
        deltas=expression.astype(np.float16),
    )
    np.savez_compressed(dst / "ict_identity.npz", modes_q=identity_q, scale=scale.astype(np.float32))
    shutil.copyfile(src / "LICENSE", dst / "LICENSE-ICT-FaceKit")
    facts = {
        "vertices": int(N_KEPT),
        "triangles": int(len(tris)),
        "identity_modes": int(len(identity)),
        "identity_quantisation_error_mm": float(quant_err * 1000),
        "expression_float16_error_mm": float(
            np.abs(expression.astype(np.float16).astype(np.float64) - expression).max() * 1000
        ),
        "bytes": {p.name: p.stat().st_size for p in sorted(dst.glob("ict_*.npz"))},
    }
    (dst / "ict_build_facts.json").write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
    return facts


if __name__ == "__main__":
    print(json.dumps(build(Path(sys.argv[1]), Path(sys.argv[2])), indent=2))
