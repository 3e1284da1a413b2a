"""Malformed and hostile captures, built from one small valid capture (``tests/test_adversarial.py``).

Each :class:`Case` copies a valid template capture and breaks one thing the way a careless
or hostile data engineer would: broken files, wrong types and shapes, oversized headers and
archives, symlinks out of the capture, FIFOs, non-UTF-8 names, duplicate subject ids. Every
case names the file (relative to its capture) that an error must point at.

Files outside the captures (targets of escaping symlinks) hold :data:`SECRET`, which must
never appear in any message.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from storage.capture_files import encode_npz
from tests.capture_factory import make_capture

SECRET = "SECRET-7f3a9c-do-not-leak"
REC = "hmc/rec000"
CAMERAS = ("eye_left", "eye_right")
N_FRAMES = 6
HMC_SIZE = (32, 32)
PHONE_SIZE = (64, 48)
KP = f"{REC}/keypoints/eye_left.npz"

Mutate = Callable[[Path, Path], object]  # (capture root, folder outside every capture)


@dataclass(frozen=True)
class Case:
    """One broken capture.

    Attributes:
        name: the case, also the capture folder's name and (unless the case changes it)
            its subject id.
        mutate: breaks a fresh copy of the template.
        relpath: the file or folder, relative to the capture, that the error must name.
        phrase: words the message must contain (lower-cased comparison), or "".
        alone_invalid: False when the capture is valid on its own (duplicate subject ids
            only fail together, in a backfill).
        folder: the capture folder's name when it differs from ``name`` (bytes allowed).
    """

    name: str
    mutate: Mutate
    relpath: str
    phrase: str = ""
    alone_invalid: bool = True
    folder: str | bytes | None = None


# ---------------------------------------------------------------------------- builders


def build_template(parent: Path) -> Path:
    """A small valid capture: 2 expressions x 1 phone frame, 2 HMC cameras x 6 frames."""
    made = make_capture(
        parent, subject_id="template", expressions=("neutral", "jaw_drop_max"),
        n_phone_frames=1, phone_size=PHONE_SIZE, n_frames=N_FRAMES, hmc_size=HMC_SIZE,
        cameras=CAMERAS, keypoints=("eye_left",),
    )  # fmt: skip
    return made.root


def build_outside(parent: Path, template: Path) -> Path:
    """Files outside every capture: valid-looking copies (so only containment can refuse
    them) and secrets."""
    out = parent / "outside"
    out.mkdir()
    (out / "secret.txt").write_text(f"{SECRET}\n")
    (out / "secret.json").write_text(json.dumps({"subject_id": SECRET, "fps": SECRET}))
    shutil.copy(template / "capture.json", out / "capture.json")
    shutil.copy(template / "hmc/rig.json", out / "rig.json")
    shutil.copy(template / REC / "eye_left/000001.png", out / "frame.png")
    shutil.copy(template / REC / "eye_left/timestamps.csv", out / "timestamps.csv")
    shutil.copy(template / KP, out / "eye_left.npz")
    shutil.copytree(template / "phone/neutral", out / "neutral")
    shutil.copytree(template / REC / "eye_right", out / "eye_right")
    return out


def build_case(parent: Path, template: Path, outside: Path, case: Case) -> Path:
    """Copies the template to ``parent/<folder>``, sets its subject id, applies the case."""
    folder = case.folder if case.folder is not None else case.name
    root = Path(os.fsdecode(os.path.join(os.fsencode(parent), os.fsencode(folder))))
    shutil.copytree(template, root, symlinks=True)
    _edit(root / "capture.json", lambda m: m.__setitem__("subject_id", case.name))
    case.mutate(root, outside)
    return root


# --------------------------------------------------------------------------- mutations


def _edit(path: Path, fn: Callable[[dict], object]) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def edit(rel: str, fn: Callable[[dict], object]) -> Mutate:
    return lambda root, _: _edit(root / rel, fn)


def setkey(rel: str, *keys: object, value: object) -> Mutate:
    """Sets ``obj[k0][k1]...[kn] = value`` in a JSON file."""

    def fn(obj: dict) -> None:
        for k in keys[:-1]:
            obj = obj[k]  # type: ignore[index]
        obj[keys[-1]] = value  # type: ignore[index]

    return edit(rel, fn)


def write(rel: str, data: bytes | str) -> Mutate:
    raw = data.encode() if isinstance(data, str) else data

    def fn(root: Path, _: Path) -> None:
        path = root / rel
        if path.is_symlink() or path.is_file():
            path.unlink()
        path.write_bytes(raw)

    return fn


def remove(rel: str) -> Mutate:
    def fn(root: Path, _: Path) -> None:
        path = root / rel
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()

    return fn


def replace_with(rel: str, make: Callable[[Path, Path], object]) -> Mutate:
    """Removes ``rel`` and calls ``make(path, outside)`` to put something else there."""

    def fn(root: Path, outside: Path) -> None:
        remove(rel)(root, outside)
        make(root / rel, outside)

    return fn


def symlink_out(rel: str, target: str) -> Mutate:
    return replace_with(rel, lambda p, out: p.symlink_to(out / target))


def fifo(rel: str) -> Mutate:
    return replace_with(rel, lambda p, _: os.mkfifo(p))


def png(rel: str, image: np.ndarray) -> Mutate:
    def fn(root: Path, _: Path) -> None:
        ok, buf = cv2.imencode(".png", image)
        assert ok
        (root / rel).write_bytes(buf.tobytes())

    return fn


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))  # fmt: skip


def chunk_flood(n: int) -> bytes:
    """A valid 32x32 grayscale PNG with ``n`` text chunks before its pixel data."""
    ihdr = struct.pack(">IIBBBBB", *HMC_SIZE, 8, 0, 0, 0, 0)
    text = _chunk(b"tEXt", b"k\0v")
    idat = zlib.compress(b"\0" * (HMC_SIZE[1] * (HMC_SIZE[0] + 1)))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + text * n + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))  # fmt: skip


def big_rgb_png(width: int, height: int) -> bytes:
    """A valid, all-black 8-bit RGB PNG, compressed row by row (never held decoded)."""
    comp = zlib.compressobj(1)
    row = b"\0" * (1 + 3 * width)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return png_bytes(width, height, 8, 2, idat)


def npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=True)
    return buf.getvalue()


def npy_header_only(shape: tuple[int, ...]) -> bytes:
    """A .npy member whose header declares ``shape`` float32 but holds almost no data."""
    import io

    buf = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + b"\0" * 64


def zip_members(members: dict[str, bytes], compress: bool = False) -> bytes:
    import io

    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def zip_bomb(path: Path, inflated_bytes: int) -> None:
    """A keypoints archive whose ``points`` member honestly inflates to ``inflated_bytes``."""
    t = inflated_bytes // (200 * 2 * 4)
    header = npy_header_only((t, 200, 2))[:-64]
    conf = npy_bytes(np.zeros((t, 200), np.float32)[:1])  # small, wrong, never reached
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("points.npy", "w", force_zip64=True) as member:
            member.write(header)
            block = b"\0" * (1 << 22)
            left = t * 200 * 2 * 4
            while left > 0:
                member.write(block[: min(left, len(block))])
                left -= len(block)
        zf.writestr("confidence.npy", conf)


def keypoints(points: np.ndarray, confidence: np.ndarray) -> Mutate:
    return write(KP, encode_npz({"points": points, "confidence": confidence}))


def stamps_lines(cam: str, fn: Callable[[list[str]], list[str]]) -> Mutate:
    def mutate(root: Path, _: Path) -> None:
        path = root / REC / cam / "timestamps.csv"
        lines = path.read_text().splitlines()
        path.write_text("\n".join(fn(lines)) + "\n")

    return mutate


def both(*mutations: Mutate) -> Mutate:
    def fn(root: Path, outside: Path) -> None:
        for m in mutations:
            m(root, outside)

    return fn


def _deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def _symlink_loop(path: Path, _: Path) -> None:
    other = path.with_name("loop-partner.png")
    path.symlink_to(other.name)
    other.symlink_to(path.name)


def _add_frame(cam: str, index: int) -> Mutate:
    def fn(root: Path, _: Path) -> None:
        shutil.copy(root / REC / cam / "000000.png", root / REC / cam / f"{index:06d}.png")

    return fn


def _jpeg(rel: str) -> Mutate:
    def fn(root: Path, _: Path) -> None:
        ok, buf = cv2.imencode(".jpg", np.zeros((PHONE_SIZE[1], PHONE_SIZE[0], 3), np.uint8))
        assert ok
        (root / rel).write_bytes(buf.tobytes())

    return fn


def _truncate(rel: str, keep: int) -> Mutate:
    return lambda root, _: (root / rel).write_bytes((root / rel).read_bytes()[:keep])


def _non_utf8_file(folder: str) -> Mutate:
    def fn(root: Path, _: Path) -> None:
        target = os.path.join(os.fsencode(root / folder), b"stray-\xff\xfe.png")
        with open(target, "wb") as fh:
            fh.write(b"not read")

    return fn


def _char_device(path: Path, _: Path) -> None:
    """A copy of /dev/zero's device node (an endless file) where a frame belongs."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except PermissionError:  # not root: a FIFO is refused by the same rule
        os.mkfifo(path)


