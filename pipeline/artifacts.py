"""Content-addressed artifact store on any fsspec filesystem, with an atomic commit.

Layout: ``<root>/<stage>/<key>/`` holds the serialized parts (``arrays.npz``,
``meta.json``, ``table.<name>.parquet``, ``value.json``, ...) and the marker
``_COMMITTED``. Commit protocol:

1. each part is written to ``<part>.tmp-<uuid>`` and renamed into place;
2. the marker (JSON: kind, part sizes and sha256, provenance) is written to a temporary
   name and renamed to ``_COMMITTED``.

Only a marked artifact exists for readers, so a crash at any point leaves either no
artifact (rerun rewrites it) or a complete one (rerun skips the stage).

Capture fingerprints (the key of the ``"capture"`` input) are computed by
:func:`capture_fingerprint`: by default the manifest's bytes plus every file's relative
path, size and mtime (fast, make-like); ``mode="content"`` hashes every byte instead
(robust to copies that reset mtimes, slow on large captures).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import CaptureError, ConfigError, StorageError
from pipeline.serialize import decode, encode
from pipeline.storage_options import fsspec_options

if TYPE_CHECKING:
    from distributed import Client

MARKER = "_COMMITTED"
ATTEMPT_PREFIX = "_attempt."
PUBLISHED_PREFIX = "_PUBLISHED."
_TMP = ".tmp-"
_FP_BATCH = 64

#: Test hook: ``"<point>:<stage>"`` pauses (sleeps) at a commit point so a test can
#: SIGKILL the process there; points: ``staging``, ``marker`` (see docs/orchestration.md).
PAUSE_ENV = "PGT_TEST_PAUSE_AT"
#: Test hook: a file touched when the pause is reached.
PAUSE_FLAG_ENV = "PGT_TEST_PAUSE_FLAG"

_SUBJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def crash_test_pause(point: str, stage: str) -> None:
    """Sleeps forever when ``$PGT_TEST_PAUSE_AT`` names this point (crash tests only)."""
    want = os.environ.get(PAUSE_ENV)
    if not want:
        return
    w_point, _, w_stage = want.partition(":")
    if w_point == point and w_stage in ("", "*", stage):
        flag = os.environ.get(PAUSE_FLAG_ENV)
        if flag:
            Path(flag).write_text(f"{point}:{stage}:{os.getpid()}\n")
        time.sleep(3600)


def filesystem(url: str, storage_options: dict[str, Any] | None = None
               ) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for a URL or local path (local paths are made absolute).

    ``storage_options`` may mix fsspec and deltalake names (:mod:`pipeline.storage_options`).
    Listings of ``fs`` give paths without the protocol: open them with this ``fs``, never
    by passing them to :func:`filesystem` again (that would read the local disk).
    """
    fs, path = fsspec.core.url_to_fs(url, **fsspec_options(url, storage_options))
    if isinstance(fs, LocalFileSystem):
        path = os.path.abspath(path)
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local filesystem (where appends and renames are atomic)."""
    return isinstance(fs, LocalFileSystem)


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Writes ``data`` to a unique temporary name, then renames it to ``path``."""
    tmp = f"{path}{_TMP}{uuid.uuid4().hex}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


