"""PNG reading and writing for captures, with the checks every image read makes.

Three kinds of image exist in a capture: phone RGB (8-bit, 3 channels), phone depth
(16-bit, 1 channel, millimetres) and HMC frames (8-bit, 1 channel). Headers are read with
Pillow, which parses the chunks up to the pixel data and decodes no pixel; every header
is checked (kind, size limits, expected size) **before** any pixel is decoded. Decoding
uses ``cv2.imdecode(..., IMREAD_UNCHANGED)`` on the bytes already read, so nothing is
converted silently and the file is opened once. All file access goes through
:mod:`storage.capture_fs` (contained, regular files only, size-limited).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import cv2
import numpy as np
from PIL import Image, PngImagePlugin

from pipeline.errors import CaptureError
from storage.capture_fs import LIMITS, CaptureLimits, open_capture_file, read_capture_bytes

ImageKind = Literal["rgb", "depth", "mono"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COMPRESSION = 3  # fixed so that output bytes depend on the pixels only
_COLOR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
# Pillow's raw mode of each (bit depth, colour type) the PNG specification allows.
_RAWMODES = {
    "1": (1, 0), "L;2": (2, 0), "L;4": (4, 0), "L": (8, 0), "I;16B": (16, 0),
    "RGB": (8, 2), "RGB;16B": (16, 2),
    "P;1": (1, 3), "P;2": (2, 3), "P;4": (4, 3), "P": (8, 3),
    "LA": (8, 4), "LA;16B": (16, 4), "RGBA": (8, 6), "RGBA;16B": (16, 6),
}  # fmt: skip
# kind -> (bit depth, PNG colour type, what the message calls it)
_EXPECTED = {
    "rgb": (8, 2, "RGB must be 8-bit with 3 channels"),
    "depth": (16, 0, "depth must be uint16 millimetres (16-bit, 1 channel)"),
    "mono": (8, 0, "HMC image must be 8-bit monochrome (1 channel)"),
}
#: What size messages call each kind ("RGB is 10x10 but ...").
IMAGE_LABEL = {"rgb": "RGB", "depth": "depth", "mono": "image"}


@dataclass(frozen=True)
class PngHeader:
    """The IHDR fields of a PNG file."""

    width: int
    height: int
    bit_depth: int
    color_type: int

    def describe(self) -> str:
        """E.g. "8-bit RGB"."""
        return f"{self.bit_depth}-bit {_COLOR_TYPES.get(self.color_type, f'colour type {self.color_type}')}"


def _parse_header(fh: BinaryIO, path: Path, limits: CaptureLimits) -> PngHeader:
    """Parses the chunks before the pixel data with Pillow (no pixel is decoded).

    Pillow sees at most ``limits.max_png_header_bytes``, so a file of millions of tiny
    metadata chunks costs bounded time.
    """
    head = fh.read(limits.max_png_header_bytes)
    if not head.startswith(PNG_SIGNATURE):
        raise CaptureError(path, "not a PNG file (bad signature)")
    more = bool(fh.read(1))
    fh = io.BytesIO(head)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about odd ancillary chunks
            # The plugin class, not Image.open: no format guessing and no decompression-bomb
            # check in pixels, whose limit is ours to state (CaptureLimits).
            im = PngImagePlugin.PngImageFile(fh)
    except (SyntaxError, OSError, ValueError, EOFError, Image.DecompressionBombError):
        if more and fh.tell() >= len(head):  # ran off the window: no pixel data within it
            raise CaptureError(
                path, f"more than {limits.max_png_header_bytes} bytes of PNG chunks before "
                "the pixel data (the limit)",
            ) from None
        raise CaptureError(path, "truncated or corrupt PNG header") from None
    try:
        rawmode = im.tile[0].args if im.tile else None
        bits_type = _RAWMODES.get(rawmode) if isinstance(rawmode, str) else None
    finally:
        im.close()  # the plugin does not own fh; closing frees the decoder state only
    if bits_type is None:
        raise CaptureError(path, "unsupported PNG bit depth or colour type")
    return PngHeader(im.size[0], im.size[1], *bits_type)


def read_png_header(path: Path, root: Path, limits: CaptureLimits = LIMITS) -> PngHeader:
    """Reads a PNG's header (its chunks up to the pixel data) without decoding pixels.

    Raises:
        CaptureError: the file is missing or unusable (see :mod:`storage.capture_fs`),
            not a PNG, or has a truncated or corrupt header.
    """
    with open_capture_file(path, root, limits.max_image_bytes) as fh:
        return _parse_header(fh, path, limits)


def header_problem(header: PngHeader, kind: ImageKind, limits: CaptureLimits = LIMITS) -> str | None:
    """Says why a PNG header does not fit ``kind`` or the size limits, or None."""
    bit_depth, color_type, rule = _EXPECTED[kind]
    if (header.bit_depth, header.color_type) != (bit_depth, color_type):
        desc = header.describe()
        return f"{rule}, got {'an' if desc.startswith('8') else 'a'} {desc} PNG"
    w, h = header.width, header.height
    if w == 0 or h == 0:
        return f"image is {w}x{h}: empty"
    if max(w, h) > limits.max_image_side or w * h > limits.max_image_pixels:
        return (
            f"image is {w}x{h}, beyond the limits ({limits.max_image_side} pixels a side, "
            f"{limits.max_image_pixels} pixels in all); not decoded"
        )
    return None


def size_problem(
    kind: ImageKind, size: tuple[int, int], expected: tuple[int, int] | None, source: str
) -> str | None:
    """Says why an image's (width, height) differs from ``expected`` (from ``source``), or None."""
    if expected is None or tuple(size) == tuple(expected):
        return None
    return (
        f"{IMAGE_LABEL[kind]} is {size[0]}x{size[1]} but {source} is {expected[0]}x{expected[1]}"
    )


