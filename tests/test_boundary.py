"""Units of the capture boundary: names, bounded reads, Pillow headers, fingerprints."""

from __future__ import annotations

import os
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.artifacts import capture_fingerprint, read_subject_id
from pipeline.errors import CaptureError, ConfigError, StageError
from pipeline.serialize import StageOutput, encode
from pipeline.stage import Stage
from storage import png_io
from storage.capture_files import parse_json_bytes
from storage.capture_fs import CaptureLimits, read_capture_bytes, scan_tree
from storage.capture_layout import HMC_FILE_RE, PHONE_FILE_RE, is_safe_name
from storage.validate import validate_capture
from tests.capture_factory import make_capture


@pytest.fixture
def made(tmp_path: Path):
    return make_capture(tmp_path, cameras=("eye_left", "eye_right"), n_phone_frames=1)


@pytest.mark.parametrize("name", ["subj0000\n", "subj\n0000", "a" * 64 + "\n"])
def test_names_with_a_newline_are_unsafe(name: str) -> None:
    assert not is_safe_name(name)
    with pytest.raises(ConfigError):
        Stage(name="validate\n", version="1", fn=len, inputs=("capture",))
    with pytest.raises(ConfigError):
        Stage(name="v", version="1", fn=len, inputs=("capture",), config_fields=("a.b\n",))
    with pytest.raises(StageError):
        encode(StageOutput(arrays={"x\n": np.zeros(1)}))


def test_frame_names_are_ascii_digits_exactly() -> None:
    assert HMC_FILE_RE.fullmatch("000000.png") and PHONE_FILE_RE.fullmatch("000001_rgb.png")
    for name in ("000000.png\n", "٠٠٠٠٠٠.png", "0000000000000.png", "000001_rgb.png\n"):
        assert not HMC_FILE_RE.fullmatch(name) and not PHONE_FILE_RE.fullmatch(name)


def test_subject_id_with_trailing_newline_fails_before_validation(made) -> None:
    manifest = made.root / "capture.json"
    manifest.write_text(manifest.read_text().replace('"subj0000"', '"subj0000\\n"'))
    with pytest.raises(CaptureError, match="not a safe name") as exc:
        read_subject_id(made.root)
    assert exc.value.path == str(manifest)


def test_a_far_frame_index_costs_no_time(made) -> None:
    folder = made.root / "hmc/rec000/eye_left"
    (folder / "999999999.png").write_bytes((folder / "000000.png").read_bytes())
    t0 = time.perf_counter()
    errors = validate_capture(made.root, deep=False)
    assert time.perf_counter() - t0 < 5
    assert any("999999993 missing" in e.problem for e in errors), [str(e) for e in errors]


def test_png_header_from_pillow_matches_the_file(made) -> None:
    root = made.root
    cases = {
        "phone/neutral/000000_rgb.png": (64, 48, 8, 2),
        "phone/neutral/000000_depth.png": (64, 48, 16, 0),
        "hmc/rec000/eye_left/000000.png": (32, 32, 8, 0),
    }
    for rel, (w, h, bits, ctype) in cases.items():
        header = png_io.read_png_header(root / rel, root)
        assert (header.width, header.height, header.bit_depth, header.color_type) == (w, h, bits, ctype)


def test_images_beyond_the_limits_are_never_decoded(made, monkeypatch) -> None:
    def no_decode(data, path):
        raise AssertionError("decoded")

    monkeypatch.setattr(png_io, "decode_png", no_decode)
    small = CaptureLimits(max_image_side=16)
    path = made.root / "hmc/rec000/eye_left/000000.png"
    with pytest.raises(CaptureError, match="beyond the limits"):
        png_io.read_image(path, "mono", made.root, limits=small)
    with pytest.raises(CaptureError, match="image is 32x32 but rig camera"):  # size first too
        png_io.read_image(path, "mono", made.root, expected=(16, 16), source="rig camera eye_left")


def test_json_rules() -> None:
    p = Path("x.json")
    assert parse_json_bytes(b'{"a": [1, 2.5]}', p) == {"a": [1, 2.5]}
    for data, phrase in [
        (b'{"a": 1, "a": 2}', "twice"),
        (b"[" * 40 + b"]" * 40, "nests deeper than 32"),
        (b"[" * 100_000 + b"]" * 100_000, "nests deeper than 32"),
        (b'{"a": 1e999}', "overflows"),
        (b'{"a": -Infinity}', "not valid JSON"),
        (b"\xef\xbb\xbf{}", "byte-order mark"),
    ]:
        with pytest.raises(CaptureError, match=phrase):
            parse_json_bytes(data, p)


def test_reads_are_bounded_and_regular_files_only(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 100)
    with pytest.raises(CaptureError, match="more than the limit"):
        read_capture_bytes(tmp_path / "big", tmp_path, 99)
    assert read_capture_bytes(tmp_path / "big", tmp_path, 100) == b"x" * 100
    os.mkfifo(tmp_path / "fifo")
    done = threading.Event()

    def read() -> None:  # a blocking open would hang here for ever
        with pytest.raises(CaptureError, match="FIFO"):
            read_capture_bytes(tmp_path / "fifo", tmp_path, 100)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(5), "reading a FIFO blocked"


