"""PNG reading and writing for captures, with the checks every image read makes.

Three kinds of image exist in a capture: phone RGB (8-bit, 3 channels), phone depth
(16-bit, 1 channel, millimetres) and HMC frames (8-bit, 1 channel). Decoding uses
``cv2.imread(..., IMREAD_UNCHANGED)`` so that nothing is converted silently; header checks
read only the 33 first bytes (the validator's fast mode).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from pipeline.errors import CaptureError

ImageKind = Literal["rgb", "depth", "mono"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COMPRESSION = 3  # fixed so that output bytes depend on the pixels only
_COLOR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
# kind -> (bit depth, PNG colour type, what the message calls it)
_EXPECTED = {
    "rgb": (8, 2, "RGB must be 8-bit with 3 channels"),
    "depth": (16, 0, "depth must be uint16 millimetres (16-bit, 1 channel)"),
    "mono": (8, 0, "HMC image must be 8-bit monochrome (1 channel)"),
}


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


def read_png_header(path: Path) -> PngHeader:
    """Reads the IHDR chunk of a PNG without decoding pixels.

    Raises:
        CaptureError: the file is missing, empty, not a PNG or has a truncated header.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(33)
    except FileNotFoundError:
        raise CaptureError(path, "missing file") from None
    except OSError as exc:
        raise CaptureError(path, f"cannot read file ({exc.strerror})") from None
    if not head:
        raise CaptureError(path, "empty file")
    if not head.startswith(PNG_SIGNATURE):
        raise CaptureError(path, "not a PNG file (bad signature)")
    if len(head) < 33 or head[12:16] != b"IHDR":
        raise CaptureError(path, "truncated or corrupt PNG header")
    width, height, bit_depth, color_type = struct.unpack(">IIBB", head[16:26])
    return PngHeader(width, height, bit_depth, color_type)


def header_problem(header: PngHeader, kind: ImageKind) -> str | None:
    """Says why a PNG header does not fit ``kind``, or None."""
    bit_depth, color_type, rule = _EXPECTED[kind]
    if (header.bit_depth, header.color_type) != (bit_depth, color_type):
        desc = header.describe()
        return f"{rule}, got {'an' if desc.startswith('8') else 'a'} {desc} PNG"
    return None


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


def read_image(path: Path, kind: ImageKind) -> np.ndarray:
    """Decodes and checks one capture image.

    Args:
        path: the PNG file.
        kind: "rgb", "depth" or "mono".

    Returns:
        rgb: (H, W, 3) uint8 in RGB order; depth: (H, W) uint16 millimetres;
        mono: (H, W) uint8.

    Raises:
        CaptureError: the file is missing, cannot be decoded, or has the wrong dtype or
            channel count.
    """
    if not path.is_file():
        raise CaptureError(path, "missing file")
    # Looked up on the module at call time so tests can count decodes.
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise CaptureError(path, "cannot decode image (corrupt or not an image)")
    problem = decoded_problem(img, kind)
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
