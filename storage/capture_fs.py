"""Bounded, contained file access inside a capture folder (docs/capture-format.md, "Limits").

Every byte the reader, the validator and the capture fingerprint take from a capture goes
through this module, which enforces the capture boundary:

* **Containment.** A path is resolved (symlinks followed) and must stay inside the
  resolved capture folder. Symlinks are allowed only when they resolve inside it; a
  symlink that leads outside, dangles or loops is refused with a message naming the path.
* **Regular files only.** Files are opened with ``O_NONBLOCK`` and checked with ``fstat``:
  a FIFO, socket or device named like a capture file is refused at once, never read (a
  FIFO would block a reader for ever).
* **Sizes before reads.** The file size is compared with the documented limit of its kind
  before a byte is read, and no more than the limit is ever read.
* **No content in messages.** Messages name the file and the problem, never its bytes.

Limits are the fields of :class:`CaptureLimits`; :data:`LIMITS` holds the documented
defaults.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import CaptureError

_MIB = 1 << 20


@dataclass(frozen=True)
class CaptureLimits:
    """Documented upper bounds on what a capture may hold (docs/capture-format.md)."""

    max_json_bytes: int = 16 * _MIB
    """Size of one JSON document (capture.json, rig.json, intrinsics.json, segments.json)."""
    max_json_depth: int = 32
    """Nesting depth of JSON arrays and objects (the format needs 4)."""
    max_timestamps_bytes: int = 64 * _MIB
    """Size of one timestamps.csv (about 2 million rows)."""
    max_image_bytes: int = 256 * _MIB
    """Size of one PNG file."""
    max_png_header_bytes: int = 256 * 1024
    """PNG chunks before the pixel data (IHDR and metadata such as text or ICC profiles)."""
    max_image_side: int = 16384
    """Width and height of one image, in pixels, from its PNG header."""
    max_image_pixels: int = 64 * _MIB
    """Width x height of one image (64 Mpx: an 8-bit RGB decodes to at most 192 MiB)."""
    max_keypoints_bytes: int = 256 * _MIB
    """Size of one keypoints .npz file."""
    max_array_bytes: int = 256 * _MIB
    """Decoded size of one keypoints array, from its zip entry and .npy header."""
    max_entries: int = 1_000_000
    """Files and folders in one capture folder (all levels)."""
    max_tree_depth: int = 16
    """Folder nesting below the capture folder (the format needs 4)."""


#: The limits every reader applies.
LIMITS = CaptureLimits()


def _mib(n: int) -> str:
    return f"{n / _MIB:.1f} MiB" if n >= _MIB else f"{n} bytes"


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words (e.g. "a FIFO (named pipe)")."""
    return next((text for test, text in _KINDS if test(mode)), "not a regular file")


def real_root(root: str | Path) -> str:
    """The capture folder with every symlink resolved (the containment reference)."""
    return os.path.realpath(root)


