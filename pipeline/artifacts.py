"""Content-addressed artifact store on any fsspec filesystem, with an atomic commit.

Layout: ``<root>/<stage>/<key>/`` holds the marker ``_COMMITTED`` and one or more part
folders ``data.<time_ns>.<uuid>/`` (``arrays.npz``, ``meta.json``,
``table.<name>.parquet``, ``value.json``, ...). Commit protocol, safe against duplicate
and concurrent executions of the same key (two runs, a re-executed Dask task), even when
their bytes differ (training stages are not bit-reproducible):

1. every part is written into a part folder of the writer's own (a unique name);
2. the marker (JSON: kind, the part folder's name, each part's size and sha256,
   provenance) is published with ONE atomic put-if-absent (:func:`put_if_absent`);
3. the writer that lost the race deletes its own part folder and returns the winner's
   marker. Readers load exactly the parts the marker names, so a committed artifact is
   always one writer's complete, self-consistent output.

Only a marked artifact exists for readers, so a crash at any point leaves either no
artifact (rerun rewrites it) or a complete one (rerun skips the stage). Part folders that
no marker names (a killed writer's) are removed only once older than
:data:`STALE_TMP_S`, never while another writer may still be filling them.

Capture fingerprints (the key of the ``"capture"`` input) are computed by
:func:`capture_fingerprint`: by default the manifest's bytes plus every file's relative
path, size and mtime (fast, make-like); ``mode="content"`` hashes every byte instead
(robust to copies that reset mtimes, slow on large captures).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import CaptureError, StorageError, printable
from pipeline.serialize import decode, encode
from pipeline.storage_options import fsspec_options

if TYPE_CHECKING:
    from distributed import Client

MARKER = "_COMMITTED"
#: A resumable stage's progress, beside its artifact until the output commits.
CHECKPOINT = "_checkpoint.bin"
ATTEMPT_PREFIX = "_attempt."
_TMP = ".tmp-"
#: Prefix of a writer's part folder, ``data.<time_ns>.<uuid12>``.
DATA_PREFIX = "data"
#: Part folders and marker temporaries no marker names are garbage once this old (a
#: generous bound on one writer's staging time, so a live writer's are never touched).
STALE_TMP_S = 6 * 3600.0
_STAMP_RE = re.compile(r"\.(\d{19})\.[0-9a-f]{12}$")
_FP_BATCH = 64

#: Test hook: ``"<point>:<stage>"`` pauses (sleeps) at a commit point so a test can
#: SIGKILL the process there; points: ``staging``, ``marker`` (see docs/orchestration.md).
PAUSE_ENV = "PGT_TEST_PAUSE_AT"
#: Test hook: a file touched when the pause is reached.
PAUSE_FLAG_ENV = "PGT_TEST_PAUSE_FLAG"


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


def _stamped(prefix: str) -> str:
    """``<prefix>.<time_ns>.<uuid12>``: unique, and its age is readable from the name."""
    return f"{prefix}.{time.time_ns():019d}.{uuid.uuid4().hex[:12]}"


def put_if_absent(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Creates ``path`` holding ``data`` unless it exists; True when this call created it.

    Local disk: the bytes go to a temporary file (fsynced), which is hard-linked to
    ``path``; ``link(2)`` fails when ``path`` exists, so exactly one of any number of
    concurrent callers wins and readers never see a partial file. Other stores use
    fsspec's ``pipe_file(mode="create")``: a conditional PUT (``If-None-Match: *``) on
    S3 through s3fs, atomic there. Where an fsspec implementation only checks existence
    before writing, the file is read back and the call wins only if it holds ``data``:
    a loser then never deletes the parts a marker names, but two callers may both
    believe they won (both part folders stay intact; readers follow the marker).
    """
    if is_local(fs):
        tmp = f"{path}.{_stamped('tmp')}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError as exc:  # e.g. a mount without hard links
                raise StorageError(f"{path}: cannot publish atomically, this filesystem "
                                   f"refused a hard link ({exc.strerror})") from exc
            return True
        finally:
            os.unlink(tmp)
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return fs.cat_file(path) == data