def test_capture_errors_keep_non_utf8_names_printable() -> None:
    err = CaptureError(os.fsdecode(b"/c/stray-\xff.png"), "bad")
    assert err.path == "/c/stray-\\xff.png" and str(err).encode("utf-8")
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.problem) == (err.path, err.problem)


def test_fingerprint_survives_hostile_entries(made) -> None:
    root = made.root
    _, before = capture_fingerprint(root)
    with open(os.path.join(os.fsencode(root), b"stray-\xff"), "wb") as fh:
        fh.write(b"x")
    os.mkfifo(root / "fifo")
    (root / "dangling").symlink_to(root / "nothing")
    (root / "loop").symlink_to("loop")
    subject, after = capture_fingerprint(root)
    assert subject == "subj0000" and after != before
    assert capture_fingerprint(root, "content")[0] == "subj0000"  # opens no FIFO
    entries, problems = scan_tree(root)
    assert {e.rel for e in entries} >= {b"stray-\xff", b"fifo", b"dangling", b"loop"}
    assert len(problems) == 4


def test_tree_limits_raise(made) -> None:
    with pytest.raises(CaptureError, match="more than 10 files"):
        scan_tree(made.root, CaptureLimits(max_entries=10))
    with pytest.raises(CaptureError, match="deeper than 2"):
        scan_tree(made.root, CaptureLimits(max_tree_depth=2))


def test_keypoint_arrays_are_checked_before_inflating(made) -> None:
    from storage.capture_files import check_keypoints

    path = made.root / "hmc/rec000/keypoints/eye_left.npz"
    _, problems = check_keypoints(path, made.root, 6, CaptureLimits(max_array_bytes=100))
    assert problems and "more than the limit of 100" in problems[0]
    (points, conf), problems = check_keypoints(path, made.root, 6)
    assert problems == [] and points.shape == (6, 4, 2) and conf.dtype == np.float32


def test_published_manifest_schema(made) -> None:
    """Data engineers validate capture.json with the shipped schema and any validator."""
    import json

    import jsonschema

    from storage.capture_schema import MANIFEST_SCHEMA_PATH, check_manifest

    schema = json.loads(MANIFEST_SCHEMA_PATH.read_text())
    good = json.loads((made.root / "capture.json").read_text())
    jsonschema.validate(good, schema)
    assert check_manifest(good)[1] == []
    for edit, problem in [
        (lambda m: m["phone"].update(expressions=["neutral", "neutral"]),
         "field \"phone.expressions\": expression 'neutral' is listed twice"),
        (lambda m: m["hmc"].update(recordings=[]),
         'field "hmc.recordings" must list at least one recording'),
        (lambda m: m["hmc"].update(rig="hmc/../../x"),
         "field \"hmc.rig\" must be a relative path inside the capture, got 'hmc/../../x'"),
        (lambda m: m["hmc"].pop("rig"), 'hmc: missing field "rig"'),
        (lambda m: m.update(subject_id="subj0000\n"), "subject id is not a safe name"),
        (lambda m: m.update(format="other"), 'field "format" must be "hmc-pgt-capture"'),
    ]:
        bad = json.loads(json.dumps(good))
        edit(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        problems = check_manifest(bad)[1]
        assert any(p.startswith(problem) for p in problems), problems


def test_validate_checks_prompts_against_the_rig_definition(made, tmp_path, capsys) -> None:
    import json

    from rigs.definition import DEFAULT_DEFINITION
    from workflows.cli import main

    segments = made.root / "hmc/rec000/segments.json"
    segments.write_text(segments.read_text().replace('"jaw_drop_max"', '"tongue_out_max"'))
    assert main(["validate", str(made.root), "--shallow"]) == 1
    assert "unknown prompt 'tongue_out_max'" in capsys.readouterr().err
    definition = json.loads(DEFAULT_DEFINITION.read_text())
    definition["prompts"].append({"name": "tongue_out_max", "art_prior": {}})
    custom = tmp_path / "rig_definition.json"
    custom.write_text(json.dumps(definition))
    assert main(["validate", str(made.root), "--shallow", "--rig-definition", str(custom)]) == 0


def test_a_dangling_capture_symlink_in_a_backfill_root_is_not_dropped(made, tmp_path) -> None:
    from workflows.label import find_captures

    root = tmp_path / "captures"
    root.mkdir()
    (root / "gone").symlink_to(tmp_path / "nowhere")
    (root / "subj0000").symlink_to(made.root)
    assert find_captures(root) == [root / "gone", root / "subj0000"]
    with pytest.raises(CaptureError, match="dangling symlink"):
        read_subject_id(root / "gone")
