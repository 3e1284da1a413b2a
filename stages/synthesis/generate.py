"""Writes synthetic subjects: a capture folder plus ground truth beside it.

``OUT/captures/<subject>/`` is an ordinary capture (docs/capture-format.md);
``OUT/ground_truth/<subject>/`` holds the truth, which the pipeline never reads:
- ``subject.json``: ids, seed, preset, model and rig versions, tint;
- ``identity.npz``: identity coefficients, detail displacement, true neutral;
- ``rig.npz``: the true personal rig (:meth:`rigs.rig.BlendshapeRig.save`);
- ``expressions.npz``: per phone prompt, the performed ``b``, ``gaze`` and true mesh;
- ``phone/<prompt>.npz``: per frame, camera pose and 2D landmarks (478 MediaPipe, 68);
- ``hmc/<recording>.npz``: per frame ``b``, gaze, head pose; per camera 2D landmarks.
Everything is a function of (preset, seed, subject index): the same inputs give
byte-identical files. The subject and the phone frames draw from one random stream,
the HMC recordings from the same stream (a stream of their own for ``phone_only``);
the simulated detector's keypoints and the sensor's fixed pattern have streams of their
own, so changing their figures changes nothing else.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from pipeline.progress import progress_bar, track
from rigs.camera import Camera, rig_cameras
from rigs.definition import RigDefinition, load_default_rig_definition
from rigs.face_model import FaceModel, load_ict_face_model
from rigs.geometry import quat_from_rotation
from rigs.raycast import Scene
from stages.synthesis.hmc import default_hmc_rig
from stages.synthesis.ir import IrRenderer
from stages.synthesis.keypoints import KeypointDetector, detect_keypoints, draw_bias
from stages.synthesis.performance import Timeline, hmc_timeline, perform_prompt
from stages.synthesis.phone import PhoneShot, phone_camera, render_phone
from stages.synthesis.presets import PHONE_ONLY_HMC, SynthConfig
from stages.synthesis.subject import SyntheticSubject, make_subject
from stages.synthesis.texture import load_default_texture
from stages.synthesis.variants import get_variant
from storage.capture_files import atomic_write_bytes, encode_npz
from storage.capture_types import PhoneIntrinsics
from storage.capture_writer import CaptureWriter

#: A landmark is visible when the first hit along its ray is within this of it, metres.
VISIBILITY_TOL_M = 0.002
#: The HMC landmarks: iris (10) + Multi-PIE 68, as indices into :func:`landmark_points`.
HMC_LANDMARK_IDS = np.r_[np.arange(468, 478), 478 + np.arange(68)]
#: Sub-streams of a subject's seed (besides the main stream [seed, index]).
HMC_STREAM, KEYPOINT_STREAM, SENSOR_PATTERN_STREAM = 1, 2, 3
#: Frames whose PNG files may wait for the writer thread.
PENDING_FRAMES = 4


def subject_id_for(seed: int, index: int) -> str:
    return f"synth-{seed}-{index:04d}"


def landmark_points(subject: SyntheticSubject, vertices: np.ndarray) -> np.ndarray:
    """(..., 546, 3) landmarks: 478 MediaPipe then 68 Multi-PIE."""
    model = subject.rig.model
    mp = model.embeddings["mediapipe478"].points(vertices, model.triangles)
    return np.concatenate([mp, vertices[..., model.landmarks68, :]], -2)


def project_visible(scene: Scene, camera: Camera, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (p, 2) of points and whether each is visible (not occluded, in front, in image)."""
    pix, visible = project_visible_cameras(scene, [camera], points)
    return pix[0], visible[0]


