"""Tests of the capture contract: reader, writer, validator (SPEC §2, docs/capture-format.md)."""

from __future__ import annotations

import inspect
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.errors import CaptureError
from storage import png_io
from storage.capture import Capture
from storage.capture_types import PinholeIntrinsics, Segment
from storage.capture_writer import CaptureWriter
from storage.validate import summarize_capture, validate_capture
from tests.capture_factory import MadeCapture, make_capture

REC = "hmc/rec000"


@pytest.fixture
def made(tmp_path: Path) -> MadeCapture:
    return make_capture(tmp_path)


# ------------------------------------------------------------------------------ helpers


def write_png(path: Path, image: np.ndarray) -> None:
    assert cv2.imwrite(str(path), image)


def edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def edit_timestamps(path: Path, edit: Callable[[list[str]], list[str]]) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], *edit(lines[1:])]) + "\n")


def swap_rows(rows: list[str], a: int, b: int) -> list[str]:
    stamps = [r.split(",")[1] for r in rows]
    stamps[a], stamps[b] = stamps[b], stamps[a]
    return [f"{i},{t}" for i, t in enumerate(stamps)]


def rig_camera(index: int, edit: Callable[[dict], object]) -> Callable[[dict], object]:
    return lambda rig: edit(rig["cameras"][index])


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def find_error(errors: list[CaptureError], root: Path, relpath: str) -> list[CaptureError]:
    target = root / relpath
    return [e for e in errors if Path(e.path) == target]


def all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ----------------------------------------------------------------------- valid capture


def test_valid_capture_validates_clean(made: MadeCapture) -> None:
    assert validate_capture(made.root, deep=True) == []
    assert validate_capture(made.root, deep=False) == []


def test_round_trip_reads_back_exactly(made: MadeCapture) -> None:
    cap = Capture.open(made.root)
    assert cap.root == made.root
    assert cap.subject_id == made.subject_id
    assert cap.phone_expressions == made.expressions
    assert cap.recordings == (made.recording,)
    assert cap.rig == made.rig
    assert cap.rig.camera("eye_left").mirrored and not cap.rig.camera("eye_right").mirrored
    assert [c.name for c in cap.rig.ground_truth] == [
        n for n in made.rig.names if n.startswith("gt_")
    ]
    for expression in made.expressions:
        assert cap.phone_intrinsics(expression) == made.phone_intrinsics[expression]
        assert cap.phone_frame_count(expression) == 2
        frames = list(cap.iter_phone_frames(expression))
        assert [f.index for f in frames] == [0, 1]
        for f in frames:
            np.testing.assert_array_equal(f.rgb, made.phone_rgb[(expression, f.index)])
            np.testing.assert_array_equal(f.depth_mm, made.phone_depth[(expression, f.index)])
            assert f.rgb.dtype == np.uint8 and f.rgb.shape == (48, 64, 3)
            assert f.depth_mm.dtype == np.uint16 and f.rgb_path.name.endswith("_rgb.png")
    rec = cap.recording(made.recording)
    assert rec.frame_count == 6
    assert rec.segments == made.segments
    assert rec.duration_s == pytest.approx(0.2)
    for cam in made.rig.names:
        np.testing.assert_array_equal(rec.timestamps_ns(cam), made.timestamps[cam])
        assert rec.timestamps_ns(cam).dtype == np.int64
        np.testing.assert_array_equal(rec.read_frame(cam, 3), made.frames[cam][3])
    frames = list(rec.iter_frames())
    assert [f.index for f in frames] == list(range(6))
    for f in frames:
        assert f.timestamp_ns == made.timestamps["eye_left"][f.index]
        assert set(f.images) == set(made.rig.names)
        for cam, img in f.images.items():
            np.testing.assert_array_equal(img, made.frames[cam][f.index])
    points, conf = rec.keypoints("eye_left")
    np.testing.assert_array_equal(points, made.keypoints["eye_left"][0])  # NaN-aware
    np.testing.assert_array_equal(conf, made.keypoints["eye_left"][1])
    assert points.dtype == np.float32 and np.isnan(points[0, 0]).all()
    assert rec.keypoints("eye_right") is None