class ArtifactStore:
    """Artifacts of every stage, addressed by ``(stage, key)``.

    Args:
        url: root folder or fsspec URL (``memory://...``, ``s3://...``).
        storage_options: fsspec options for the URL.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(url, storage_options)

    def __getstate__(self) -> dict[str, Any]:  # ship only the address to workers
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])

    def path(self, stage: str, key: str) -> str:
        """Folder of one artifact."""
        return f"{self.root}/{stage}/{key}"

    def is_committed(self, stage: str, key: str) -> bool:
        """True when the artifact's marker exists."""
        return self.fs.exists(f"{self.path(stage, key)}/{MARKER}")

    def marker(self, stage: str, key: str) -> dict[str, Any]:
        """The committed marker (manifest + provenance).

        Raises:
            StorageError: when the artifact is not committed.
        """
        try:
            return json.loads(self.fs.cat_file(f"{self.path(stage, key)}/{MARKER}"))
        except FileNotFoundError:
            raise StorageError(f"artifact {stage}/{key} is not committed") from None

    def begin_attempt(self, stage: str, key: str, run_id: str) -> int:
        """Records one more execution attempt of ``key`` in ``run_id``; returns its number.

        Each attempt leaves an empty ``_attempt.<run_id>.<n>.<pid>`` file in the artifact
        folder: Dask retries do not tell a task its attempt number, storage does.
        """
        folder = self.path(stage, key)
        prefix = f"{ATTEMPT_PREFIX}{run_id}."
        try:
            n = sum(1 for p in self.fs.ls(folder, detail=False)
                    if p.rsplit("/", 1)[-1].startswith(prefix))
        except FileNotFoundError:
            self.fs.makedirs(folder, exist_ok=True)
            n = 0
        self.fs.pipe_file(f"{folder}/{prefix}{n + 1}.{os.getpid()}", b"")
        return n + 1

    def commit(self, stage: str, key: str, value: Any, provenance: dict[str, Any]) -> dict:
        """Serialises ``value`` and commits it under ``(stage, key)``; idempotent.

        Returns:
            The marker written (or the existing one when already committed).
        """
        if self.is_committed(stage, key):
            return self.marker(stage, key)
        kind, files = encode(value)
        folder = self.path(stage, key)
        if not self.fs.isdir(folder):
            self.fs.makedirs(folder, exist_ok=True)
        parts: dict[str, dict[str, Any]] = {}
        for name, data in files.items():
            tmp = f"{folder}/{name}{_TMP}{uuid.uuid4().hex}"
            self.fs.pipe_file(tmp, data)
            crash_test_pause("staging", stage)
            self.fs.mv(tmp, f"{folder}/{name}")
            parts[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        crash_test_pause("marker", stage)
        marker = {"format": "hmc-pgt-artifact", "format_version": 1, "stage": stage,
                  "key": key, "kind": kind, "parts": parts,
                  "committed_at": time.time(), **provenance}
        atomic_write(self.fs, f"{folder}/{MARKER}", json.dumps(marker, sort_keys=True).encode())
        self._sweep_tmp(folder)
        return marker

    def _sweep_tmp(self, folder: str) -> None:
        """Removes temporaries left by crashed attempts (after the commit only)."""
        try:
            for p in self.fs.ls(folder, detail=False):
                if _TMP in p.rsplit("/", 1)[-1]:
                    self.fs.rm_file(p)
        except (FileNotFoundError, OSError):
            pass  # a concurrent duplicate may have swept first

    def load(self, stage: str, key: str) -> Any:
        """Loads a committed artifact, checking each part's size and sha256.

        Raises:
            StorageError: when not committed or a part is missing or corrupt.
        """
        marker = self.marker(stage, key)
        folder = self.path(stage, key)
        files: dict[str, bytes] = {}
        for name, info in marker["parts"].items():
            try:
                data = self.fs.cat_file(f"{folder}/{name}")
            except FileNotFoundError:
                raise StorageError(f"artifact {stage}/{key}: part {name} is missing") from None
            if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
                raise StorageError(f"artifact {stage}/{key}: part {name} is corrupt")
            files[name] = data
        return decode(marker["kind"], files)

    def is_published(self, stage: str, key: str, table: str) -> bool:
        """True when this artifact's rows were published to ``table``."""
        return self.fs.exists(f"{self.path(stage, key)}/{PUBLISHED_PREFIX}{table}")

    def mark_published(self, stage: str, key: str, table: str, uri: str) -> None:
        """Records that the rows are in the table (written after the Delta commit)."""
        atomic_write(self.fs, f"{self.path(stage, key)}/{PUBLISHED_PREFIX}{table}",
                     json.dumps({"table": uri, "time": time.time()}).encode())

    def committed(self, stage: str | None = None) -> Iterator[tuple[str, str]]:
        """Every committed ``(stage, key)``, optionally of one stage."""
        stages = [stage] if stage else [p.rsplit("/", 1)[-1] for p in self._ls(self.root)]
        for st in stages:
            for folder in self._ls(f"{self.root}/{st}"):
                key = folder.rsplit("/", 1)[-1]
                if self.fs.exists(f"{folder}/{MARKER}"):
                    yield st, key

    def _ls(self, path: str) -> list[str]:
        try:
            return sorted(p for p in self.fs.ls(path, detail=False) if self.fs.isdir(p))
        except FileNotFoundError:
            return []


def read_subject_id(capture: str | Path) -> str:
    """The capture's subject id: ``capture.json``'s ``subject_id``, else the folder name.

    An unreadable manifest falls back to the folder name, so the subject still runs and
    the ``validate`` stage reports the problem in its failure record.

    Raises:
        CaptureError: when the folder is missing or the id is unsafe.
    """
    folder = Path(capture)
    manifest = folder / "capture.json"
    subject = folder.name
    if manifest.is_file():
        try:
            subject = json.loads(manifest.read_text()).get("subject_id", subject)
        except (OSError, ValueError, AttributeError):
            subject = folder.name
    elif not folder.is_dir():
        raise CaptureError(folder, "capture folder does not exist")
    if not isinstance(subject, str) or not _SUBJECT_RE.match(subject) or ".." in subject:
        raise CaptureError(manifest, f"unsafe subject id {subject!r}")
    return subject


def capture_fingerprint(capture: str | Path,
                        mode: Literal["stat", "content"] = "stat") -> tuple[str, str]:
    """``(subject_id, fingerprint)`` of a capture folder.

    ``stat`` hashes the manifest's bytes and, for every file, its relative path, size and
    ``st_mtime_ns``; ``content`` hashes every file's bytes.

    Raises:
        CaptureError: when the folder is missing or the subject id is unsafe.
    """
    folder = Path(capture)
    subject = read_subject_id(folder)
    h = hashlib.sha256(f"hmc-pgt-capture-fp:{mode}\n".encode())
    manifest = folder / "capture.json"
    if manifest.is_file():
        h.update(hashlib.sha256(manifest.read_bytes()).digest())
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            p = Path(root, name)
            rel = p.relative_to(folder).as_posix()
            st = p.stat()
            h.update(f"{rel}\0{st.st_size}\0".encode())
            if mode == "content":
                with p.open("rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 20), b""):
                        h.update(block)
            else:
                h.update(f"{st.st_mtime_ns}\n".encode())
    return subject, h.hexdigest()


def fingerprint_many(captures: list[str], mode: Literal["stat", "content"] = "stat"
                     ) -> list[tuple[str | None, str | None, Exception | None]]:
    """:func:`capture_fingerprint` over a batch (one Dask task per batch).

    Returns:
        Per capture ``(subject, fingerprint, None)``, or ``(None, None, error)`` when the
        capture is unusable, so one bad capture becomes a failure record, not a crash.
    """
    out: list[tuple[str | None, str | None, Exception | None]] = []
    for c in captures:
        try:
            out.append((*capture_fingerprint(c, mode), None))
        except CaptureError as exc:
            out.append((None, None, exc))
        except OSError as exc:
            out.append((None, None, CaptureError(c, f"{type(exc).__name__}: {exc}")))
    return out


def fingerprint_captures(client: Client, captures: list[str], mode: str = "stat"
                         ) -> tuple[dict[str, tuple[str, str]], list[tuple[str, BaseException]]]:
    """Fingerprints captures on the cluster, ``_FP_BATCH`` per task.

    Returns:
        ``({subject: (path, fingerprint)}`` sorted by subject, ``[(folder name, error)]``).

    Raises:
        ConfigError: when two captures have the same subject id.
    """
    batches = [captures[i:i + _FP_BATCH] for i in range(0, len(captures), _FP_BATCH)]
    futs = client.map(fingerprint_many, batches, mode=mode, pure=False)
    subjects: dict[str, tuple[str, str]] = {}
    bad: list[tuple[str, BaseException]] = []
    for batch, result in zip(batches, client.gather(futs), strict=True):
        for path, (subject, fp, err) in zip(batch, result, strict=True):
            if err is not None:
                bad.append((Path(path).name, err))
            elif subject in subjects:
                raise ConfigError(f"subject {subject!r} appears twice: "
                                  f"{subjects[subject][0]} and {path}")
            else:
                subjects[subject] = (path, fp)
    return dict(sorted(subjects.items())), bad