def project_visible_cameras(scene: Scene, cameras: list[Camera], points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (C, p, 2) float32 of points in each camera and whether each is visible there.

    Visible: in front of the camera, inside the image, and the first hit of the ray from
    the camera centre toward the point is the point itself (within :data:`VISIBILITY_TOL_M`).
    One ray cast serves all cameras.
    """
    projected = [cam.project(points) for cam in cameras]
    pix = np.stack([p for p, _ in projected])
    z = np.stack([z for _, z in projected])
    centres = np.stack([np.broadcast_to(cam.t_world_from_camera, points.shape) for cam in cameras]).astype(np.float64)
    direction = points[None] - centres
    dist = np.linalg.norm(direction, axis=-1)
    hit = scene.cast(centres, direction / dist[..., None])
    sizes = np.array([[cam.width, cam.height] for cam in cameras], float)[:, None, :]
    inside = ((pix >= -0.5) & (pix <= sizes - 0.5)).all(-1)
    visible = (z > 0) & inside & (hit["t"] >= dist - VISIBILITY_TOL_M)
    return pix.astype(np.float32), visible


@dataclass(frozen=True, eq=False)
class SimulatedDetector:
    """The simulated external keypoint detector of a subject.

    Attributes:
        model: its error model.
        bias: per embedded camera, (P, 2) fixed offsets in pixels.
        rng: its random stream.
    """

    model: KeypointDetector
    bias: dict[str, np.ndarray]
    rng: np.random.Generator

    @classmethod
    def for_subject(cls, model: KeypointDetector, cameras: dict[str, Camera], rng: np.random.Generator) -> SimulatedDetector:
        """Draws the subject's per-(camera, point) biases for the embedded cameras."""
        names = [c for c in cameras if not c.startswith("gt_")]  # an external detector runs on the embedded cameras only
        width = cameras[names[0]].width
        bias = draw_bias(model, rng, len(names), len(HMC_LANDMARK_IDS), width)
        return cls(model, dict(zip(names, bias, strict=True)), rng)


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, encode_npz(arrays, compress=True))


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def prompt_pose(definition: RigDefinition, prompt: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(b, gaze) of a phone prompt: the neutral is exact, every other prompt is performed."""
    if prompt == "neutral":
        return np.zeros(definition.size, np.float32), np.zeros(4, np.float32)
    return perform_prompt(definition, prompt, rng)


def generate_subject(
    config: SynthConfig,
    seed: int,
    index: int,
    out: Path,
    *,
    model: FaceModel | None = None,
    definition: RigDefinition | None = None,
    progress: bool = True,
) -> str:
    """Synthesizes subject ``index`` of ``seed`` under ``out``. Returns its subject id."""
    model = model or load_ict_face_model()
    definition = definition or load_default_rig_definition()
    variant = get_variant(config.variant)
    texture = load_default_texture()
    rng = np.random.default_rng([seed, index])
    sid = subject_id_for(seed, index)
    style = variant.identity
    subject = make_subject(
        sid, rng, model, definition,
        identity_std=config.identity_std * style.scale, detail_mm=config.detail_mm * style.detail_scale,
        rig_variation=config.rig_variation, identity_skew=style.skew, detail_bumps=style.detail_bumps,
    )
    capture_dir, truth_dir = Path(out) / "captures" / sid, Path(out) / "ground_truth" / sid
    writer = CaptureWriter(capture_dir, sid)
    prompts = list(config.prompts or [p.name for p in definition.prompts])
    hmc_rig = default_hmc_rig(config.hmc_size, config.fps)
    peak_pool = [p for p in prompts if p != "neutral"] or [p.name for p in definition.prompts[1:]]
    timelines = []
    for r in range(config.hmc_recordings):
        picks = [peak_pool[(r * config.hmc_peaks_per_recording + k) % len(peak_pool)] for k in range(config.hmc_peaks_per_recording)]
        timelines.append(hmc_timeline(definition, rng, picks, config.script, fps=config.fps, wink_eye=("left", "right")[r % 2], slip=variant.slip))
    hmc_rng = rng
    if config.phone_only:  # the full timelines above were drawn only to keep the phone part's random stream
        hmc_rng = np.random.default_rng([seed, index, HMC_STREAM])
        hmc_rig = default_hmc_rig(PHONE_ONLY_HMC["size"], PHONE_ONLY_HMC["fps"])
        timelines = [hmc_timeline(definition, hmc_rng, peak_pool[: PHONE_ONLY_HMC["peaks"]], PHONE_ONLY_HMC["script"], fps=PHONE_ONLY_HMC["fps"], slip=variant.slip)]
    total = len(prompts) * config.phone_frames_per_prompt + sum(len(t.b) for t in timelines)
    bar = progress_bar(total, sid, "frame", enabled=progress, leave=False)

    expr_b, expr_gaze, expr_verts = [], [], []
    for prompt in prompts:
        b, gaze = prompt_pose(definition, prompt, rng)
        verts = subject.rig.pose(b, gaze)
        expr_b.append(b), expr_gaze.append(gaze), expr_verts.append(verts)
        _write_phone_burst(writer, truth_dir, prompt, render_phone_burst(config, subject, verts, texture, rng), bar)
    _write_npz(truth_dir / "expressions.npz", prompts=np.array(prompts), b=np.stack(expr_b), gaze=np.stack(expr_gaze), vertices=np.stack(expr_verts).astype(np.float32))

    writer.write_rig(hmc_rig)
    cameras = rig_cameras(hmc_rig)
    renderer = IrRenderer(cameras, texture, model.triangles, variant.shading, variant.noise,
                          pattern_rng=np.random.default_rng([seed, index, SENSOR_PATTERN_STREAM]))
    detector = SimulatedDetector.for_subject(variant.keypoints, cameras, np.random.default_rng([seed, index, KEYPOINT_STREAM]))
    recordings = []
    for r, timeline in enumerate(timelines):
        name = f"rec{r:03d}"
        recordings.append(name)
        _write_recording(writer, truth_dir, name, subject, timeline, renderer, hmc_rng, bar, detector)
    bar.close()

    _write_subject_truth(truth_dir, config, seed, index, subject)
    write_truth_labels(truth_dir, Path(out) / "ground_truth" / "labels", recordings, run_id=f"synth-{config.name}-{seed}")
    writer.finalize(prompts, recordings)
    return sid


def write_truth_labels(truth_dir: Path, labels_uri: Path, recordings: list[str], run_id: str) -> int:
    """Writes a subject's true per-frame labels into the label table (source ``ground_truth``).

    QA can then score pseudo-labels against the truth, and metrics run on the truth itself.
    Returns the table version of the commit.
    """
    from pipeline import __version__
    from stages.synthesis.truth import SubjectTruth
    from storage.label_table import LabelTable, labels_to_arrow

    truth = SubjectTruth.open(truth_dir)
    definition = truth.rig.definition
    tables = []
    for rec in recordings:
        t = truth.hmc(rec)
        n = len(t["frame_index"])
        tables.append(labels_to_arrow(
            truth.meta["subject_id"], rec, t["frame_index"], t["timestamp_ns"], t["b"], t["gaze"],
            t["head_quat"], t["head_t"], blendshape_names=definition.blendshape_names,
            confidence=np.ones(n, np.float32), residual_keypoint_px=np.zeros(n, np.float32),
            residual_photometric=np.zeros(n, np.float32), status="ok",
            label_source="ground_truth", label_round=0, pipeline_version=__version__,
            rig_version=definition.version, run_id=run_id,
        ))
    import pyarrow as pa

    return LabelTable(str(labels_uri)).write_subject_round(pa.concat_tables(tables))


@dataclass(frozen=True, eq=False)
class PhoneTruthFrame:
    """A rendered phone frame with its truth: 2D landmarks (546, 2), visibility, head pose."""

    shot: PhoneShot
    landmarks_2d: np.ndarray
    visible: np.ndarray
    head_in_camera: np.ndarray


def render_phone_burst(config: SynthConfig, subject: SyntheticSubject, verts: np.ndarray, texture, rng) -> list[PhoneTruthFrame]:
    """Renders one prompt's burst of RGBD frames from slightly different angles."""
    triangles = subject.rig.model.triangles
    points = landmark_points(subject, verts)
    scene = Scene(verts, triangles)  # the head does not move within a burst; the camera does
    frames = []
    for _ in range(config.phone_frames_per_prompt):
        cam = phone_camera(config.phone_width, config.phone_hfov_deg, rng, config.phone_distance_m,
                           config.phone_yaw_deg, config.phone_pitch_deg)
        shot = render_phone(verts, triangles, cam, texture, subject.tint, rng)
        pix, visible = project_visible(scene, cam, points)
        r_cam_head = cam.R_world_from_camera.T  # x_cam = R x_head + t
        pose = np.c_[r_cam_head, -r_cam_head @ cam.t_world_from_camera]
        frames.append(PhoneTruthFrame(shot, pix, visible, pose))
    return frames


def _write_phone_burst(writer, truth_dir, prompt, frames: list[PhoneTruthFrame], bar) -> None:
    for k, f in enumerate(frames):
        cam = f.shot.camera
        if k == 0:
            writer.write_phone_intrinsics(prompt, PhoneIntrinsics(cam.width, cam.height, cam.fx, cam.fy, cam.cx, cam.cy))
        writer.write_phone_frame(prompt, k, f.shot.rgb, f.shot.depth_mm)
        bar.update(1)
    _write_npz(
        truth_dir / "phone" / f"{prompt}.npz",
        head_in_camera=np.stack([f.head_in_camera for f in frames]),
        landmarks_2d=np.stack([f.landmarks_2d for f in frames]),
        visible=np.stack([f.visible for f in frames]),
    )


def _write_frame_images(writer: CaptureWriter, recording: str, index: int, images: dict[str, np.ndarray]) -> None:
    for cam_name, image in images.items():
        writer.write_hmc_frame(recording, cam_name, index, image)


def _write_recording(
    writer, truth_dir, name, subject, timeline: Timeline, renderer: IrRenderer, rng, bar, detector: SimulatedDetector,
) -> None:
    cams = renderer.cameras
    n_frames = len(timeline.b)
    rot = Rotation.from_rotvec(timeline.head_rotvec)
    lm_ids = HMC_LANDMARK_IDS
    lm2d = np.zeros((len(cams), n_frames, len(lm_ids), 2), np.float32)
    vis = np.zeros((len(cams), n_frames, len(lm_ids)), bool)
    # PNG encoding (OpenCV releases the GIL) runs on a second thread while the next frame renders.
    with ThreadPoolExecutor(1) as png_thread:
        pending: list[Future] = []
        for i in range(n_frames):
            head_verts = subject.rig.pose(timeline.b[i], timeline.gaze[i])
            verts = rot[i].apply(head_verts) + timeline.head_t[i]
            images, scene = renderer.render(verts.astype(np.float32), rng)
            points = landmark_points(subject, verts)[lm_ids]
            lm2d[:, i], vis[:, i] = project_visible_cameras(scene, list(cams.values()), points)
            pending.append(png_thread.submit(_write_frame_images, writer, name, i, images))
            while len(pending) > PENDING_FRAMES:
                pending.pop(0).result()
            bar.update(1)
        for future in pending:
            future.result()
    for cam_name in cams:
        writer.write_timestamps(name, cam_name, timeline.timestamps_ns)
    writer.write_segments(name, timeline.segments)
    for c, (cam_name, cam) in enumerate(cams.items()):
        if cam_name in detector.bias:
            points, conf = detect_keypoints(lm2d[c], vis[c], detector.bias[cam_name], cam.width, cam.height, detector.model, detector.rng)
            writer.write_keypoints(name, cam_name, points, conf)
    quat = quat_from_rotation(rot)  # (w, x, y, z), w >= 0
    names = np.array(list(cams))
    _write_npz(
        truth_dir / "hmc" / f"{name}.npz",
        frame_index=np.arange(n_frames, dtype=np.int32), timestamp_ns=timeline.timestamps_ns,
        b=timeline.b, gaze=timeline.gaze, head_quat=quat.astype(np.float32), head_t=timeline.head_t.astype(np.float32),
        cameras=names, landmark_ids=lm_ids.astype(np.int32),
        landmarks_2d=lm2d, visible=vis,
    )


def _write_subject_truth(truth_dir: Path, config: SynthConfig, seed: int, index: int, subject: SyntheticSubject) -> None:
    rig = subject.rig
    _write_json(truth_dir / "subject.json", {
        "subject_id": subject.subject_id, "seed": seed, "index": index, "preset": config.name,
        "face_model": rig.model.name, "face_model_version": rig.model.version,
        "rig_name": rig.definition.name, "rig_version": rig.definition.version,
        "tint": [round(float(x), 6) for x in subject.tint],
        "landmarks": "478 MediaPipe (embedding) then 68 Multi-PIE; HMC files keep iris (468-477) and the 68",
        **_non_default_options(config),
    })
    _write_npz(truth_dir / "identity.npz", identity=subject.identity.astype(np.float32), detail=subject.detail, neutral=rig.neutral, shape_gain=subject.shape_gain.astype(np.float32))
    rig.save(truth_dir / "rig.npz")


def _non_default_options(config: SynthConfig) -> dict:
    """The phone and variant options that differ from their defaults (absent by default: the default
    subject's truth stays byte-identical)."""
    default = SynthConfig(name=config.name)
    names = ("phone_yaw_deg", "phone_pitch_deg", "phone_only", "variant")
    return {n: getattr(config, n) for n in names if getattr(config, n) != getattr(default, n)}


def generate(config: SynthConfig, n_subjects: int, seed: int, out: Path, progress: bool = True, workers: int = 1) -> list[str]:
    """Synthesizes ``n_subjects`` subjects, ``workers`` at a time. Returns their ids.

    Subjects are independent (each draws from its own (seed, index) stream), so the
    output does not depend on ``workers``.
    """
    if workers <= 1 or n_subjects < 2:
        return [generate_subject(config, seed, i, Path(out), progress=progress)
                for i in track(range(n_subjects), n_subjects, "subjects", "subject",
                               enabled=progress and n_subjects > 1)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(generate_subject, config, seed, i, Path(out), progress=False) for i in range(n_subjects)]
        return [f.result() for f in track(futures, n_subjects, "subjects", "subject", enabled=progress)]