def test_depth_in_metres_and_intrinsics_matrix(made: MadeCapture) -> None:
    frame = Capture.open(made.root).read_phone_frame("neutral", 0)
    depth = frame.depth_m
    assert depth.dtype == np.float32
    assert np.isnan(depth[0, :3]).all()  # raw 0 = invalid
    np.testing.assert_allclose(depth[1:], made.phone_depth[("neutral", 0)][1:] * 1e-3, rtol=1e-6)
    intr = PinholeIntrinsics(640, 480, 500.0, 510.0, 320.0, 240.0)
    np.testing.assert_array_equal(intr.K, [[500, 0, 320], [0, 510, 240], [0, 0, 1]])
    assert intr.K.dtype == np.float64


def test_output_is_byte_identical(tmp_path: Path) -> None:
    a = make_capture(tmp_path / "a")
    b = make_capture(tmp_path / "b")
    files_a, files_b = all_files(a.root), all_files(b.root)
    assert len(files_a) == 2 * 5 + 10 * 7 + 1 + 1 + 1 + 1  # phone, hmc, rig, segs, kps, manifest
    assert files_a == files_b


def test_writer_leaves_no_temporary_files(made: MadeCapture) -> None:
    assert not [p for p in made.root.rglob("*") if p.name.startswith(".")]


def test_capture_pickles(made: MadeCapture) -> None:
    cap = Capture.open(made.root)
    _ = cap.rig
    again = pickle.loads(pickle.dumps(cap))
    assert again.subject_id == cap.subject_id and again.rig == cap.rig


def test_summary(made: MadeCapture) -> None:
    text = summarize_capture(made.root)
    assert "subj0000" in text
    assert "jaw_drop_max" in text and "64x48" in text and "2 frames" in text
    assert "gt_boom_left" in text and "embedded" in text
    assert "rec000" in text and "6 frames" in text and "0.20 s" in text
    assert "peak 1" in text and "wink 1" in text


# ------------------------------------------------------------------------------ streaming


def test_iter_frames_streams_one_frame_at_a_time(made: MadeCapture, monkeypatch) -> None:
    rec = Capture.open(made.root).recording(made.recording)
    reads: list[str] = []
    real_decode = png_io.decode_png

    def counting_decode(data, path):
        reads.append(Path(path).relative_to(made.root).as_posix())
        return real_decode(data, path)

    monkeypatch.setattr(png_io, "decode_png", counting_decode)
    frames = rec.iter_frames(cameras=["eye_left", "mouth_left"])
    assert inspect.isgenerator(frames)
    assert reads == []  # nothing read before the first step
    first = next(frames)
    assert first.index == 0 and set(first.images) == {"eye_left", "mouth_left"}
    assert reads == [f"{REC}/eye_left/000000.png", f"{REC}/mouth_left/000000.png"]
    next(frames)
    assert len(reads) == 4
    reads.clear()
    img = rec.read_frame("glabella", 4)
    assert reads == [f"{REC}/glabella/000004.png"]
    np.testing.assert_array_equal(img, made.frames["glabella"][4])


def test_iter_frames_range_and_argument_errors(made: MadeCapture) -> None:
    rec = Capture.open(made.root).recording(made.recording)
    assert [f.index for f in rec.iter_frames(cameras=["glabella"], start=2, stop=4)] == [2, 3]
    assert list(rec.iter_frames(start=6)) == []
    with pytest.raises(KeyError, match="eye_middle"):
        rec.iter_frames(cameras=["eye_middle"])  # raised at the call, not at the first step
    with pytest.raises(IndexError):
        rec.iter_frames(start=3, stop=7)
    with pytest.raises(IndexError):
        rec.read_frame("eye_left", 6)
    cap = Capture.open(made.root)
    with pytest.raises(KeyError):
        cap.recording("rec999")
    with pytest.raises(KeyError):
        cap.phone_intrinsics("smile")
    with pytest.raises(IndexError):
        cap.read_phone_frame("neutral", 2)


