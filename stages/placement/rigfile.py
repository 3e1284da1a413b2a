"""Placement rig files: a capture's ``hmc/rig.json`` plus an optional ``placement`` object.

The cameras are exactly the capture format's (docs/capture-format.md: name, role,
mirrored, intrinsics, model, distortion, R/t_headset_from_camera; checked by the same
parser), so a calibrated rig.json scores as it is. The optional top-level ``placement``
object adds::

    "placement": {
      "targets": {"eye_left": ["eye_L", "brow_L"], ...},   # regions each camera is for
      "headset_proxy": [{"centre": [x, y, z], "size": [sx, sy, sz]}, ...]
    }

``targets`` names, per camera, the regions its rig-level V and M average over (a camera
not listed averages over every region). ``headset_proxy`` is a list of axis-aligned boxes
in the headset frame, metres, that block rays like the face does (lenses, the housing).
The files in ``rigs/data/placement/`` are the synthetic headset (:func:`standard_rig_file`)
and the REFA-Fig.-1-style variants (:func:`variant_rig_files`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError
from rigs.camera import Camera, rig_cameras
from stages.placement.regions import REGION_NAMES
from storage.capture_types import HmcRig

PLACEMENT_DIR = Path(__file__).parents[2] / "rigs" / "data" / "placement"
#: Regions each camera of the synthetic headset is meant to see.
STANDARD_TARGETS: dict[str, tuple[str, ...]] = {
    "eye_left": ("eye_L", "brow_L"), "eye_right": ("eye_R", "brow_R"),
    "mouth_left": ("lips", "jaw"), "mouth_right": ("lips", "jaw"),
    "glabella": ("glabella", "brow_L", "brow_R"),
    "gt_eye_left": ("eye_L", "brow_L"), "gt_eye_right": ("eye_R", "brow_R"),
    "gt_boom_left": ("lips", "jaw", "cheek_L", "nose"), "gt_boom_right": ("lips", "jaw", "cheek_R", "nose"),
    "gt_glabella": ("glabella", "brow_L", "brow_R", "nose"),
}


@dataclass(frozen=True, eq=False)
class PlacementRig:
    """A rig to score.

    Attributes:
        name: display name (the file's stem).
        rig: the cameras.
        targets: camera name -> region names its rig-level scores average over.
        proxy_boxes: (B, 2, 3) box centres and sizes, headset frame, metres.
    """

    name: str
    rig: HmcRig
    targets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    proxy_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 2, 3)))

    def cameras(self) -> dict[str, Camera]:
        """Headset-frame cameras by name."""
        return rig_cameras(self.rig)

    def target_regions(self, camera: str) -> tuple[str, ...]:
        return self.targets.get(camera, REGION_NAMES)

    def proxy_mesh(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The proxy boxes as one triangle mesh (headset frame), None without boxes."""
        if not len(self.proxy_boxes):
            return None
        return box_mesh(self.proxy_boxes)


def box_mesh(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, 2, 3) centres + sizes -> ((8B, 3) vertices, (12B, 3) triangles)."""
    corner = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    # Two triangles per face of the cube whose corners are indexed 4x + 2y + z.
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    tris = np.array([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))])
    verts = np.concatenate([b[0] + corner * b[1] for b in boxes])
    return verts, np.concatenate([tris + 8 * k for k in range(len(boxes))])


def load_placement_rig(path: str | Path) -> PlacementRig:
    """Reads a placement rig file (module docstring).

    Raises:
        CaptureError: the cameras are invalid (the capture parser's messages).
        ConfigError: the ``placement`` object is malformed.
    """
    from storage.hmc_schema import parse_rig

    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read rig file: {exc}") from exc
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: a rig file is a JSON object")
    extra = obj.pop("placement", {})
    rig = parse_rig(obj, path)
    if not isinstance(extra, dict):
        raise ConfigError(f"{path}: \"placement\" must be an object")
    targets = {}
    for cam, regions in (extra.get("targets") or {}).items():
        unknown = [r for r in regions if r not in REGION_NAMES] if isinstance(regions, list) else [regions]
        if cam not in rig.names or unknown or not regions:
            raise ConfigError(f"{path}: placement.targets[{cam!r}] must name a rig camera and a non-empty "
                              f"list of regions from {', '.join(REGION_NAMES)}")
        targets[cam] = tuple(regions)
    boxes = []
    for i, box in enumerate(extra.get("headset_proxy") or []):
        try:
            centre, size = np.asarray(box["centre"], float), np.asarray(box["size"], float)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: placement.headset_proxy[{i}] needs centre and size: {exc}") from exc
        if centre.shape != (3,) or size.shape != (3,) or not (size > 0).all() or not np.isfinite(centre).all():
            raise ConfigError(f"{path}: placement.headset_proxy[{i}]: centre and size are 3 numbers, sizes > 0")
        boxes.append((centre, size))
    return PlacementRig(path.stem, rig, targets, np.array(boxes).reshape(-1, 2, 3))


def placement_rig_json(rig: PlacementRig) -> dict[str, Any]:
    """The file object of ``rig`` (the exact inverse of :func:`load_placement_rig`)."""
    from storage.hmc_schema import rig_to_json

    obj = rig_to_json(rig.rig)
    extra: dict[str, Any] = {}
    if rig.targets:
        extra["targets"] = {k: list(v) for k, v in rig.targets.items()}
    if len(rig.proxy_boxes):
        extra["headset_proxy"] = [{"centre": b[0].tolist(), "size": b[1].tolist()} for b in rig.proxy_boxes]
    if extra:
        obj["placement"] = extra
    return obj


def with_camera(rig: PlacementRig, name: str, camera: Camera, rig_name: str | None = None) -> PlacementRig:
    """A copy of ``rig`` with camera ``name`` moved to ``camera``'s pose (same lens)."""
    cams = tuple(
        replace(c, R_headset_from_camera=camera.R_world_from_camera, t_headset_from_camera=camera.t_world_from_camera)
        if c.name == name else c
        for c in rig.rig.cameras
    )
    return replace(rig, name=rig_name or rig.name, rig=replace(rig.rig, cameras=cams))


def standard_rig_file() -> PlacementRig:
    """The synthetic headset of ``pgt synth`` (10 cameras at 400 px) with its targets."""
    from stages.synthesis.hmc import default_hmc_rig

    return PlacementRig("standard", default_hmc_rig(), dict(STANDARD_TARGETS))


def rotation_about(axis: np.ndarray, angle: float) -> np.ndarray:
    """(3, 3) rotation by ``angle`` radians about unit ``axis`` (Rodrigues)."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def variant_rig_files(standard: PlacementRig) -> list[PlacementRig]:
    """REFA-Fig.-1-style variants of ``standard``.

    * ``mouth_outward_1cm``: both mouth cameras translated 10 mm away from the midline
      (along +-x, the headset's left/right), orientation unchanged;
    * ``glabella_tilt_10deg``: the glabella camera turned 10 degrees about its own x axis,
      its view moving down toward the nose, position unchanged.
    """
    cams = standard.cameras()
    moved = standard
    for name in ("mouth_left", "mouth_right"):
        c = cams[name]
        step = np.array([0.010 * np.sign(c.t_world_from_camera[0]), 0.0, 0.0])
        moved = with_camera(moved, name, Camera(c.intrinsics, c.distortion, c.R_world_from_camera,
                                                c.t_world_from_camera + step, c.model), "mouth_outward_1cm")
    g = cams["glabella"]
    # Camera y points down in the image: turning by -10 deg about camera x moves the axis toward +y.
    tilt = g.R_world_from_camera @ rotation_about(np.array([1.0, 0.0, 0.0]), np.deg2rad(-10.0))
    tilted = with_camera(standard, "glabella", Camera(g.intrinsics, g.distortion, tilt, g.t_world_from_camera, g.model),
                         "glabella_tilt_10deg")
    return [moved, tilted]


def write_rig_files(folder: Path = PLACEMENT_DIR) -> list[Path]:
    """Writes the standard rig and its variants as ``<name>.json`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    standard = standard_rig_file()
    paths = []
    for rig in [standard, *variant_rig_files(standard)]:
        path = folder / f"{rig.name}.json"
        path.write_text(json.dumps(placement_rig_json(rig), indent=1) + "\n")
        paths.append(path)
    return paths