def resolve_contained(path: str | Path, root: str | Path) -> str:
    """Resolves ``path`` (following symlinks) and checks it stays inside ``root``.

    Args:
        path: a path inside the capture folder (as the layout builds it).
        root: the capture folder.

    Returns:
        The resolved path.

    Raises:
        CaptureError: ``path`` is missing, a dangling symlink, a symlink loop, or resolves
            outside the capture folder.
    """
    base = real_root(root)
    try:
        real = os.path.realpath(path, strict=True)
    except FileNotFoundError:
        if os.path.islink(path):
            raise CaptureError(path, "dangling symlink (its target does not exist)") from None
        raise CaptureError(path, f"missing {Path(path).name}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CaptureError(path, "symlink loop (too many levels of symbolic links)") from None
        raise CaptureError(path, f"cannot resolve path ({exc.strerror})") from None
    if real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
        raise CaptureError(
            path, "is reached through a symlink that leads outside the capture folder (refused)"
        )
    return real


def dir_problem(path: str | Path, root: str | Path) -> str | None:
    """Says why ``path`` is not a usable folder of the capture, or None when it is."""
    try:
        real = resolve_contained(path, root)
    except CaptureError as exc:
        return exc.problem
    if not os.path.isdir(real):
        return "is not a folder"
    return None


def file_exists(path: str | Path) -> bool:
    """True when something (even a dangling symlink) exists at ``path``."""
    return os.path.lexists(path)


def list_dir(path: str | Path, root: str | Path) -> list[str]:
    """Names in a capture folder (resolved and contained), sorted.

    Raises:
        CaptureError: the folder is unusable (see :func:`dir_problem`) or unreadable.
    """
    problem = dir_problem(path, root)
    if problem:
        raise CaptureError(path, problem)
    try:
        return sorted(os.listdir(resolve_contained(path, root)))
    except OSError as exc:
        raise CaptureError(path, f"cannot list folder ({exc.strerror})") from None


@contextmanager
def open_capture_file(path: str | Path, root: str | Path, max_bytes: int) -> Iterator[BinaryIO]:
    """Opens a regular file of the capture for reading, after every boundary check.

    Args:
        path: the file.
        root: the capture folder.
        max_bytes: the largest size accepted (checked with ``fstat`` before reading).

    Yields:
        A binary file object positioned at the start.

    Raises:
        CaptureError: missing, outside the capture, not a regular file, empty, too large
            or unreadable.
    """
    real = resolve_contained(path, root)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # swapped for a symlink after resolving
            raise CaptureError(path, "changed into a symlink while being read") from None
        if exc.errno == errno.ENXIO:  # a socket
            raise CaptureError(path, "is a socket, not a regular file") from None
        raise CaptureError(path, f"cannot read file ({exc.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CaptureError(path, f"is {file_kind(st.st_mode)}, not a regular file")
    with os.fdopen(fd, "rb") as fh:
        if st.st_size == 0:
            raise CaptureError(path, "empty file")
        if st.st_size > max_bytes:
            raise CaptureError(
                path, f"file is {_mib(st.st_size)}, more than the limit of {_mib(max_bytes)}"
            )
        yield fh


def read_capture_bytes(path: str | Path, root: str | Path, max_bytes: int) -> bytes:
    """The bytes of a regular capture file, read after the checks of :func:`open_capture_file`.

    Never reads more than ``max_bytes``; a file changing size while read is refused.
    """
    with open_capture_file(path, root, max_bytes) as fh:
        size = os.fstat(fh.fileno()).st_size  # checked <= max_bytes
        try:
            data = fh.read(size + 1)  # not max_bytes + 1: read() allocates what it is asked
        except OSError as exc:
            raise CaptureError(path, f"cannot read file ({exc.strerror})") from None
    if len(data) != size:
        raise CaptureError(path, "file changed size while being read")
    return data


# -------------------------------------------------------------------------- tree scan


@dataclass(frozen=True)
class TreeEntry:
    """One entry of a capture folder, seen without following symlinks.

    Attributes:
        rel: path relative to the capture folder, as bytes (names need not be UTF-8).
        st: its ``lstat``.
        link: the symlink's target (bytes) when it is one, else None.
    """

    rel: bytes
    st: os.stat_result
    link: bytes | None = None


def scan_tree(root: str | Path, limits: CaptureLimits = LIMITS) -> tuple[list[TreeEntry], list[CaptureError]]:
    """Lists every entry of a capture folder (no symlink is followed) and its boundary problems.

    Problems: a name that is not UTF-8, a symlink that dangles, loops or leads outside the
    capture folder, anything that is neither a regular file, a folder nor a symlink (FIFO,
    socket, device), and an unreadable folder. Entries inside hidden folders (name starting
    with ".") are listed but not reported: the format ignores them.

    Returns:
        (entries sorted by path, problems).

    Raises:
        CaptureError: the folder holds more than ``limits.max_entries`` entries or nests
            deeper than ``limits.max_tree_depth`` (scanning stops at the limit).
    """
    root_b = os.fsencode(root)
    entries: list[TreeEntry] = []
    problems: list[CaptureError] = []
    stack: list[tuple[bytes, int]] = [(b"", 0)]
    while stack:
        rel_dir, depth = stack.pop()
        folder = os.path.join(root_b, rel_dir) if rel_dir else root_b
        try:
            with os.scandir(folder) as it:
                names = sorted(e.name for e in it)
        except OSError as exc:
            problems.append(CaptureError(os.fsdecode(folder), f"cannot list folder ({exc.strerror})"))
            continue
        for name in names:
            rel = os.path.join(rel_dir, name) if rel_dir else name
            full = os.path.join(root_b, rel)
            try:
                st = os.lstat(full)
            except OSError as exc:
                problems.append(CaptureError(os.fsdecode(full), f"cannot stat ({exc.strerror})"))
                continue
            hidden = any(part.startswith(b".") for part in rel.split(b"/"))
            link = os.readlink(full) if stat.S_ISLNK(st.st_mode) else None
            entries.append(TreeEntry(rel, st, link))
            if len(entries) > limits.max_entries:
                raise CaptureError(
                    os.fsdecode(root),
                    f"holds more than {limits.max_entries} files and folders (the limit)",
                )
            if not hidden:
                problem = _entry_problem(name, full, st, root)
                if problem:
                    problems.append(CaptureError(os.fsdecode(full), problem))
            if stat.S_ISDIR(st.st_mode):
                if depth + 1 >= limits.max_tree_depth:
                    raise CaptureError(
                        os.fsdecode(full),
                        f"folders nest deeper than {limits.max_tree_depth} levels (the limit)",
                    )
                stack.append((rel, depth + 1))
    entries.sort(key=lambda e: e.rel)
    return entries, problems


def _entry_problem(name: bytes, full: bytes, st: os.stat_result, root: str | Path) -> str | None:
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return "file name is not valid UTF-8"
    if stat.S_ISLNK(st.st_mode):
        try:
            resolve_contained(os.fsdecode(full), root)
        except CaptureError as exc:
            return exc.problem
        return None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return f"is {file_kind(st.st_mode)}, not a regular file"  # as open_capture_file says
    return None