def test_iter_frames_fails_at_the_bad_frame(made: MadeCapture) -> None:
    (made.root / REC / "eye_left" / "000003.png").write_bytes(b"garbage, not a png")
    frames = Capture.open(made.root).recording(made.recording).iter_frames()
    assert [next(frames).index for _ in range(3)] == [0, 1, 2]
    with pytest.raises(CaptureError, match="not a PNG file") as exc:
        next(frames)
    assert exc.value.path.endswith("eye_left/000003.png")


# ------------------------------------------------------------------------------ validator

Corrupt = Callable[[Path], object]


def _unlink(rel: str) -> Corrupt:
    return lambda root: (root / rel).unlink()


def _write(rel: str, data: bytes) -> Corrupt:
    return lambda root: (root / rel).write_bytes(data)


def _png(rel: str, image: np.ndarray) -> Corrupt:
    return lambda root: write_png(root / rel, image)


def _json(rel: str, edit: Callable[[dict], object]) -> Corrupt:
    return lambda root: edit_json(root / rel, edit)


def _stamps(rel: str, edit: Callable[[list[str]], list[str]]) -> Corrupt:
    return lambda root: edit_timestamps(root / rel, edit)


def _drop_last_frame(root: Path) -> None:
    (root / REC / "eye_right" / "000005.png").unlink()
    edit_timestamps(root / REC / "eye_right" / "timestamps.csv", lambda rows: rows[:-1])


def _truncate_png(rel: str) -> Corrupt:
    return lambda root: (root / rel).write_bytes((root / rel).read_bytes()[:60])


def _seg(index: int, **changes) -> Corrupt:
    def edit(obj: dict) -> None:
        for key, value in changes.items():
            if value is None:
                obj["segments"][index].pop(key, None)
            else:
                obj["segments"][index][key] = value

    return _json(f"{REC}/segments.json", edit)


_MONO16 = np.zeros((16, 16), np.uint8)
_KP = f"{REC}/keypoints/eye_left.npz"

