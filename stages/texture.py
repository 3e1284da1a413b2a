"""The subject's UV texture: phone RGB fused into the template's UV atlas (issue 7 step 5).

For each refined expression mesh (head frame) and each frame fusion registered, the
texels of the atlas (:mod:`rigs.uv_raster`) are placed on the mesh, projected into the
frame, tested for visibility against the mesh's own depth rendered from that camera, and
bilinearly sample the frame's RGB in linear light. Each observation is weighted by
``cos(view angle) ** angle_power``; the texture is the weighted mean over all frames of all
expressions (UVs correspond across expressions), each frame divided by its exposure gain
against what was baked before it. Texels that no frame sees have confidence 0 and alpha
0 in the RGBA PNG. The per-frame work is in :mod:`stages.texture_bake`. The method, config and measured accuracy are in docs/texture.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline.config import check_fields, config_section
from pipeline.errors import ConfigError, StageError
from rigs.uv_raster import UvRaster, model_uv_raster
from stages.texture_bake import (
    SRGB8_TO_LINEAR,
    View,
    bake,
    camera_from_pose,
    encode_srgb8,
    fill_gutter,
    frontalness,
    sample_texture,
)

#: Which model parts own texels. ICT maps each eyeball onto its own full unit square,
#: on top of the face tile, so eyeballs never own texels (they still occlude).
Atlas = Literal["head", "head_mouth"]
ATLAS_PARTS: dict[str, tuple[str, ...]] = {
    "head": ("face", "head_neck", "mouth_socket", "eye_socket_left", "eye_socket_right"),
    "head_mouth": ("face", "head_neck", "mouth_socket", "eye_socket_left", "eye_socket_right",
                   "gums_tongue", "teeth"),
}
#: PNG compression level of the texture (fixed: the bytes are reproducible).
PNG_COMPRESSION = 6


@dataclass(frozen=True)
class TextureConfig:
    """The UV texture baked from the phone frames (issue 7 step 5)."""

    resolution: int = 512
    """Texels per UV tile side; the atlas is resolution x (tiles * resolution). A 480 x 640
    phone frame at 0.3-0.38 m puts about 400 pixels across the face, which the face tile
    at 512 matches. In [64, 4096]."""
    atlas: Atlas = "head_mouth"
    """Parts that own texels: "head" (face, head and neck, eye and mouth sockets: 2 tiles)
    or "head_mouth" (plus gums, tongue and teeth: 4 tiles). Eyeballs never do (their UVs
    overlap the face tile)."""
    angle_power: float = 2.0
    """An observation weighs cos(view angle) ** angle_power (0 = all visible views equal). >= 0."""
    min_cos: float = 0.3
    """Observations whose cos(view angle) (texel normal vs direction to the camera) is
    below this are dropped: grazing views smear and their depth test is weak. In (0, 1)."""
    depth_tolerance_mm: float = 1.0
    """A texel is visible when the mesh depth at the 4 pixels around its projection is its
    own depth within this tolerance plus the depth change of its tilted surface over 1.5
    pixels (so silhouettes and occluders are kept out of the bilinear sample), mm. > 0."""
    silhouette_margin_px: int = 1
    """Observations whose bilinear pixels lie within this many pixels of a silhouette of the
    rendered mesh (a miss, or a depth jump of > 1 cm: the head's outline, the nose over the
    cheek) are dropped: there a mesh 1-2 mm off the true head samples background or the
    occluder. 0 = only the depth test. >= 0."""
    max_frames_per_expression: int = 2
    """Use at most this many registered frames of each expression, the most frontal first
    (0 = all). Each frame costs ~60 ms of one core at 480 x 640 and 512 texels per tile;
    2 of the standard subject's 4 keep the stage near 15 s. >= 0."""
    exposure_compensation: bool = True
    """Estimate one gain per frame (phone auto-exposure): the median luminance ratio over
    the texels it shares with what was baked before it; divide it out before averaging."""
    gutter_texels: int = 4
    """The PNG's colour is grown this many texels into the unseen texels around seen ones
    (alpha stays 0 there), so that filtered look-ups at island borders do not fetch black. >= 0."""
    workers: int = 0
    """Processes observing a subject's expressions at once (the observations are then
    accumulated in order, so the texture does not depend on it): 0 = one per available
    core, 1 = all in this process. >= 0."""

    def __post_init__(self) -> None:
        check_fields(self)
        rules = (
            ("resolution", 64 <= self.resolution <= 4096, "in [64, 4096]"),
            ("angle_power", self.angle_power >= 0, ">= 0"),
            ("min_cos", 0 < self.min_cos < 1, "in (0, 1)"),
            ("depth_tolerance_mm", self.depth_tolerance_mm > 0, "> 0"),
            ("silhouette_margin_px", self.silhouette_margin_px >= 0, ">= 0"),
            ("max_frames_per_expression", self.max_frames_per_expression >= 0, ">= 0"),
            ("gutter_texels", self.gutter_texels >= 0, ">= 0"),
            ("workers", self.workers >= 0, ">= 0"),
        )
        for name, ok, rule in rules:
            if not ok:
                raise ConfigError(f"texture.{name} must be {rule}, got {getattr(self, name)}")

    @property
    def parts(self) -> tuple[str, ...]:
        """The model parts that own texels."""
        return ATLAS_PARTS[self.atlas]


