"""The JSON documents of the headset side of a capture: rig.json and segments.json.

Same conventions as :mod:`storage.capture_schema`: ``check_*`` returns a best-effort value
and every problem, ``parse_*`` raises them as one CaptureError naming the file, and
``*_to_json`` is the writer's exact inverse.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rigs.lens import DEFAULT_LENS_MODEL, LENS_MODELS, Lens, inversion_problem
from storage.capture_layout import (
    CAMERA_ROLES,
    RESERVED_RECORDING_ENTRIES,
    SEGMENT_KINDS,
    WINK_EYES,
    describe,
    unsafe_name_reason,
)
from storage.capture_schema import (
    FieldReader,
    check_pinhole,
    number_array,
    raise_problems,
    too_many,
)
from storage.capture_types import HmcCamera, HmcRig, Segment

ROTATION_TOLERANCE = 1e-4  # calibration files round their rotations; 1e-4 is ~0.006 degrees


# ---------------------------------------------------------------------------------- rig


def _check_camera(obj: object, i: int, problems: list[str]) -> HmcCamera | None:
    if not isinstance(obj, dict):
        problems.append(f"cameras[{i}] must be a JSON object")
        return None
    name = obj.get("name")
    f = FieldReader(
        obj, problems, f"cameras[{i}] ({name})" if isinstance(name, str) else f"cameras[{i}]"
    )
    n_before = len(problems)
    if f.raw("name") is not None:
        reason = unsafe_name_reason(name, "camera name")
        if reason:
            f.problem(reason)
        elif name in RESERVED_RECORDING_ENTRIES:
            f.problem(f"camera name {name!r} is reserved")
    role = f.string("role")
    if role is not None and role not in CAMERA_ROLES:
        f.problem(f'field "role" must be one of {", ".join(CAMERA_ROLES)}, got {describe(role)}')
    mirrored = f.boolean("mirrored")
    intr = check_pinhole(f)
    model = f.string("model", optional=True) or DEFAULT_LENS_MODEL
    if model not in LENS_MODELS:
        f.problem(f'field "model" must be one of {", ".join(LENS_MODELS)}')
    arrays = {}
    for key, shape in (
        ("distortion", (LENS_MODELS.get(model, 0),)),  # unknown model: its count is unknown
        ("R_headset_from_camera", (3, 3)),
        ("t_headset_from_camera", (3,)),
    ):
        value = f.raw(key)
        if key in obj and shape != (0,):
            arrays[key] = number_array(value, shape)
            if arrays[key] is None:
                dims = "x".join(str(s) for s in shape)
                f.problem(f'field "{key}" must be {dims} finite numbers, got {describe(value)}')
    rot = arrays.get("R_headset_from_camera")
    if rot is not None:
        err = float(np.abs(rot.T @ rot - np.eye(3)).max())
        if err > ROTATION_TOLERANCE:
            f.problem(f'"R_headset_from_camera" is not orthonormal (max |R^T R - I| = {err:.3g})')
        elif np.linalg.det(rot) < 0:
            f.problem('"R_headset_from_camera" has determinant -1 (a reflection), must be +1')
    if arrays.get("distortion") is not None and intr is not None:
        why = inversion_problem(Lens(model, arrays["distortion"]), intr)
        if why:
            f.problem(why)
    if len(problems) > n_before or intr is None:
        return None
    return HmcCamera(
        name, role, mirrored, intr,  # type: ignore[arg-type]
        arrays["distortion"], arrays["R_headset_from_camera"], arrays["t_headset_from_camera"],
        model,
    )  # fmt: skip


def check_rig(obj: object) -> tuple[HmcRig | None, list[str]]:
    """Checks a parsed rig.json; the rig returned holds only the cameras that are valid.

    The rig is None when the document is not an object or lists no camera at all; an
    invalid fps is returned as NaN so that the validator can still check the cameras.
    """
    if not isinstance(obj, dict):
        return None, ["rig must be a JSON object"]
    problems: list[str] = []
    f = FieldReader(obj, problems)
    version = f.string("rig_version")
    fps = f.number("fps", positive=True)
    cams_raw = f.raw("cameras")
    if "cameras" in obj and (not isinstance(cams_raw, list) or not cams_raw):
        f.problem('field "cameras" must be a non-empty list')
        return None, problems
    cameras: list[HmcCamera] = []
    for i, cam_obj in enumerate(cams_raw or []):
        if too_many(problems):  # a hostile list: stop before the messages outgrow the file
            break
        cam = _check_camera(cam_obj, i, problems)
        if cam is None:
            continue
        if cam.name in (c.name for c in cameras):
            problems.append(f"cameras[{i}]: camera name {cam.name!r} is used twice")
            continue
        cameras.append(cam)
    if "cameras" not in obj:
        return None, problems
    rig = HmcRig(version or "", fps if fps is not None else math.nan, tuple(cameras))
    return rig, problems


def parse_rig(obj: object, path: Path) -> HmcRig:
    """Parses rig.json, raising CaptureError(path, ...) on any problem."""
    rig, problems = check_rig(obj)
    raise_problems(path, problems)
    assert rig is not None
    return rig


def rig_to_json(rig: HmcRig) -> dict[str, Any]:
    """The rig.json object of ``rig`` (cameras in rig order)."""
    cameras = []
    for cam in rig.cameras:
        i = cam.intrinsics
        cameras.append(
            {
                "name": cam.name,
                "role": cam.role,
                "mirrored": bool(cam.mirrored),
                "width": int(i.width),
                "height": int(i.height),
                "fx": float(i.fx),
                "fy": float(i.fy),
                "cx": float(i.cx),
                "cy": float(i.cy),
                "model": cam.model,
                "distortion": cam.distortion.tolist(),
                "R_headset_from_camera": cam.R_headset_from_camera.tolist(),
                "t_headset_from_camera": cam.t_headset_from_camera.tolist(),
            }
        )
    return {"rig_version": rig.rig_version, "fps": float(rig.fps), "cameras": cameras}


# ----------------------------------------------------------------------------- segments


def _check_segment(
    obj: object,
    i: int,
    frame_count: int | None,
    camera_names: Collection[str] | None,
    prompts: Collection[str] | None,
    problems: list[str],
) -> Segment | None:
    if not isinstance(obj, dict):
        problems.append(f"segments[{i}] must be a JSON object")
        return None
    kind = obj.get("kind")
    f = FieldReader(
        obj, problems, f"segments[{i}] ({kind})" if isinstance(kind, str) else f"segments[{i}]"
    )
    n_before = len(problems)
    kind = f.string("kind")
    if kind is not None and kind not in SEGMENT_KINDS:
        f.problem(f"unknown segment kind {describe(kind)} (known: {', '.join(SEGMENT_KINDS)})")
    start = f.integer("start", minimum=0)
    end = f.integer("end", minimum=0)
    if start is not None and end is not None and start >= end:
        f.problem(f"start ({start}) must be before end ({end}); end is exclusive")
    if end is not None and frame_count is not None and end > frame_count:
        f.problem(f"end ({end}) is past the recording's {frame_count} frames")
    prompt = f.string("prompt", optional=kind != "peak")
    if kind == "peak" and prompt is not None and prompts is not None and prompt not in prompts:
        f.problem(f"unknown prompt {describe(prompt)}")
    if kind != "peak" and prompt is not None:
        f.problem('field "prompt" is only allowed on peak segments')
    eye = f.string("eye", optional=kind != "wink")
    if eye is not None and eye not in WINK_EYES:
        f.problem(f'field "eye" must be "left" or "right", got {describe(eye)}')
    if kind != "wink" and eye is not None:
        f.problem('field "eye" is only allowed on wink segments')
    cams = f.raw("cameras", optional=True)
    cameras: tuple[str, ...] = ()
    if "cameras" in obj:
        if not isinstance(cams, list) or not all(isinstance(c, str) for c in cams):
            f.problem('field "cameras" must be a list of camera names')
        else:
            cameras = tuple(cams)
            for cam in cameras:
                if camera_names is not None and cam not in camera_names:
                    f.problem(
                        f"unknown camera {describe(cam)} (the rig has {', '.join(sorted(camera_names))})"
                    )
    if len(problems) > n_before:
        return None
    return Segment(kind, start, end, prompt, eye, cameras)  # type: ignore[arg-type]


def check_segments(
    obj: object,
    frame_count: int | None = None,
    camera_names: Collection[str] | None = None,
    prompts: Collection[str] | None = None,
) -> tuple[tuple[Segment, ...], list[str]]:
    """Checks a parsed segments.json; returns the valid segments and every problem.

    Args:
        obj: the parsed document.
        frame_count: frames in the recording; None skips the range check.
        camera_names: the rig's camera names; None skips the camera check.
        prompts: known prompt names; None skips the prompt check.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("segments"), list):
        return (), ['segments.json must be an object with a "segments" list']
    problems: list[str] = []
    segments = []
    for i, item in enumerate(obj["segments"]):
        if too_many(problems):
            break
        seg = _check_segment(item, i, frame_count, camera_names, prompts, problems)
        if seg is not None:
            segments.append(seg)
    return tuple(segments), problems