# (id, corruption, file the error must name, phrases its problem must contain)
VALIDATOR_CASES: list[tuple[str, Corrupt, str, tuple[str, ...]]] = [
    ("missing-intrinsics", _unlink("phone/neutral/intrinsics.json"),
     "phone/neutral/intrinsics.json", ("missing intrinsics.json",)),
    ("intrinsics-missing-field", _json("phone/neutral/intrinsics.json", lambda o: o.pop("fx")),
     "phone/neutral/intrinsics.json", ('missing field "fx"',)),
    ("intrinsics-negative-focal", _json("phone/neutral/intrinsics.json", lambda o: o.update(fy=-5)),
     "phone/neutral/intrinsics.json", ('"fy" must be > 0',)),
    ("intrinsics-depth-unit", _json("phone/neutral/intrinsics.json", lambda o: o.update(depth_unit_m=1)),
     "phone/neutral/intrinsics.json", ("depth_unit_m", "millimetres")),
    ("depth-wrong-dtype", _png("phone/neutral/000001_depth.png", np.zeros((48, 64), np.uint8)),
     "phone/neutral/000001_depth.png", ("must be uint16 millimetres",)),
    ("depth-wrong-size", _png("phone/neutral/000001_depth.png", np.zeros((24, 32), np.uint16)),
     "phone/neutral/000001_depth.png", ("depth is 32x24 but RGB is 64x48",)),
    ("rgb-grayscale", _png("phone/jaw_drop_max/000000_rgb.png", np.zeros((48, 64), np.uint8)),
     "phone/jaw_drop_max/000000_rgb.png", ("RGB must be 8-bit with 3 channels", "grayscale")),
    ("rgb-vs-intrinsics", _json("phone/neutral/intrinsics.json", lambda o: o.update(width=80)),
     "phone/neutral/000000_rgb.png", ("RGB is 64x48 but intrinsics.json is 80x48",)),
    ("missing-depth", _unlink("phone/neutral/000001_depth.png"),
     "phone/neutral/000001_depth.png", ("missing file", "000001_rgb.png")),
    ("phone-gap", _unlink("phone/neutral/000000_rgb.png"),
     "phone/neutral/000000_rgb.png", ("missing file",)),
    ("expression-no-frames", lambda r: [p.unlink() for p in (r / "phone/neutral").glob("*.png")],
     "phone/neutral", ("no frames",)),
    ("missing-expression-folder", _json("capture.json", lambda o: o["phone"]["expressions"].append("smile")),
     "phone/smile", ("missing expression folder",)),
    ("garbage-image", _write(f"{REC}/eye_left/000003.png", b"\x00garbage bytes, not an image"),
     f"{REC}/eye_left/000003.png", ("not a PNG",)),
    ("truncated-image", _truncate_png(f"{REC}/mouth_right/000002.png"),
     f"{REC}/mouth_right/000002.png", ("cannot decode image",)),
    ("empty-image", _write("phone/neutral/000000_rgb.png", b""),
     "phone/neutral/000000_rgb.png", ("empty file",)),
    ("hmc-wrong-size", _png(f"{REC}/eye_left/000000.png", _MONO16),
     f"{REC}/eye_left/000000.png", ("image is 16x16 but rig camera eye_left is 32x32",)),
    ("hmc-not-mono", _png(f"{REC}/gt_glabella/000001.png", np.zeros((32, 32, 3), np.uint8)),
     f"{REC}/gt_glabella/000001.png", ("8-bit monochrome",)),
    ("frame-counts-differ", _drop_last_frame,
     REC, ("frame counts differ between cameras", "eye_right has 5", "9 other cameras have 6")),
    ("hmc-gap", _unlink(f"{REC}/glabella/000002.png"),
     f"{REC}/glabella/000002.png", ("missing file", "without gaps")),
    ("timestamps-not-increasing", _stamps(f"{REC}/eye_left/timestamps.csv", lambda r: swap_rows(r, 3, 4)),
     f"{REC}/eye_left/timestamps.csv", ("not strictly increasing at frame 4",)),
    ("timestamps-missing", _unlink(f"{REC}/mouth_left/timestamps.csv"),
     f"{REC}/mouth_left/timestamps.csv", ("missing timestamps.csv",)),
    ("timestamps-row-count", _stamps(f"{REC}/eye_left/timestamps.csv", lambda r: r[:-1]),
     f"{REC}/eye_left/timestamps.csv", ("has 5 rows", "6 frame images")),
    ("timestamps-bad-header", _stamps(f"{REC}/eye_left/timestamps.csv", lambda r: ["x", *r]),
     f"{REC}/eye_left/timestamps.csv", ("line 2",)),
    ("timestamps-out-of-sync",
     _stamps(f"{REC}/eye_right/timestamps.csv",
             lambda r: [f"{i},{int(t) + 20_000_000}" for i, t in (x.split(",") for x in r)]),
     f"{REC}/eye_right/timestamps.csv", ("out of sync with eye_left", "20.0 ms")),
    ("unknown-camera-in-segment", _seg(1, cameras=["eye_left", "eye_middle"]),
     f"{REC}/segments.json", ("unknown camera 'eye_middle'",)),
    ("unknown-segment-kind", _seg(0, kind="blink"),
     f"{REC}/segments.json", ("unknown segment kind 'blink'",)),
    ("peak-without-prompt", _seg(1, prompt=None),
     f"{REC}/segments.json", ('segments[1] (peak): missing field "prompt"',)),
    ("wink-without-eye", _seg(3, eye=None),
     f"{REC}/segments.json", ('segments[3] (wink): missing field "eye"',)),
    ("wink-bad-eye", _seg(3, eye="both"), f"{REC}/segments.json", ('"eye" must be',)),
    ("segment-past-end", _seg(5, end=7),
     f"{REC}/segments.json", ("end (7) is past the recording's 6 frames",)),
    ("segment-empty", _seg(0, start=2), f"{REC}/segments.json", ("must be before end",)),
    ("segments-unparseable", _write(f"{REC}/segments.json", b"{not json"),
     f"{REC}/segments.json", ("cannot parse JSON",)),
    ("unsafe-subject-dotdot", _json("capture.json", lambda o: o.update(subject_id="../evil")),
     "capture.json", ("subject id '../evil' is not a safe name",)),
    ("unsafe-subject-space", _json("capture.json", lambda o: o.update(subject_id="a b")),
     "capture.json", ("subject id 'a b' is not a safe name",)),
    ("subject-folder-mismatch", _json("capture.json", lambda o: o.update(subject_id="subj0001")),
     "capture.json", ("does not match the capture folder name",)),
    ("format-version", _json("capture.json", lambda o: o.update(format_version=2)),
     "capture.json", ("unsupported format_version 2",)),
    ("missing-manifest", _unlink("capture.json"), "capture.json", ("missing capture.json",)),
    ("missing-recording", _json("capture.json", lambda o: o["hmc"]["recordings"].append("rec001")),
     "hmc/rec001", ("missing recording folder",)),
    ("missing-rig", _unlink("hmc/rig.json"), "hmc/rig.json", ("missing rig.json",)),
    ("rig-reflection",
     _json("hmc/rig.json", rig_camera(2, lambda c: c.update(R_headset_from_camera=[[1, 0, 0], [0, 1, 0], [0, 0, -1]]))),
     "hmc/rig.json", ("cameras[2] (mouth_left)", "determinant -1")),
    ("rig-not-orthonormal",
     _json("hmc/rig.json", rig_camera(0, lambda c: c.update(R_headset_from_camera=[[2, 0, 0], [0, 1, 0], [0, 0, 1]]))),
     "hmc/rig.json", ("not orthonormal",)),
    ("rig-distortion-length", _json("hmc/rig.json", rig_camera(1, lambda c: c.update(distortion=[0, 0, 0, 0]))),
     "hmc/rig.json", ('"distortion" must be 5 finite numbers',)),
    ("rig-bad-role", _json("hmc/rig.json", rig_camera(1, lambda c: c.update(role="ir"))),
     "hmc/rig.json", ('"role" must be one of embedded, gt',)),
    ("rig-zero-focal", _json("hmc/rig.json", rig_camera(4, lambda c: c.update(fx=0))),
     "hmc/rig.json", ("cameras[4] (glabella)", '"fx" must be > 0')),
    ("rig-duplicate-name", _json("hmc/rig.json", rig_camera(1, lambda c: c.update(name="eye_left"))),
     "hmc/rig.json", ("'eye_left' is used twice",)),
    ("rig-no-cameras", _json("hmc/rig.json", lambda o: o.update(cameras=[])),
     "hmc/rig.json", ('"cameras" must be a non-empty list',)),
    ("missing-camera-folder", lambda r: shutil.rmtree(r / REC / "glabella"),
     f"{REC}/glabella", ("missing camera folder",)),
    ("extra-camera-folder", lambda r: (r / REC / "eye_middle").mkdir(),
     f"{REC}/eye_middle", ("not a camera of the rig",)),
    ("keypoints-bad-shape",
     lambda r: save_npz(r / _KP, points=np.zeros((6, 4, 3), np.float32), confidence=np.zeros((6, 4), np.float32)),
     _KP, ("points must be (T, P, 2) float32",)),
    ("keypoints-wrong-length",
     lambda r: save_npz(r / _KP, points=np.zeros((5, 4, 2), np.float32), confidence=np.zeros((5, 4), np.float32)),
     _KP, ("has 5 frames, the recording has 6",)),
    ("keypoints-unknown-camera", lambda r: shutil.copy(r / _KP, r / REC / "keypoints" / "nose.npz"),
     f"{REC}/keypoints/nose.npz", ("<rig camera>.npz",)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("corrupt", "relpath", "phrases"),
    [pytest.param(c, r, p, id=i) for i, c, r, p in VALIDATOR_CASES],
)
def test_validator_names_file_and_problem(
    made: MadeCapture, corrupt: Corrupt, relpath: str, phrases: tuple[str, ...]
) -> None:
    corrupt(made.root)
    errors = validate_capture(made.root, deep=True)
    hits = find_error(errors, made.root, relpath)
    assert hits, f"no error names {relpath}; got {[str(e) for e in errors]}"
    assert any(all(p in e.problem for p in phrases) for e in hits), [e.problem for e in hits]
    assert all(isinstance(e, CaptureError) for e in errors)


def test_validator_collects_every_problem(made: MadeCapture) -> None:
    for _, corrupt, _, _ in [c for c in VALIDATOR_CASES if c[0] in _INDEPENDENT]:
        corrupt(made.root)
    errors = validate_capture(made.root)
    for name, _, relpath, phrases in VALIDATOR_CASES:
        if name in _INDEPENDENT:
            hits = find_error(errors, made.root, relpath)
            assert any(all(p in e.problem for p in phrases) for e in hits), name


_INDEPENDENT = {
    "missing-intrinsics",
    "depth-wrong-dtype",
    "garbage-image",
    "timestamps-not-increasing",
    "unknown-camera-in-segment",
    "rig-reflection",
    "keypoints-bad-shape",
}


def test_shallow_validation_skips_decoding(made: MadeCapture) -> None:
    _truncate_png(f"{REC}/eye_left/000001.png")(made.root)
    assert validate_capture(made.root, deep=False) == []  # the header is intact
    assert [e.problem for e in validate_capture(made.root, deep=True)] == [
        "cannot decode image (corrupt or not an image)"
    ]


def test_validator_reports_progress(made: MadeCapture) -> None:
    calls: list[tuple[int, int]] = []
    assert validate_capture(made.root, deep=False, progress=lambda d, t: calls.append((d, t))) == []
    total = 2 * 2 + 10 * 6  # RGB + depth pairs, HMC frames
    assert calls[-1] == (total, total) and len(calls) == total


def test_validator_checks_prompts_when_given(made: MadeCapture) -> None:
    assert validate_capture(made.root, deep=False, prompts={"jaw_drop_max"}) == []
    errors = validate_capture(made.root, deep=False, prompts={"smile"})
    assert [e.problem for e in errors] == ["segments[1] (peak): unknown prompt 'jaw_drop_max'"]


def test_validator_on_missing_folder(tmp_path: Path) -> None:
    errors = validate_capture(tmp_path / "nope")
    assert len(errors) == 1 and "does not exist" in errors[0].problem


# --------------------------------------------------------------------------------- reader

READER_CASES = [
    ("missing-intrinsics", lambda c: c.phone_intrinsics("neutral"),
     "phone/neutral/intrinsics.json", "missing intrinsics.json"),
    ("depth-wrong-dtype", lambda c: c.read_phone_frame("neutral", 1),
     "phone/neutral/000001_depth.png", "depth must be uint16 millimetres (16-bit, 1 channel), got an 8-bit"),
    ("depth-wrong-size", lambda c: c.read_phone_frame("neutral", 1),
     "phone/neutral/000001_depth.png", "depth is 32x24 but RGB is 64x48"),
    ("garbage-image", lambda c: c.recording("rec000").read_frame("eye_left", 3),
     f"{REC}/eye_left/000003.png", "not a PNG file (bad signature)"),
    ("hmc-wrong-size", lambda c: c.recording("rec000").read_frame("eye_left", 0),
     f"{REC}/eye_left/000000.png", "image is 16x16 but rig camera eye_left is 32x32"),
    ("timestamps-not-increasing", lambda c: c.recording("rec000").timestamps_ns("eye_left"),
     f"{REC}/eye_left/timestamps.csv", "not strictly increasing at frame 4"),
    ("frame-counts-differ", lambda c: c.recording("rec000").frame_count,
     REC, "eye_right has 5"),
    ("unknown-camera-in-segment", lambda c: c.recording("rec000").segments,
     f"{REC}/segments.json", "unknown camera 'eye_middle'"),
    ("peak-without-prompt", lambda c: c.recording("rec000").segments,
     f"{REC}/segments.json", 'missing field "prompt"'),
    ("rig-reflection", lambda c: c.rig, "hmc/rig.json", "determinant -1"),
    ("keypoints-bad-shape", lambda c: c.recording("rec000").keypoints("eye_left"),
     _KP, "points must be (T, P, 2)"),
    ("phone-gap", lambda c: c.phone_frame_count("neutral"),
     "phone/neutral/000000_rgb.png", "without gaps"),
    ("unsafe-subject-dotdot", lambda c: c, "capture.json", "is not a safe name"),
    ("subject-folder-mismatch", lambda c: c, "capture.json", "does not match the capture folder"),
    ("format-version", lambda c: c, "capture.json", "unsupported format_version 2"),
]  # fmt: skip
_CORRUPTIONS = {name: corrupt for name, corrupt, _, _ in VALIDATOR_CASES}


@pytest.mark.parametrize(
    ("name", "read", "relpath", "phrase"), [pytest.param(*c, id=c[0]) for c in READER_CASES]
)
def test_reader_raises_capture_error_naming_file(
    made: MadeCapture, name: str, read: Callable[[Capture], object], relpath: str, phrase: str
) -> None:
    _CORRUPTIONS[name](made.root)
    with pytest.raises(CaptureError) as exc:
        read(Capture.open(made.root))
    assert Path(exc.value.path) == made.root / relpath
    assert phrase in exc.value.problem
    assert str(made.root / relpath) in str(exc.value)


# --------------------------------------------------------------------------------- writer


@pytest.mark.parametrize("subject_id", ["../evil", "a b", "", ".hidden", "a/b", "x" * 65, "a..b"])
def test_writer_rejects_unsafe_subject_id(tmp_path: Path, subject_id: str) -> None:
    with pytest.raises(CaptureError, match="not a safe name"):
        CaptureWriter(tmp_path / "subj", subject_id)
    assert not (tmp_path / "evil").exists()


def test_writer_rejects_contract_violations(tmp_path: Path) -> None:
    made = make_capture(tmp_path, finalize=False)
    w = CaptureWriter(made.root, made.subject_id)  # a fresh writer: rig is read from disk
    rgb = np.zeros((48, 64, 3), np.uint8)
    with pytest.raises(CaptureError, match="must equal the subject id"):
        CaptureWriter(tmp_path / "other", "subj0000")
    with pytest.raises(CaptureError, match="depth must be uint16"):
        w.write_phone_frame("neutral", 2, rgb, np.zeros((48, 64), np.float32))
    with pytest.raises(CaptureError, match="depth is 32x24 but RGB is 64x48"):
        w.write_phone_frame("neutral", 2, rgb, np.zeros((24, 32), np.uint16))
    with pytest.raises(CaptureError, match="intrinsics.json is 64x48"):
        w.write_phone_frame(
            "neutral", 2, np.zeros((10, 10, 3), np.uint8), np.zeros((10, 10), np.uint16)
        )
    with pytest.raises(CaptureError, match="not a safe name"):
        w.write_phone_frame("../up", 0, rgb, np.zeros((48, 64), np.uint16))
    with pytest.raises(CaptureError, match="not in the rig"):
        w.write_hmc_frame("rec000", "eye_middle", 0, np.zeros((32, 32), np.uint8))
    with pytest.raises(CaptureError, match="16x16 but rig camera eye_left is 32x32"):
        w.write_hmc_frame("rec000", "eye_left", 0, _MONO16)
    with pytest.raises(CaptureError, match="not strictly increasing at frame 2"):
        w.write_timestamps("rec000", "eye_left", np.array([1, 2, 2, 3]))
    with pytest.raises(CaptureError, match="unknown camera 'nose'"):
        w.write_segments("rec000", [Segment("neutral", 0, 2, cameras=("nose",))])
    with pytest.raises(CaptureError, match='missing field "prompt"'):
        w.write_segments("rec000", [Segment("peak", 0, 2)])
    with pytest.raises(CaptureError, match="intrinsics.json was not written"):
        w.finalize(("neutral", "smile"), ("rec000",))
    assert not (made.root / "capture.json").exists()
    assert not (made.root / "phone/neutral/000002_rgb.png").exists()  # nothing half-written
    w.finalize(("neutral",), ("rec000",))
    assert Capture.open(made.root).phone_expressions == ("neutral",)