class Checkpoint:
    """A unit's resumable progress: one blob beside its artifact, replaced atomically.

    A stage saves its progress here while it works; the engine removes it once the
    unit's output is committed. The key is the output's content key, so a checkpoint is
    only ever resumed by the same stage version, config and inputs.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path

    def load(self) -> bytes | None:
        """The last saved blob, or None."""
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None

    def exists(self) -> bool:
        """Whether a blob was saved (without reading it)."""
        return self.fs.exists(self.path)

    def save(self, data: bytes) -> None:
        """Replaces the blob; a kill during the write leaves the previous one."""
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        atomic_write(self.fs, self.path, data)

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            self.fs.rm(self.path)


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

    def checkpoint(self, stage: str, key: str) -> Checkpoint:
        """The resumable progress of the unit ``(stage, key)`` (see :class:`Checkpoint`)."""
        return Checkpoint(self.fs, f"{self.path(stage, key)}/{CHECKPOINT}")

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
        except ValueError:
            raise StorageError(f"artifact {stage}/{key}: the marker is not JSON") from None

    def _parts_dir(self, stage: str, key: str, marker: dict[str, Any]) -> str:
        # format 1 (before part folders) kept its parts beside the marker
        sub = marker.get("dir")
        return f"{self.path(stage, key)}/{sub}" if sub else self.path(stage, key)

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

        Concurrent commits of one key each stage into their own part folder; one
        put-if-absent of the marker picks the winner; the others discard their copy.

        Returns:
            The marker that is committed: this call's, or the one that was there first.
        """
        if self.is_committed(stage, key):
            return self.marker(stage, key)
        kind, files = encode(value)
        folder = self.path(stage, key)
        sub = _stamped(DATA_PREFIX)
        staging = f"{folder}/{sub}"
        self._sweep(stage, key)  # stale leftovers of killed writers only
        try:
            self.fs.makedirs(staging, exist_ok=True)
            parts: dict[str, dict[str, Any]] = {}
            for name, data in files.items():
                self.fs.pipe_file(f"{staging}/{name}", data)
                crash_test_pause("staging", stage)
                parts[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            crash_test_pause("marker", stage)
            marker = {**provenance, "format": "hmc-pgt-artifact", "format_version": 2,
                      "stage": stage, "key": key, "kind": kind, "dir": sub, "parts": parts,
                      "committed_at": time.time()}
            won = put_if_absent(self.fs, f"{folder}/{MARKER}",
                                json.dumps(marker, sort_keys=True).encode())
        except BaseException:
            self._remove(staging)
            raise
        if not won:  # a concurrent writer committed first: its parts are the artifact
            self._remove(staging)
            return self.marker(stage, key)
        return marker

    def _remove(self, path: str) -> None:
        with contextlib.suppress(OSError):  # nothing staged yet, or already gone
            self.fs.rm(path, recursive=True)

    def _sweep(self, stage: str, key: str) -> None:
        """Removes part folders and marker temporaries older than :data:`STALE_TMP_S`.

        Younger ones may belong to a live concurrent writer and are left alone; the
        committed marker's own part folder is never removed.
        """
        folder = self.path(stage, key)
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)]
        except (FileNotFoundError, OSError):
            return
        committed = self.marker(stage, key).get("dir") if MARKER in names else None
        cutoff = time.time_ns() - int(STALE_TMP_S * 1e9)
        for name in names:
            m = _STAMP_RE.search(name)
            if m and name != committed and int(m.group(1)) < cutoff:
                self._remove(f"{folder}/{name}")

    def load(self, stage: str, key: str) -> Any:
        """Loads a committed artifact, checking each part's size and sha256.

        Raises:
            StorageError: when not committed or a part is missing or corrupt.
        """
        marker = self.marker(stage, key)
        return decode(marker["kind"], {name: self._part(stage, key, marker, name)
                                       for name in marker["parts"]})

    def load_part(self, stage: str, key: str, name: str) -> tuple[str, bytes | None]:
        """``(kind, bytes)`` of one part of a committed artifact (``None`` when it has
        no such part), checked like :meth:`load`: e.g. the rows to publish, without the
        arrays beside them.
        """
        marker = self.marker(stage, key)
        if name not in marker["parts"]:
            return marker["kind"], None
        return marker["kind"], self._part(stage, key, marker, name)

    def _part(self, stage: str, key: str, marker: dict[str, Any], name: str) -> bytes:
        info = marker["parts"][name]
        try:
            data = self.fs.cat_file(f"{self._parts_dir(stage, key, marker)}/{name}")
        except FileNotFoundError:
            raise StorageError(f"artifact {stage}/{key}: part {name} is missing") from None
        if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise StorageError(f"artifact {stage}/{key}: part {name} is corrupt")
        return data

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
    the ``validate`` stage reports the problem in its failure record. The manifest is read
    with the capture boundary's checks (contained, regular file, size and depth limits).

    Raises:
        CaptureError: when the folder is missing or the id is unsafe.
    """
    from storage.capture_files import read_json  # the capture format lives in storage/
    from storage.capture_layout import unsafe_name_reason

    folder = Path(capture)
    manifest = folder / "capture.json"
    if not folder.is_dir():
        dangling = folder.is_symlink() and not folder.exists()
        raise CaptureError(folder, "capture folder is a dangling symlink" if dangling
                           else "capture folder does not exist or is not a folder")
    subject: object = folder.name
    try:
        doc = read_json(manifest, folder)
        if isinstance(doc, dict) and "subject_id" in doc:
            subject = doc["subject_id"]
    except CaptureError:
        pass  # validation reports it, with the subject's own failure record
    reason = unsafe_name_reason(subject, "subject id")
    if reason:
        raise CaptureError(manifest, reason)
    assert isinstance(subject, str)
    return subject


def capture_fingerprint(capture: str | Path,
                        mode: Literal["stat", "content"] = "stat") -> tuple[str, str]:
    """``(subject_id, fingerprint)`` of a capture folder.

    ``stat`` hashes the manifest's bytes and, for every entry, its relative path (as
    bytes: names need not be UTF-8), type, size and ``st_mtime_ns``; ``content`` hashes
    every regular file's bytes instead of its mtime. No symlink is followed (a link's
    target text is hashed) and nothing but regular files is opened, so a FIFO or a link
    leading outside the capture is never read.

    Raises:
        CaptureError: the folder is missing, the subject id is unsafe, or the folder is
            over the capture limits (entries, depth).
    """
    from storage.capture_fs import LIMITS, read_capture_bytes, scan_tree

    folder = Path(capture)
    subject = read_subject_id(folder)
    h = hashlib.sha256(f"hmc-pgt-capture-fp:{mode}\n".encode())
    try:
        h.update(hashlib.sha256(read_capture_bytes(folder / "capture.json", folder,
                                                   LIMITS.max_json_bytes)).digest())
    except CaptureError as exc:  # still a distinct key; validation reports the problem
        h.update(exc.problem.encode())
    entries, _ = scan_tree(folder)  # problems are the validate stage's to report
    for e in entries:
        kind = stat.S_IFMT(e.st.st_mode)
        h.update(e.rel + f"\0{kind}\0{e.st.st_size}\0".encode())
        if e.link is not None:
            h.update(e.link + b"\0")
        elif mode == "content" and stat.S_ISREG(e.st.st_mode):
            _hash_file(h, folder, e.rel)
        else:
            h.update(f"{e.st.st_mtime_ns}\n".encode())
    return subject, h.hexdigest()


def _hash_file(h: Any, folder: Path, rel: bytes) -> None:
    """Feeds one regular file's bytes to ``h`` (opened without following links or blocking)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(os.path.join(os.fsencode(folder), rel), flags)
    except OSError as exc:
        h.update(f"unreadable:{exc.errno}".encode())
        return
    with os.fdopen(fd, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


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
        except Exception as exc:  # noqa: BLE001 - hostile input must not stop the run
            out.append((None, None, CaptureError(c, f"cannot fingerprint the capture "
                                                    f"({type(exc).__name__})")))
    return out


def fingerprint_captures(client: Client, captures: list[str], mode: str = "stat"
                         ) -> tuple[dict[str, tuple[str, str]], list[tuple[str, BaseException]]]:
    """Fingerprints captures on the cluster, ``_FP_BATCH`` per task.

    Two captures declaring one subject id both fail (neither can be trusted to be the
    subject's), each with an error naming both folders; the other subjects run.

    Returns:
        ``({subject: (path, fingerprint)}`` sorted by subject, ``[(folder name, error)]``).
    """
    batches = [captures[i:i + _FP_BATCH] for i in range(0, len(captures), _FP_BATCH)]
    futs = client.map(fingerprint_many, batches, mode=mode, pure=False)
    claims: dict[str, list[tuple[str, str]]] = {}
    bad: list[tuple[str, BaseException]] = []
    for batch, result in zip(batches, client.gather(futs), strict=True):
        for path, (subject, fp, err) in zip(batch, result, strict=True):
            if err is not None:
                bad.append((printable(Path(path).name), err))
            else:
                claims.setdefault(subject, []).append((path, fp))
    subjects: dict[str, tuple[str, str]] = {}
    for subject, found in claims.items():
        folders = sorted({p for p, _ in found})
        if len(folders) == 1:  # one capture (perhaps listed twice)
            subjects[subject] = found[0]
            continue
        for path in folders:
            others = " and ".join(p for p in folders if p != path)
            bad.append((printable(Path(path).name), CaptureError(
                Path(path) / "capture.json",
                f"subject id {subject!r} is also declared by {others}; "
                f"duplicate subject ids are not run")))
    return dict(sorted(subjects.items())), bad