def frame_count_mismatch(counts: dict[str, int]) -> str | None:
    """Describes cameras whose frame counts differ from the most common one, or None.

    Args:
        counts: camera name -> frame count, in rig order.
    """
    values = list(counts.values())
    if len(set(values)) <= 1:
        return None
    common = max(set(values), key=lambda n: (values.count(n), n))
    odd = ", ".join(f"{cam} has {n}" for cam, n in counts.items() if n != common)
    n_common = values.count(common)
    others = f"{n_common} other camera{'s have' if n_common != 1 else ' has'}"
    return f"frame counts differ between cameras: {odd} ({others} {common})"


def parse_segments(
    obj: object,
    path: Path,
    frame_count: int | None = None,
    camera_names: Collection[str] | None = None,
) -> tuple[Segment, ...]:
    """Parses segments.json, raising CaptureError(path, ...) on any problem."""
    segments, problems = check_segments(obj, frame_count, camera_names)
    raise_problems(path, problems)
    return segments


def segments_to_json(segments: Sequence[Segment]) -> dict[str, Any]:
    """The segments.json object of ``segments`` (optional keys only when set)."""
    items = []
    for seg in segments:
        item: dict[str, Any] = {"kind": seg.kind, "start": int(seg.start), "end": int(seg.end)}
        if seg.prompt is not None:
            item["prompt"] = seg.prompt
        if seg.eye is not None:
            item["eye"] = seg.eye
        if seg.cameras:
            item["cameras"] = list(seg.cameras)
        items.append(item)
    return {"segments": items}
