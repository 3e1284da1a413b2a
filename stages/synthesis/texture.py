"""Skin albedo from a real photograph, mapped onto the template through landmarks.

ICT has no albedo. A real face photo (``aflw-test.jpg``, BSD-3-Clause) is mapped onto the
template once (:func:`build_photo_texture`, which needs MediaPipe) and shipped as
``rigs/data/skin_photo_texture.npz``:
1. MediaPipe finds the photo's 478 landmarks; the template's embedded landmarks are
   similarity-aligned to them in 3D (Umeyama), which undoes the photo's head pose;
2. a thin-plate spline corrects the remaining 2D misfit at the landmarks;
3. every template vertex thus gets a photo coordinate ("photo-space UVs") and a weight
   that fades to zero outside the face oval and on surfaces turned away from the photo.
Where the weight is below one, the albedo blends to the photo's median skin colour; the
eyes, teeth, gums and mouth socket get per-part albedos (the pupil is dark).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from rigs.face_model import FaceModel, load_ict_face_model
from rigs.raycast import GBuffer

TEXTURE_FILE = Path(__file__).resolve().parents[2] / "rigs" / "data" / "skin_photo_texture.npz"
#: Linear RGB albedo per part for surfaces the photo does not cover.
PART_ALBEDO = {
    "mouth_socket": (0.30, 0.09, 0.09),
    "eye_socket_left": (0.55, 0.30, 0.30),
    "eye_socket_right": (0.55, 0.30, 0.30),
    "gums_tongue": (0.62, 0.24, 0.24),
    "teeth": (0.86, 0.84, 0.76),
    "eyeball_left": (0.88, 0.86, 0.84),
    "eyeball_right": (0.88, 0.86, 0.84),
}
#: Row length of the 2-D layout a list of points is sampled in (OpenCV's map size limit).
REMAP_ROW = 1024
IRIS_ALBEDO = (0.30, 0.19, 0.11)
PUPIL_ALBEDO = (0.02, 0.02, 0.02)
IRIS_ANGLE = np.deg2rad(31.0)
PUPIL_ANGLE = np.deg2rad(12.0)


@dataclass(frozen=True, eq=False)
class PhotoTexture:
    """A photo and where each template vertex samples it.

    Attributes:
        photo: (H, W, 3) uint8 sRGB photograph.
        vertex_uv: (n, 2) float32 photo pixel coordinates of each vertex.
        vertex_weight: (n,) float32 in [0, 1], how much of the photo a vertex shows.
        vertex_albedo: (n, 3) float32 linear albedo where the photo is not used.
    """

    photo: np.ndarray
    vertex_uv: np.ndarray
    vertex_weight: np.ndarray
    vertex_albedo: np.ndarray

    @cached_property
    def photo_linear(self) -> np.ndarray:
        """(H, W, 3) float32 linear RGB of the photo."""
        return (self.photo.astype(np.float32) / 255.0) ** 2.2

    @cached_property
    def vertex_attributes(self) -> np.ndarray:
        """(n, 6) float32 per-vertex [photo x, photo y, photo weight, fallback albedo r, g, b]."""
        attrs = np.concatenate([self.vertex_uv, self.vertex_weight[:, None], self.vertex_albedo], 1)
        return attrs.astype(np.float32)

    def albedo(self, gbuf: GBuffer, triangles: np.ndarray, tint: np.ndarray | None = None) -> np.ndarray:
        """(H, W, 3) float32 linear albedo of every pixel that hit the mesh (0 elsewhere)."""
        px = gbuf.interpolate(triangles, self.vertex_attributes)
        w = px[..., 2:3]
        out = w * sample_image(self.photo_linear, px[..., 0], px[..., 1]) + (1 - w) * px[..., 3:6]
        if tint is not None:
            out = out * np.asarray(tint, np.float32)
        out[~gbuf.hit] = 0
        return out


def sample_image(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``image`` (H, W[, C]) float32 at pixel coordinates ``x``, ``y``.

    Args:
        x, y: (H', W') float32 maps, or (p,) lists (sampled in a folded 2-D layout, since
            OpenCV's maps must be under 32767 on a side). Outside the image the border repeats.

    Returns:
        (H', W'[, C]) or (p[, C]) float32.
    """
    import cv2

    if x.ndim != 1:
        return cv2.remap(image, x, y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    rows = -(-len(x) // REMAP_ROW)
    maps = np.zeros((2, rows * REMAP_ROW), np.float32)
    maps[0, : len(x)], maps[1, : len(x)] = x, y
    maps = maps.reshape(2, rows, REMAP_ROW)
    out = cv2.remap(image, maps[0], maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(rows * REMAP_ROW, *image.shape[2:])[: len(x)]


def _part_albedo(model: FaceModel, skin: np.ndarray) -> np.ndarray:
    albedo = np.tile(skin, (model.n_vertices, 1)).astype(np.float32)
    for part, rgb in PART_ALBEDO.items():
        albedo[model.part_vertices(part)] = rgb
    for eye, centre in zip(("left", "right"), model.eye_centres, strict=True):
        ids = model.part_vertices(f"eyeball_{eye}")
        d = model.neutral[ids] - centre
        angle = np.arccos(np.clip(d[:, 2] / np.linalg.norm(d, axis=1), -1, 1))
        albedo[ids[angle < IRIS_ANGLE]] = IRIS_ALBEDO
        albedo[ids[angle < PUPIL_ANGLE]] = PUPIL_ALBEDO
    return albedo


def build_photo_texture(photo_path: Path, model: FaceModel | None = None, feather_px: float = 12.0) -> PhotoTexture:
    """Maps ``photo_path`` onto ``model`` (needs MediaPipe; run once at build time)."""
    import cv2
    import mediapipe as mp
    from matplotlib.path import Path as PolyPath
    from scipy.interpolate import RBFInterpolator

    from rigs.geometry import similarity_fit
    from rigs.raycast import vertex_normals
    from stages.landmarks import FACE_OVAL

    model = model or load_ict_face_model()
    photo = cv2.imread(str(photo_path), cv2.IMREAD_COLOR)[:, :, ::-1].copy()
    h, w = photo.shape[:2]
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True, max_num_faces=1) as fm:
        result = fm.process(photo)
    if not result.multi_face_landmarks:
        raise ValueError(f"{photo_path}: MediaPipe found no face")
    lm = np.array([[p.x * w, p.y * h, p.z * w] for p in result.multi_face_landmarks[0].landmark])
    target = np.c_[lm[:, 0], -lm[:, 1], -lm[:, 2]]  # y up, z toward the camera
    emb = model.embeddings["mediapipe478"]
    tmpl = emb.points(model.neutral.astype(np.float64), model.triangles)
    s, rot, t = similarity_fit(tmpl[:468], target[:468])
    aligned = (s * (rot @ model.neutral.T)).T + t
    uv = np.c_[aligned[:, 0], -aligned[:, 1]]
    lm_uv = np.c_[(s * (rot @ tmpl.T)).T[:, 0] + t[0], -((s * (rot @ tmpl.T)).T[:, 1] + t[1])]
    warp = RBFInterpolator(lm_uv[:468], lm[:468, :2] - lm_uv[:468], kernel="thin_plate_spline", smoothing=1.0)
    uv = uv + warp(uv)

    oval_points = lm[list(FACE_OVAL), :2]
    inside = PolyPath(oval_points).contains_points(uv)
    edge = np.min(np.linalg.norm(uv[:, None] - oval_points[None], axis=2), axis=1)
    weight = np.where(inside, np.clip(edge / feather_px, 0, 1), 0.0)
    normals = vertex_normals(model.neutral.astype(np.float64), model.triangles) @ rot.T
    weight *= np.clip(normals[:, 2] / 0.3, 0, 1)
    weight[~np.isin(model.vertex_part, [model.part_names.index("face")])] = 0.0

    lin = (photo.astype(np.float64) / 255.0) ** 2.2
    sample_ids = np.flatnonzero(weight > 0.99)
    xy = np.clip(np.round(uv[sample_ids]).astype(int), 0, [w - 1, h - 1])
    skin = np.median(lin[xy[:, 1], xy[:, 0]], axis=0)
    return PhotoTexture(photo, uv.astype(np.float32), weight.astype(np.float32), _part_albedo(model, skin))


def save_photo_texture(tex: PhotoTexture, path: Path) -> None:
    np.savez_compressed(path, photo=tex.photo, vertex_uv=tex.vertex_uv, vertex_weight=tex.vertex_weight, vertex_albedo=tex.vertex_albedo)


@lru_cache(maxsize=1)
def load_default_texture() -> PhotoTexture:
    """The shipped photo texture for the embedded ICT model."""
    d = np.load(TEXTURE_FILE)
    return PhotoTexture(d["photo"], d["vertex_uv"], d["vertex_weight"], d["vertex_albedo"])


if __name__ == "__main__":
    import sys

    save_photo_texture(build_photo_texture(Path(sys.argv[1])), TEXTURE_FILE)
    print(f"wrote {TEXTURE_FILE} ({TEXTURE_FILE.stat().st_size} bytes)")