def _socket(path: Path, _: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(os.fspath(path))  # the socket file stays after the socket closes


def _manifest_bytes(root: Path) -> bytes:
    return (root / "capture.json").read_bytes()


# -------------------------------------------------------------------------------- cases

_PEAK = 1  # index of the peak segment in capture_factory.default_segments
_GRAY = np.zeros((PHONE_SIZE[1], PHONE_SIZE[0]), np.uint8)
_MONO = np.zeros((HMC_SIZE[1], HMC_SIZE[0]), np.uint8)
_PH_RGB = "phone/neutral/000000_rgb.png"
_PH_DEPTH = "phone/neutral/000000_depth.png"
_FRAME = f"{REC}/eye_left/000001.png"
_TS = f"{REC}/eye_left/timestamps.csv"
_SEGS = f"{REC}/segments.json"
_RIG = "hmc/rig.json"
_T, _P = N_FRAMES, 4


def _cases() -> list[Case]:
    c = Case
    pts, conf = np.zeros((_T, _P, 2), np.float32), np.ones((_T, _P), np.float32)
    return [
        # ------------------------------------------------------------ capture.json
        c("man-missing", remove("capture.json"), "capture.json", "missing"),
        c("man-empty", write("capture.json", b""), "capture.json", "empty"),
        c("man-not-json", write("capture.json", "{not json"), "capture.json", "json"),
        c("man-bom", lambda r, o: (r / "capture.json").write_bytes(b"\xef\xbb\xbf" + _manifest_bytes(r)),
          "capture.json", "byte-order mark"),
        c("man-bad-utf8", write("capture.json", b'{"subject_id": "man-bad-utf8", "x": "\xff\xfe"}'),
          "capture.json", "utf-8"),
        c("man-duplicate-keys", lambda r, o: (r / "capture.json").write_text(
            _manifest_bytes(r).decode()[:-1] + ', "format_version": 2}'), "capture.json", "twice"),
        c("man-deeply-nested", write("capture.json", _deep_json(100_000)), "capture.json", "nests deeper"),
        c("man-deep-in-field", setkey("capture.json", "phone", value=json.loads(_deep_json(60))),
          "capture.json", "nests deeper"),
        c("man-huge", write("capture.json", b'{"pad": "' + b" " * (17 << 20) + b'"}'), "capture.json", "limit"),
        c("man-nan", write("capture.json", '{"format_version": NaN}'), "capture.json", "nan"),
        c("man-overflow-float", write("capture.json", '{"format_version": 1e400}'), "capture.json", "overflow"),
        c("man-huge-int", write("capture.json", '{"format_version": 1' + "0" * 5000 + "}"), "capture.json"),
        c("man-wrong-type", setkey("capture.json", "phone", value="neutral"), "capture.json", "json object"),
        c("man-negative-version", setkey("capture.json", "format_version", value=-1), "capture.json"),
        c("man-bool-version", setkey("capture.json", "format_version", value=True), "capture.json", "integer"),
        c("man-not-object", write("capture.json", "[1, 2, 3]"), "capture.json", "object"),
        c("man-rig-traversal", setkey("capture.json", "hmc", "rig", value="../../etc/passwd"),
          "capture.json", "inside the capture"),
        c("man-rig-absolute", setkey("capture.json", "hmc", "rig", value="/etc/passwd"),
          "capture.json", "inside the capture"),
        c("man-expression-traversal", setkey("capture.json", "phone", "expressions", value=["../../etc"]),
          "capture.json", "safe name"),
        c("man-recording-missing", setkey("capture.json", "hmc", "recordings", value=["rec999"]),
          "hmc/rec999", "missing"),
        c("man-id-trailing-newline", setkey("capture.json", "subject_id", value="man-id-trailing-newline\n"),
          "capture.json", "safe name"),
        c("man-id-traversal", setkey("capture.json", "subject_id", value="../evil"), "capture.json", "safe name"),
        c("man-id-mismatch", setkey("capture.json", "subject_id", value="someone-else"),
          "capture.json", "does not match"),
        c("man-symlink-out", symlink_out("capture.json", "capture.json"), "capture.json", "outside"),
        c("man-symlink-secret", symlink_out("capture.json", "secret.json"), "capture.json", "outside"),
        c("man-dangling", symlink_out("capture.json", "nothing-here.json"), "capture.json", "dangling"),
        c("man-fifo", fifo("capture.json"), "capture.json", "fifo"),
        c("man-is-folder", replace_with("capture.json", lambda p, _: p.mkdir()), "capture.json"),
        c("dup-subject", lambda r, o: None, "capture.json", "also declared", alone_invalid=False),
        # ---------------------------------------------------------------- rig.json
        c("rig-missing", remove(_RIG), _RIG, "missing"),
        c("rig-deeply-nested", write(_RIG, '{"cameras": ' + _deep_json(50_000) + "}"), _RIG, "nests deeper"),
        c("rig-nan-fx", lambda r, o: (r / _RIG).write_text((r / _RIG).read_text().replace(
            '"fx": 28.8', '"fx": NaN', 1)), _RIG, "nan"),
        c("rig-negative-fx", setkey(_RIG, "cameras", 0, "fx", value=-5.0), _RIG, "> 0"),
        c("rig-width-string", setkey(_RIG, "cameras", 0, "width", value="32"), _RIG, "integer"),
        c("rig-width-huge", setkey(_RIG, "cameras", 0, "width", value=10**12), _RIG, "<="),
        c("rig-distortion-short", setkey(_RIG, "cameras", 0, "distortion", value=[0.1, 0, 0, 0]), _RIG),
        c("rig-reflection", setkey(_RIG, "cameras", 0, "R_headset_from_camera",
                                   value=[[-1, 0, 0], [0, 1, 0], [0, 0, 1]]), _RIG, "determinant"),
        c("rig-fps-zero", setkey(_RIG, "fps", value=0), _RIG, "> 0"),
        c("rig-no-cameras", setkey(_RIG, "cameras", value=[]), _RIG, "non-empty"),
        c("rig-duplicate-camera", edit(_RIG, lambda o: o["cameras"].append(dict(o["cameras"][0]))),
          _RIG, "twice"),
        c("rig-symlink-out", symlink_out(_RIG, "rig.json"), _RIG, "outside"),
        c("rig-camera-flood", setkey(_RIG, "cameras", value=[{}] * 100_000), _RIG, "checking stopped"),
        c("rig-version-list", setkey(_RIG, "rig_version", value=["x"] * 3), _RIG, "string"),
        # ------------------------------------------------------------------- phone
        c("ph-intrinsics-missing", remove("phone/neutral/intrinsics.json"), "phone/neutral/intrinsics.json"),
        c("ph-intrinsics-negative", setkey("phone/neutral/intrinsics.json", "fy", value=-1.0),
          "phone/neutral/intrinsics.json", "> 0"),
        c("ph-rgb-truncated", _truncate(_PH_RGB, 60), _PH_RGB, "decode"),
        c("ph-rgb-gray", png(_PH_RGB, _GRAY), _PH_RGB, "3 channels"),
        c("ph-rgb-16bit", png(_PH_RGB, np.zeros((PHONE_SIZE[1], PHONE_SIZE[0], 3), np.uint16)),
          _PH_RGB, "16-bit"),
        c("ph-rgb-rgba", png(_PH_RGB, np.zeros((PHONE_SIZE[1], PHONE_SIZE[0], 4), np.uint8)), _PH_RGB, "rgba"),
        c("ph-rgb-palette", write(_PH_RGB, png_bytes(PHONE_SIZE[0], PHONE_SIZE[1], 8, 3, zlib.compress(b""))),
          _PH_RGB, "palette"),
        c("ph-rgb-jpeg", _jpeg(_PH_RGB), _PH_RGB, "not a png"),
        c("ph-rgb-empty", write(_PH_RGB, b""), _PH_RGB, "empty"),
        c("ph-rgb-wrong-size", png(_PH_RGB, np.zeros((10, 10, 3), np.uint8)), _PH_RGB, "10x10"),
        c("ph-rgb-18000", write(_PH_RGB, big_rgb_png(18000, 18000)), _PH_RGB, "limits"),
        c("ph-depth-8bit", png(_PH_DEPTH, _GRAY), _PH_DEPTH, "uint16"),
        c("ph-depth-missing", remove(_PH_DEPTH), _PH_DEPTH, "missing"),
        c("ph-frame-gap", lambda r, o: [shutil.copy(r / p, r / p.replace("000000", "000002"))
                                        for p in (_PH_RGB, _PH_DEPTH)],
          "phone/neutral/000001_rgb.png", "gaps"),
        c("ph-expression-symlink-out", symlink_out("phone/neutral", "neutral"), "phone/neutral", "outside"),
        # --------------------------------------------------------------- hmc frames
        c("hmc-png-60000", write(_FRAME, png_bytes(60000, 60000, 8, 0, zlib.compress(b"\0" * 64))),
          _FRAME, "limits"),
        c("hmc-frame-char-device", replace_with(_FRAME, _char_device), _FRAME, "not a regular file"),
        c("root-stray-socket", lambda r, o: _socket(r / "sock", o), "sock", "socket"),
        c("hmc-png-chunk-flood", write(_FRAME, chunk_flood(100_000)), _FRAME, "limit"),
        c("hmc-fifo-frame", fifo(_FRAME), _FRAME, "fifo"),
        c("hmc-frame-symlink-out", symlink_out(_FRAME, "frame.png"), _FRAME, "outside"),
        c("hmc-frame-dangling", symlink_out(_FRAME, "no-such.png"), _FRAME, "dangling"),
        c("hmc-frame-loop", replace_with(_FRAME, _symlink_loop), _FRAME, "loop"),
        c("hmc-frame-is-folder", replace_with(_FRAME, lambda p, _: p.mkdir()), _FRAME),
        c("hmc-frame-wrong-size", png(_FRAME, np.zeros((16, 16), np.uint8)), _FRAME, "16x16"),
        c("hmc-frame-rgb", png(_FRAME, np.zeros((*HMC_SIZE, 3), np.uint8)), _FRAME, "monochrome"),
        c("hmc-frame-16bit", png(_FRAME, np.zeros(HMC_SIZE, np.uint16)), _FRAME, "16-bit"),
        c("hmc-frame-truncated", _truncate(_FRAME, 50), _FRAME, "decode"),
        c("hmc-frame-bad-crc", lambda r, o: (r / _FRAME).write_bytes(
            (r / _FRAME).read_bytes()[:29] + b"\0\0\0\0" + (r / _FRAME).read_bytes()[33:]), _FRAME, "corrupt"),
        c("hmc-frame-missing", remove(_FRAME), _FRAME, "missing"),
        c("hmc-frame-count-mismatch", _add_frame("eye_right", N_FRAMES), f"{REC}/eye_right/timestamps.csv",
          "rows"),
        c("hmc-camera-symlink-out", symlink_out(f"{REC}/eye_right", "eye_right"), f"{REC}/eye_right", "outside"),
        c("hmc-camera-missing", remove(f"{REC}/eye_right"), f"{REC}/eye_right", "missing"),
        c("hmc-unknown-camera-folder", lambda r, o: (r / REC / "eye_middle").mkdir(),
          f"{REC}/eye_middle", "not a camera"),
        c("hmc-non-utf8-name", _non_utf8_file(f"{REC}/eye_left"), f"{REC}/eye_left/stray-", "utf-8"),
        c("root-non-utf8-name", _non_utf8_file("."), "stray-", "utf-8"),
        c("root-stray-fifo", lambda r, o: os.mkfifo(r / "notes"), "notes", "fifo"),
        c("root-stray-symlink-out", lambda r, o: (r / "extra").symlink_to(o / "secret.txt"), "extra", "outside"),
        c("root-symlink-to-root", lambda r, o: (r / "phone" / "up").symlink_to(Path("/")), "phone/up", "outside"),
        c("root-non-utf8-folder", lambda r, o: None, "capture.json", "does not match",
          folder=b"root-non-utf8-folder-\xff"),
        # ---------------------------------------------------------------- timestamps
        c("ts-not-increasing", stamps_lines("eye_left", lambda ls: [ls[0], ls[1], ls[3].replace("2,", "1,"),
                                                                    ls[2].replace("1,", "2,"), *ls[4:]]),
          _TS, "increasing"),
        c("ts-missing", remove(_TS), _TS, "missing"),
        c("ts-negative", stamps_lines("eye_left", lambda ls: [ls[0], "0,-5", *ls[2:]]), _TS, "line 2"),
        c("ts-nan", stamps_lines("eye_left", lambda ls: [ls[0], "0,nan", *ls[2:]]), _TS, "line 2"),
        c("ts-secret-header", stamps_lines("eye_left", lambda ls: [SECRET, *ls[1:]]), _TS, "header"),
        c("ts-too-few-rows", stamps_lines("eye_left", lambda ls: ls[:-1]), _TS, "rows"),
        c("ts-out-of-sync", stamps_lines("eye_right", lambda ls: [ls[0], *(
            f"{i},{int(x.split(',')[1]) + 20_000_000}" for i, x in enumerate(ls[1:]))]),
          f"{REC}/eye_right/timestamps.csv", "sync"),
        c("ts-bom", lambda r, o: (r / _TS).write_bytes(b"\xef\xbb\xbf" + (r / _TS).read_bytes()), _TS, "ascii"),
        c("ts-symlink-secret", symlink_out(_TS, "secret.txt"), _TS, "outside"),
        c("ts-symlink-valid-out", symlink_out(_TS, "timestamps.csv"), _TS, "outside"),
        c("ts-empty", write(_TS, b""), _TS, "empty"),
        c("ts-fifo", fifo(_TS), _TS, "fifo"),
        # ------------------------------------------------------------------ segments
        c("seg-missing", remove(_SEGS), _SEGS, "missing"),
        c("seg-unknown-prompt", setkey(_SEGS, "segments", _PEAK, "prompt", value="not_a_prompt"),
          _SEGS, "unknown prompt"),
        c("seg-end-past", setkey(_SEGS, "segments", 0, "end", value=N_FRAMES + 5), _SEGS, "past"),
        c("seg-start-after-end", setkey(_SEGS, "segments", 0, "start", value=5), _SEGS, "before end"),
        c("seg-unknown-kind", setkey(_SEGS, "segments", 0, "kind", value="yawn"), _SEGS, "unknown"),
        c("seg-not-list", setkey(_SEGS, "segments", value={"a": 1}), _SEGS, "list"),
        c("seg-negative-start", setkey(_SEGS, "segments", 0, "start", value=-3), _SEGS, ">= 0"),
        c("seg-float-start", setkey(_SEGS, "segments", 0, "start", value=0.5), _SEGS, "integer"),
        c("seg-unknown-camera", setkey(_SEGS, "segments", 0, "cameras", value=["nose"]), _SEGS, "unknown camera"),
        c("seg-huge-array", setkey(_SEGS, "segments", value=[{"kind": "neutral"}] * 50_000), _SEGS,
          "checking stopped"),
        # ----------------------------------------------------------------- keypoints
        c("kp-pickle", write(KP, zip_members({"points.npy": npy_bytes(np.array([{"a": 1}], dtype=object)),
                                              "confidence.npy": npy_bytes(conf)})), KP, "pickled"),
        c("kp-zip-bomb", lambda r, o: (r / KP).unlink() or zip_bomb(r / KP, 300 << 20), KP, "limit"),
        c("kp-header-lies", write(KP, zip_members({"points.npy": npy_header_only((10**9, 478, 2)),
                                                   "confidence.npy": npy_bytes(conf)}, compress=True)),
          KP, "limit"),
        c("kp-truncated-array", write(KP, zip_members({"points.npy": npy_header_only((_T, _P, 2)),
                                                       "confidence.npy": npy_bytes(conf)})), KP, "truncated"),
        c("kp-truncated-zip", _truncate(KP, 100), KP, "keypoints archive"),
        c("kp-not-zip", write(KP, b"garbage" * 10), KP, "keypoints archive"),
        c("kp-nan-confidence", keypoints(pts, np.full((_T, _P), np.nan, np.float32)), KP, "confidence"),
        c("kp-inf-points", keypoints(np.full((_T, _P, 2), np.inf, np.float32), conf), KP, "finite"),
        c("kp-float64", keypoints(pts.astype(np.float64), conf), KP, "float32"),
        c("kp-wrong-frames", keypoints(pts[:3], conf[:3]), KP, "frames"),
        c("kp-missing-array", write(KP, encode_npz({"points": pts})), KP, "confidence"),
        c("kp-symlink-out", symlink_out(KP, "eye_left.npz"), KP, "outside"),
        c("kp-fifo", fifo(KP), KP, "fifo"),
        c("kp-unknown-camera", lambda r, o: shutil.copy(r / KP, r / REC / "keypoints" / "nose.npz"),
          f"{REC}/keypoints/nose.npz", "rig camera"),
    ]  # fmt: skip


CASES: list[Case] = _cases()