def _describe_array(img: np.ndarray) -> str:
    channels = 1 if img.ndim == 2 else img.shape[2]
    return f"{img.dtype} with {channels} channel{'s' if channels != 1 else ''}"


def decoded_problem(img: np.ndarray, kind: ImageKind) -> str | None:
    """Says why a decoded image does not fit ``kind``, or None."""
    channels = 1 if img.ndim == 2 else img.shape[2]
    if kind == "depth":
        if img.dtype != np.uint16:
            return f"depth must be uint16 millimetres, got {img.dtype}"
        if channels != 1:
            return f"depth must have 1 channel, got {channels}"
        return None
    want_channels = 3 if kind == "rgb" else 1
    if img.dtype != np.uint8 or channels != want_channels:
        return f"{_EXPECTED[kind][2]}, got {_describe_array(img)}"
    return None


def decode_png(data: bytes, path: Path) -> np.ndarray:
    """Decodes PNG bytes with OpenCV, unchanged (a module function so tests can count decodes).

    Raises:
        CaptureError: the pixel data cannot be decoded.
    """
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise CaptureError(path, "cannot decode image (corrupt or not an image)")
    return img


def read_image(
    path: Path,
    kind: ImageKind,
    root: Path,
    *,
    expected: tuple[int, int] | None = None,
    source: str = "",
    limits: CaptureLimits = LIMITS,
) -> np.ndarray:
    """Reads, checks and decodes one capture image; the header is checked first.

    Args:
        path: the PNG file.
        kind: "rgb", "depth" or "mono".
        root: the capture folder (reads stay inside it).
        expected: the (width, height) the image must have; checked before decoding.
        source: where ``expected`` comes from, for the message (e.g. "intrinsics.json").
        limits: size limits.

    Returns:
        rgb: (H, W, 3) uint8 in RGB order; depth: (H, W) uint16 millimetres;
        mono: (H, W) uint8.

    Raises:
        CaptureError: the file is missing or unusable, its header does not fit ``kind``,
            the limits or ``expected``, or its pixels cannot be decoded.
    """
    data = read_capture_bytes(path, root, limits.max_image_bytes)
    header = _parse_header(io.BytesIO(data), path, limits)
    problem = header_problem(header, kind, limits) or size_problem(
        kind, (header.width, header.height), expected, source
    )
    if problem:
        raise CaptureError(path, problem)
    img = decode_png(data, path)
    problem = decoded_problem(img, kind)
    if problem is None and img.shape[:2] != (header.height, header.width):
        problem = "decoded size differs from the PNG header"
    if problem:
        raise CaptureError(path, problem)
    if kind == "rgb":
        img = np.ascontiguousarray(img[:, :, ::-1])  # OpenCV decodes to BGR
    return img


def encode_png(image: np.ndarray, kind: ImageKind) -> bytes:
    """Encodes one capture image as PNG with a fixed compression level.

    Args:
        image: rgb (H, W, 3) uint8 in RGB order; depth (H, W) uint16; mono (H, W) uint8.
        kind: "rgb", "depth" or "mono".

    Raises:
        ValueError: the array does not fit ``kind``.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.size == 0:
        raise ValueError(f"{kind} image must be a non-empty 2-D image, got shape {image.shape}")
    problem = decoded_problem(image, kind)
    if problem:
        raise ValueError(problem)
    if kind == "rgb":
        image = image[:, :, ::-1]  # OpenCV encodes from BGR
    ok, buf = cv2.imencode(
        ".png", np.ascontiguousarray(image), [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]
    )
    if not ok:
        raise ValueError(f"OpenCV could not encode the {kind} image")
    return buf.tobytes()