# ------------------------------------------------------------------------ the artifact


@dataclass(frozen=True, eq=False)
class UvTexture:
    """A subject's baked UV texture and how confident each texel is.

    Attributes:
        subject_id: the subject.
        model: face model name and version, e.g. "ict-face-model-light/ict-1".
        resolution: texels per UV tile side.
        atlas: the :data:`Atlas` choice (which parts own texels).
        rgba: (H, W, 4) uint8 sRGB texture; alpha 255 where a frame saw the texel, 0
            where none did (there the colour is the gutter fill near seen texels, else 0).
        weight: (H, W) float32 summed observation weight (0 = unseen): the confidence.
        frames: (H, W) uint16 number of frames that saw each texel.
        covered: (H, W) bool texels some atlas triangle covers (the UV islands).
        rows: one record per phone frame (see :meth:`table`).
        skipped: {expression: reason} for expressions that gave no observation.
    """

    subject_id: str
    model: str
    resolution: int
    atlas: str
    rgba: np.ndarray
    weight: np.ndarray
    frames: np.ndarray
    covered: np.ndarray
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def seen(self) -> np.ndarray:
        """(H, W) bool texels at least one frame saw."""
        return self.rgba[..., 3] > 0

    def image(self, linear: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The texture as a float image and its confidence.

        Args:
            linear: linear light (for shading and appearance models) or sRGB-encoded.

        Returns:
            (rgb (H, W, 3) float32 in [0, 1], 0 where unseen; weight (H, W) float32,
            the summed observation weight, 0 where unseen).
        """
        rgb = self.rgba[..., :3]
        out = SRGB8_TO_LINEAR[rgb] if linear else rgb.astype(np.float32) / 255.0
        return np.where(self.seen[..., None], out, 0.0).astype(np.float32), self.weight

    def coverage(self, mask: np.ndarray | None = None) -> float:
        """Fraction of covered texels (inside ``mask`` (H, W) bool if given) that were seen."""
        inside = self.covered if mask is None else self.covered & mask
        return float(self.seen[inside].mean()) if inside.any() else 0.0

    def png(self) -> bytes:
        """The RGBA texture as PNG bytes (reproducible: fixed encoder settings)."""
        import cv2

        ok, buf = cv2.imencode(".png", np.ascontiguousarray(self.rgba[..., [2, 1, 0, 3]]),
                               [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
        if not ok:
            raise StageError("OpenCV could not encode the texture PNG")
        return buf.tobytes()

    def table(self) -> Any:
        """Per phone frame: status ("used"/"skipped"), reason, texels seen, mean cos, gain."""
        import pyarrow as pa

        schema = pa.schema([
            ("subject_id", pa.string()), ("expression", pa.string()), ("frame_index", pa.int32()),
            ("status", pa.string()), ("reason", pa.string()), ("texels", pa.int64()),
            ("mean_cos", pa.float64()), ("gain", pa.float64())])
        return pa.Table.from_pylist([{"subject_id": self.subject_id, **r} for r in self.rows], schema=schema)

    def to_output(self) -> Any:
        """A :class:`pipeline.serialize.StageOutput`: arrays ``texture_png`` (the PNG's bytes
        as uint8), ``weight``, ``frames``, ``covered``; meta; table ``rows``."""
        from pipeline.serialize import StageOutput

        seen = self.seen
        return StageOutput(
            arrays={"texture_png": np.frombuffer(self.png(), np.uint8).copy(), "weight": self.weight,
                    "frames": self.frames, "covered": self.covered},
            meta={"subject_id": self.subject_id, "model": self.model, "resolution": self.resolution,
                  "atlas": self.atlas, "shape": list(self.weight.shape), "colour": "sRGB",
                  "alpha": "255 = seen by >= 1 frame, 0 = unseen", "skipped": dict(self.skipped),
                  "coverage": round(self.coverage(), 6), "texels_seen": int(seen.sum())},
            tables={"rows": self.table()},
        )

    @classmethod
    def from_output(cls, output: Any) -> UvTexture:
        """Inverse of :meth:`to_output`.

        Raises:
            StageError: a part is missing or the PNG does not decode to the stored shape.
        """
        import cv2

        missing = ({"texture_png", "weight", "frames", "covered"} - set(output.arrays)) | (
            {"subject_id", "model", "resolution", "atlas", "skipped"} - set(output.meta))
        if missing:
            raise StageError(f"texture output lacks {', '.join(sorted(missing))}")
        bgra = cv2.imdecode(np.asarray(output.arrays["texture_png"], np.uint8), cv2.IMREAD_UNCHANGED)
        weight = np.asarray(output.arrays["weight"], np.float32)
        if bgra is None or bgra.shape != (*weight.shape, 4):
            raise StageError(f"texture PNG does not decode to {(*weight.shape, 4)}")
        m = output.meta
        rows = output.tables["rows"].drop(["subject_id"]).to_pylist() if "rows" in output.tables else []
        return cls(str(m["subject_id"]), str(m["model"]), int(m["resolution"]), str(m["atlas"]),
                   np.ascontiguousarray(bgra[..., [2, 1, 0, 3]]), weight,
                   np.asarray(output.arrays["frames"], np.uint16), np.asarray(output.arrays["covered"], bool),
                   rows, dict(m["skipped"]))


def sample_vertices(texture: UvTexture, model: Any, linear: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The texture's colour at every vertex of the face model.

    A vertex on a UV seam has several UVs; their samples are averaged, weighted by
    confidence. Vertices of parts outside the atlas (the eyeballs) get confidence 0.

    Args:
        texture: the baked texture.
        model: the :class:`rigs.face_model.FaceModel` it was baked for.
        linear: linear-light colours (default) or sRGB-encoded ones.

    Returns:
        (rgb (n, 3) float32, 0 where unseen; confidence (n,) float32, 0 where unseen).
    """
    from rigs.uv_raster import part_triangles, uv_to_texel

    rgb, weight = texture.image(linear)
    tris = part_triangles(model, ATLAS_PARTS[texture.atlas])
    vid = np.asarray(model.triangles)[tris].ravel()
    uid = np.asarray(model.triangle_uv)[tris].ravel()
    pairs = np.unique(np.stack([vid, uid], 1), axis=0)  # each (vertex, uv) once
    vals, conf = sample_texture(rgb, weight, uv_to_texel(model.uv[pairs[:, 1]], texture.resolution))
    n = model.n_vertices
    wsum = np.bincount(pairs[:, 0], conf, n)
    out = np.stack([np.bincount(pairs[:, 0], conf * vals[:, c], n) for c in range(3)], 1)
    out = np.where(wsum[:, None] > 0, out / np.maximum(wsum, 1e-12)[:, None], 0.0)
    count = np.bincount(pairs[:, 0], minlength=n)
    return out.astype(np.float32), (wsum / np.maximum(count, 1)).astype(np.float32)


# ------------------------------------------------------------------------ the stage


def skipped_row(expression: str, frame: int, reason: str) -> dict[str, Any]:
    """The record of a phone frame that did not contribute, with why."""
    return {"expression": expression, "frame_index": int(frame), "status": "skipped", "reason": reason,
            "texels": 0, "mean_cos": float("nan"), "gain": float("nan")}


@dataclass(frozen=True, eq=False)
class PhoneRgb:
    """A phone frame's (H, W, 3) uint8 sRGB image, read when called (picklable, unlike a
    closure, so that worker processes can read it themselves)."""

    capture: Any
    expression: str
    frame: int

    def __call__(self) -> np.ndarray:
        return self.capture.read_phone_frame(self.expression, self.frame).rgb


def select_views(capture: Any, expression: str, fused: Any, scan_from_head: np.ndarray,
                 cfg: TextureConfig) -> tuple[list[View], list[dict[str, Any]]]:
    """The frames of one expression to bake (registered by fusion, the most frontal first,
    at most ``max_frames_per_expression``), and a row for each frame left out."""
    intr = capture.phone_intrinsics(expression)
    views, rows = [], []
    ids, used = fused.frame_ids.tolist(), set(fused.frames_used.tolist())
    for f in ids:
        if f not in used:
            rows.append(skipped_row(expression, f, "not registered by fusion"))
            continue
        pose = np.linalg.inv(fused.poses[ids.index(f)]) @ scan_from_head
        if not np.isfinite(pose).all():
            rows.append(skipped_row(expression, f, "camera pose not finite (fusion pose or scan_from_head)"))
            continue
        cam = camera_from_pose(intr, pose)
        views.append(View(int(f), cam, PhoneRgb(capture, expression, int(f))))
    views.sort(key=lambda v: (-frontalness(v.camera), v.frame))
    keep = cfg.max_frames_per_expression or len(views)
    for v in views[keep:]:
        rows.append(skipped_row(expression, v.frame,
                                f"not among the {keep} most frontal frames (max_frames_per_expression)"))
    return views[:keep], rows


def make_texture(subject_id: str, model: Any, raster: UvRaster, colour: np.ndarray, weight: np.ndarray,
                 count: np.ndarray, rows: list[dict[str, Any]], skipped: dict[str, str],
                 cfg: TextureConfig) -> UvTexture:
    """Assembles the :class:`UvTexture` from :func:`bake`'s per-texel results."""
    seen = raster.scatter(weight > 0, False)
    linear = fill_gutter(raster.scatter(colour.astype(np.float32)), seen, cfg.gutter_texels)
    rgba = np.concatenate([encode_srgb8(linear), np.where(seen, 255, 0).astype(np.uint8)[..., None]], -1)
    return UvTexture(subject_id, f"{model.name}/{model.version}", cfg.resolution, cfg.atlas, rgba,
                     raster.scatter(weight.astype(np.float32)),
                     raster.scatter(np.minimum(count, np.iinfo(np.uint16).max).astype(np.uint16)),
                     raster.scatter(np.ones(len(raster.texel), bool), False), rows, skipped)


def texture_subject(capture: Any, fused: Any, refined: Any, cfg: TextureConfig,
                    model: Any = None) -> UvTexture:
    """Bakes the UV texture of one subject from its refined meshes and phone frames.

    Args:
        capture: an opened :class:`storage.capture.Capture`.
        fused: the fusion stage's :class:`stages.fusion.FusedScans`.
        refined: the refine stage's :class:`stages.refine.RefinedSubject` (``refined[e].vertices``
            head frame, ``refined[e].scan_from_head``, ``rejected``).
        cfg: the texture section.
        model: the face model whose topology the meshes have; the embedded ICT model by default.

    Raises:
        StageError: the meshes do not have the model's topology, or no frame saw any texel.
    """
    from rigs.face_model import load_ict_face_model

    model = model or load_ict_face_model()
    raster = model_uv_raster(model, cfg.resolution, cfg.parts)
    skipped = {e: f"refine: {r}" for e, r in refined.rejected.items()}
    rows: list[dict[str, Any]] = []
    work = []
    for e in capture.phone_expressions:
        f, r = fused.expressions.get(e), refined.refined.get(e)
        if r is None or f is None or not f.ok:
            if r is not None:
                skipped[e] = "fusion: " + (f.reason if f is not None else "no fused scan")
            skipped.setdefault(e, "no refined mesh")
            rows += [skipped_row(e, i, f"expression skipped: {skipped[e]}") for i in range(capture.phone_frame_count(e))]
            continue
        if np.shape(r.vertices) != (model.n_vertices, 3):
            raise StageError(f"refined mesh of {e!r} has shape {np.shape(r.vertices)}; "
                             f"the face model {model.name} has {model.n_vertices} vertices")
        views, left_out = select_views(capture, e, f, r.scan_from_head, cfg)
        rows += left_out
        work.append((e, r.vertices, views))
    colour, weight, count, baked = bake(raster, np.asarray(model.triangles), work, cfg)
    if not (weight > 0).any():
        raise StageError(f"no phone frame of subject {capture.subject_id!r} saw any texel "
                         f"(skipped: {skipped or 'none'})")
    for e, _, _views in work:
        if not any(r["expression"] == e and r["status"] == "used" for r in baked):
            skipped[e] = "no frame contributed (see its rows)"
    order = {e: i for i, e in enumerate(capture.phone_expressions)}
    rows = sorted(rows + baked, key=lambda r: (order[r["expression"]], r["frame_index"]))
    return make_texture(capture.subject_id, model, raster, colour, weight, count, rows, skipped, cfg)


def texture_capture(capture: Any, fusion: Any, refine: Any, config: Any = None) -> Any:
    """Stage ``texture``: the phone RGB fused into the template's UV atlas.

    Args:
        capture: the capture folder (the engine's ``"capture"`` input) or an opened Capture.
        fusion: the ``fusion`` stage's loaded artifact.
        refine: the ``refine`` stage's loaded artifact (``RefinedSubject``).
        config: the engine's config view declaring ``texture``, or a :class:`TextureConfig`.

    Returns:
        ``UvTexture.to_output()``.
    """
    from stages.fusion import FusedScans
    from stages.refine import RefinedSubject
    from storage.capture import Capture

    cap = Capture.of(capture)
    cfg = config_section(config, "texture", TextureConfig)
    return texture_subject(cap, FusedScans.from_output(fusion), RefinedSubject.from_output(refine), cfg).to_output()

