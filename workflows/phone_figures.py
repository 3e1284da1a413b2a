"""Pictures of the phone-scan geometry chain, each beside the truth (docs/img/, QA report).

For one subject of a run:

- ``phone_mask.png``: the refined face mask on a phone frame | the true face region (the
  true mesh's face-region triangles, :mod:`stages.geometry_eval`, ray cast through the
  true camera), with their IoU;
- ``phone_fused.png``: the fused scan, shaded, from its reference camera | the true mesh
  from the same camera;
- ``phone_fit_error.png``: the refined (else fitted) mesh coloured by per-vertex error
  against the true mesh on the face region (mm, after the rigid alignment of
  :func:`stages.geometry_eval.vertex_error_rigid`), with a colour bar | the true mesh;
- ``phone_texture.png``: the baked UV texture (unseen texels dark grey) above the true
  albedo baked into the same atlas.

Functions take artifacts (``StageOutput`` or typed outputs) and truth and return RGB
images; :func:`write_phone_figures` finds them in a run. Run::

    python -m workflows.phone_figures RUN_OUT TRUTH_ROOT OUT [--subject S] [--expression E] [--frame F]

``RUN_OUT`` is the engine's output root (``pgt label --out``); ``TRUTH_ROOT`` holds
``<subject>/`` truth folders (``ground_truth/``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.errors import StageError
from rigs.camera import Camera, PinholeIntrinsics
from rigs.raycast import Scene, vertex_normals
from workflows.figures import _label

#: Colour scale of the error pictures: 0 .. ERROR_VMAX_MM (clipped above), matplotlib map.
ERROR_VMAX_MM = 3.0
ERROR_CMAP = "viridis"
BACKGROUND = (40, 40, 40)


# ------------------------------------------------------------------------ building blocks


def camera_from_pose(intrinsics: Any, camera_from_head: np.ndarray) -> Camera:
    """A distortion-free camera from intrinsics (``.K``, width, height) and a (3|4, 4) pose
    x_cam = R x_head + t."""
    k = np.asarray(intrinsics.K, dtype=np.float64)
    pose = np.asarray(camera_from_head, dtype=np.float64)
    r, t = pose[:3, :3], pose[:3, 3]
    intr = PinholeIntrinsics(int(intrinsics.width), int(intrinsics.height), k[0, 0], k[1, 1], k[0, 2], k[1, 2])
    return Camera(intr, R_world_from_camera=r.T, t_world_from_camera=-r.T @ t)


def shaded(vertices: np.ndarray, triangles: np.ndarray, camera: Camera,
           colours: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Renders a mesh: (H, W, 3) uint8 image and (H, W) int64 triangle ids (-1 = background).

    Without ``colours`` the mesh is grey clay lit from the camera (Lambert); with
    ``colours`` ((n, 3) float in [0, 1] per vertex) they are shown unlit, as given.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    triangles = np.asarray(triangles)
    g = Scene(vertices, triangles).render(camera)
    img = np.empty((*g.triangle.shape, 3), np.float32)
    img[:] = np.array(BACKGROUND) / 255.0
    if colours is None:
        n = g.interpolate(triangles, vertex_normals(vertices, triangles))
        n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-9)
        lambert = np.abs((n * g.directions).sum(-1))  # two-sided: scans have no outside
        img[g.hit] = (0.15 + 0.8 * lambert[g.hit])[:, None] * np.array([0.85, 0.82, 0.78])
    else:
        img[g.hit] = g.interpolate(triangles, np.asarray(colours, np.float32))[g.hit]
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), g.triangle


def error_colours(error_mm: np.ndarray, vmax_mm: float = ERROR_VMAX_MM) -> np.ndarray:
    """(n,) mm -> (n, 3) float RGB in [0, 1] on :data:`ERROR_CMAP`; NaN (not measured) grey."""
    import matplotlib

    e = np.asarray(error_mm, dtype=np.float64)
    rgb = matplotlib.colormaps[ERROR_CMAP](np.clip(np.nan_to_num(e) / vmax_mm, 0, 1))[:, :3]
    rgb[~np.isfinite(e)] = 0.55
    return rgb


def colour_bar(height: int, vmax_mm: float = ERROR_VMAX_MM, width: int = 90) -> np.ndarray:
    """(height, width, 3) uint8 vertical colour bar, 0 mm at the bottom, ticks each mm."""
    top, bottom = 50, height - 20
    bar = np.full((height, width, 3), BACKGROUND, np.uint8)
    cv2.putText(bar, "mm", (8, top - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (230, 230, 230), 1, cv2.LINE_AA)
    values = np.linspace(vmax_mm, 0, bottom - top)
    bar[top:bottom, 8:30] = (error_colours(values, vmax_mm) * 255 + 0.5).astype(np.uint8)[:, None]
    for tick in range(int(vmax_mm) + 1):
        y = int(round(bottom - 1 - tick / vmax_mm * (bottom - top - 1)))
        cv2.line(bar, (30, y), (36, y), (230, 230, 230), 1)
        cv2.putText(bar, f"{tick}" + ("+" if tick == int(vmax_mm) else ""), (38, y + 5),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, (230, 230, 230), 1, cv2.LINE_AA)
    return bar


def beside(*images: np.ndarray, labels: tuple[str, ...] = ()) -> np.ndarray:
    """Images side by side (padded to one height), each labelled at its top left."""
    h = max(i.shape[0] for i in images)
    tiles = []
    for k, img in enumerate(images):
        img = img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
        pad = np.full((h - img.shape[0], img.shape[1], 3), BACKGROUND, np.uint8)
        tile = np.vstack([img, pad])
        tiles.append(_label(tile, labels[k]) if k < len(labels) and labels[k] else tile)
    return np.hstack(tiles)


def frontal_camera(vertices: np.ndarray, width: int = 480, height: int = 560) -> Camera:
    """A camera 0.6 m in front of the face (+z of the head frame), looking at its centre."""
    centre = np.asarray(vertices, np.float64).mean(axis=0)
    return Camera.look_at(centre + np.array([0.0, 0.0, 0.6]), centre, np.array([0.0, 1.0, 0.0]),
                          width=width, height=height, focal=1.6 * width)


# ------------------------------------------------------------------------ the four figures


def true_face_mask(truth_vertices: np.ndarray, model: Any, camera: Camera) -> np.ndarray:
    """(H, W) bool pixels where the true mesh's face region (the triangles of
    :func:`stages.geometry_eval.face_region`) is the first surface hit."""
    from stages.geometry_eval import face_region, face_region_triangles

    _, tri = shaded(truth_vertices, model.triangles, camera)
    face_tri = face_region_triangles(model.triangles, face_region(model))
    return (tri >= 0) & face_tri[np.maximum(tri, 0)]


def mask_figure(rgb: np.ndarray, refined: np.ndarray, true_mask: np.ndarray) -> tuple[np.ndarray, float]:
    """Refined mask over the frame | the true face region; returns the image and the IoU."""
    def overlay(mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
        out = rgb.astype(np.float32)
        out[mask] = 0.55 * out[mask] + 0.45 * np.array(colour)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        out = out.astype(np.uint8)
        cv2.drawContours(out, contours, -1, colour, 1, cv2.LINE_AA)
        return out

    union = (refined | true_mask).sum()
    iou = float((refined & true_mask).sum() / union) if union else 0.0
    return beside(overlay(refined, (0, 255, 0)), overlay(true_mask, (255, 0, 255)),
                  labels=(f"refined mask (IoU {iou:.2f})", "true face region")), iou


def fused_figure(fused_vertices: np.ndarray, fused_triangles: np.ndarray, true_vertices: np.ndarray,
                 true_pose: np.ndarray, triangles: np.ndarray, intrinsics: Any) -> np.ndarray:
    """The fused scan (reference camera frame) | the true mesh placed by the true pose, both
    seen by the reference camera."""
    from stages.geometry_eval import place

    cam = camera_from_pose(intrinsics, np.eye(4))
    scan, _ = shaded(fused_vertices, fused_triangles, cam)
    true, _ = shaded(place(true_vertices, true_pose), triangles, cam)
    return beside(scan, true, labels=("fused scan", "true mesh"))


def fit_error_figure(est_vertices: np.ndarray, true_vertices: np.ndarray, model: Any,
                     vmax_mm: float = ERROR_VMAX_MM, label: str = "fit") -> tuple[np.ndarray, np.ndarray]:
    """The estimate coloured by per-vertex error on the face region (rigidly aligned to the
    truth; grey = not measured) | colour bar | the true mesh, from a frontal camera.

    Returns:
        The image and the (n,) per-vertex error in mm (NaN outside the face region).
    """
    from stages.geometry_eval import face_region, vertex_error_rigid
    from stages.metrics_geometry import rigid_fit

    region = face_region(model)
    err = np.full(len(true_vertices), np.nan)
    err[region] = vertex_error_rigid(est_vertices, true_vertices, region).per_vertex_mm
    r, t = rigid_fit(np.asarray(est_vertices, np.float64)[region], np.asarray(true_vertices, np.float64)[region])
    cam = frontal_camera(np.asarray(true_vertices)[region])
    coloured, _ = shaded(np.asarray(est_vertices, np.float64) @ r.T + t, model.triangles, cam, error_colours(err, vmax_mm))
    true, _ = shaded(true_vertices, model.triangles, cam)
    med = float(np.nanmedian(err))
    return beside(coloured, colour_bar(coloured.shape[0], vmax_mm), true,
                  labels=(f"{label}: per-vertex error, median {med:.2f} mm", "", "true mesh")), err


def true_albedo_uv(raster: Any, model: Any, tint: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 sRGB: the synthetic subject's true albedo baked into a UV atlas.

    Args:
        raster: a ``rigs.uv_raster.UvRaster`` of ``model``'s triangles.
        model: the face model.
        tint: the subject's skin tint (truth ``subject.json``), as the phone renderer applies.
    """
    from rigs.raycast import GBuffer
    from stages.synthesis.texture import load_default_texture

    texture = load_default_texture()
    k = len(raster.texel)
    # The covered texels as the "pixels" of a G-buffer, so the renderer's own albedo lookup
    # applies; laid out 1024 wide (OpenCV's remap takes images under 32767 pixels a side).
    w = 1024
    h = -(-k // w)
    tri = np.full(h * w, -1, np.int64)
    tri[:k] = raster.triangle
    bary = np.zeros((h * w, 3), np.float32)
    bary[:k] = raster.barycentric
    zeros = np.zeros((h, w), np.float32)
    g = GBuffer(triangle=tri.reshape(h, w), barycentric=bary.reshape(h, w, 3), distance=zeros, depth=zeros,
                points=np.zeros((h, w, 3), np.float32), directions=np.zeros((h, w, 3), np.float32),
                geometry=np.zeros((h, w), np.int64))
    linear = texture.albedo(g, model.triangles, tint).reshape(-1, 3)[:k]
    srgb = (np.clip(linear, 0, 1) ** (1 / 2.2) * 255 + 0.5).astype(np.uint8)
    return raster.scatter(srgb, fill=BACKGROUND[0])


def texture_figure(texture_rgba: np.ndarray, true_rgb: np.ndarray, max_width: int = 1024) -> np.ndarray:
    """Baked texture (unseen texels dark grey) above the true albedo in the same atlas
    (atlases are wide strips of UV tiles), scaled down to ``max_width``."""
    baked = np.where(texture_rgba[..., 3:4] > 0, texture_rgba[..., :3], np.uint8(BACKGROUND[0]))
    img = np.vstack([_label(baked, "baked UV texture"), _label(true_rgb, "true albedo")])
    if img.shape[1] > max_width:
        img = cv2.resize(img, None, fx=max_width / img.shape[1], fy=max_width / img.shape[1], interpolation=cv2.INTER_AREA)
    return img


# ------------------------------------------------------------------------ a run's subject


def find_outputs(run_out: Path, subject: str | None, run_id: str | None = None) -> tuple[str, str, dict[str, Any]]:
    """(subject, capture path, {stage: loaded artifact}) of a subject fused in an output
    root (default: the first such subject), each stage's artifact from the newest run
    that finished it (or from the given run)."""
    from pipeline.outputs import RunOutputs

    outputs = RunOutputs(str(run_out), run_id)
    subjects = [s for s in outputs.subjects("fusion") if subject is None or s == subject]
    if not subjects:
        raise StageError(f"{run_out}: no run with a fused subject {subject or ''}".rstrip())
    sid = subjects[0]
    loaded = {st: outputs.load(st, sid) for (st, s) in outputs.keys if s == sid}
    return sid, outputs.captures.get(sid, ""), loaded


def write_phone_figures(run_out: Path, truth_root: Path, out: Path, subject: str | None = None,
                        expression: str | None = None, frame: int | None = None) -> list[Path]:
    """Writes the four pictures (those whose stages ran) into ``out``; returns their paths."""
    from stages.face_mask import RefinedMasks
    from stages.fusion import FusedScans
    from stages.synthesis.truth import SubjectTruth
    from storage.capture import Capture

    sid, capture_path, outputs = find_outputs(run_out, subject)
    capture, truth = Capture.open(capture_path), SubjectTruth.open(truth_root / sid)
    model = truth.rig.model
    fused = FusedScans.from_output(outputs["fusion"])
    ok = [e for e, f in fused.expressions.items() if f.ok]
    expression = expression or ("jaw_drop_max" if "jaw_drop_max" in ok else ok[0])
    f = fused.expressions[expression]
    frame = f.reference if frame is None else frame
    ex = truth.expressions()
    true_vertices = ex["vertices"][[str(p) for p in ex["prompts"]].index(expression)]
    pose = truth.phone(expression)["head_in_camera"]
    intr = capture.phone_intrinsics(expression)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    masks = RefinedMasks.from_output(outputs["face_mask"]).expressions[expression]
    rgb = capture.read_phone_frame(expression, frame).rgb
    img, _ = mask_figure(rgb, masks.mask(frame), true_face_mask(true_vertices, model, camera_from_pose(intr, pose[frame])))
    written.append(_save(out / "phone_mask.png", img))
    written.append(_save(out / "phone_fused.png", fused_figure(
        f.vertices, f.triangles, true_vertices, pose[f.reference], model.triangles, intr)))
    mesh_stage = "refine" if "refine" in outputs else "fit" if "fit" in outputs else None
    if mesh_stage and f"{expression}.vertices" in outputs[mesh_stage].arrays:
        img, _ = fit_error_figure(outputs[mesh_stage].arrays[f"{expression}.vertices"], true_vertices, model,
                                  label=f"{mesh_stage} ({expression})")
        written.append(_save(out / "phone_fit_error.png", img))
    if "texture" in outputs:
        from rigs.uv_raster import rasterize_uv

        arr = outputs["texture"].arrays
        bgra = cv2.imdecode(np.asarray(arr["texture_png"], np.uint8), cv2.IMREAD_UNCHANGED)
        res = int(outputs["texture"].meta["resolution"])
        # Every triangle the texture's own atlas covers, except the eyeballs (their UVs
        # overlap the face tile).
        tri = np.flatnonzero(~model.part_triangle_mask("eyeball_left", "eyeball_right"))
        raster = rasterize_uv(model.uv, model.triangle_uv, res, bgra.shape[1] // res, tri)
        true_rgb = true_albedo_uv(raster, model, np.asarray(truth.meta["tint"], np.float32))
        written.append(_save(out / "phone_texture.png", texture_figure(bgra[..., [2, 1, 0, 3]], true_rgb)))
    return written


def _save(path: Path, rgb: np.ndarray) -> Path:
    cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_out", type=Path, help="the engine's output root of a run over the subject")
    p.add_argument("truth", type=Path, help="ground_truth/ folder holding <subject>/")
    p.add_argument("out", type=Path, help="folder for the PNGs (docs/img)")
    p.add_argument("--subject"), p.add_argument("--expression"), p.add_argument("--frame", type=int)
    a = p.parse_args()
    for path in write_phone_figures(a.run_out, a.truth, a.out, a.subject, a.expression, a.frame):
        print(path)


if __name__ == "__main__":
    main()
