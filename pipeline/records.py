"""Run records, failure records and table publishing (Delta tables via ``storage.delta``).

Tables under ``<tables>/``:

* ``failures``: one row per unit that still failed after its retries, per run;
* ``runs``: one row per finished run (counts, config, versions);
* any table a stage publishes to (``Stage.publish``). Its rows carry three extra columns,
  :data:`STAGE_COLUMN`, :data:`VERSION_COLUMN` and :data:`KEY_COLUMN` (the stage, its
  version and the content key of the artifact they came from), so a run can tell whether
  the table holds what it planned (:class:`TableIndex`).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.artifacts import ArtifactStore, crash_test_pause
from pipeline.errors import ConfigError, StageError, StorageError
from pipeline.runlog import OutputLayout, write_json
from pipeline.serialize import decode_table
from pipeline.stage import Chain, Stage, to_jsonable
from pipeline.tasks import StageFailure

if TYPE_CHECKING:
    from pipeline.dag import RunSummary

_TS = pa.timestamp("us", tz="UTC")

FAILURE_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("subject", pa.string()), ("stage", pa.string()),
    ("stage_version", pa.string()), ("key", pa.string()), ("error_type", pa.string()),
    ("message", pa.string()), ("attempt", pa.int32()), ("time", _TS),
    ("traceback", pa.string()),
])

RUN_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("started", _TS), ("finished", _TS), ("status", pa.string()),
    ("out", pa.string()), ("host", pa.string()), ("n_subjects", pa.int32()),
    ("done", pa.int32()), ("cached", pa.int32()), ("failed", pa.int32()),
    ("skipped", pa.int32()), ("config_json", pa.string()), ("chain_json", pa.string()),
    ("versions_json", pa.string()),
])

#: Columns added to every published row (provenance; names reserved).
STAGE_COLUMN = "_stage"
VERSION_COLUMN = "_stage_version"
KEY_COLUMN = "_artifact_key"
PROVENANCE_COLUMNS = (STAGE_COLUMN, VERSION_COLUMN, KEY_COLUMN)

_PACKAGES = ("hmc-pgt", "dask", "distributed", "numpy", "pyarrow", "deltalake", "fsspec")


@dataclass(frozen=True)
class FailureRecord:
    """One row of the failure table."""

    run_id: str
    subject: str | None
    stage: str
    stage_version: str
    key: str
    error_type: str
    message: str
    attempt: int
    time: float
    traceback: str = ""


def new_run_id() -> str:
    """``YYYYmmddTHHMMSSZ-<8 hex>``: sortable by start time, unique across hosts."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def versions() -> dict[str, str]:
    """Versions of Python and the packages that shape results or storage."""
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _config_json(config: Any) -> Any:
    try:
        return to_jsonable(config)
    except ConfigError:
        return repr(config)


def chain_description(chain: Chain) -> list[dict[str, Any]]:
    """Stage declarations as JSON (for run records and status)."""
    return [{"name": st.name, "version": st.version, "scope": st.scope,
             "inputs": list(st.inputs), "config_fields": list(st.config_fields),
             "resources": st.resources} for st in chain]


def run_record(run_id: str, started: float, layout: OutputLayout, chain: Chain,
               config: Any, retries: int) -> dict[str, Any]:
    """The initial ``run.json`` document (status ``running``)."""
    return {"run_id": run_id, "status": "running", "started": started, "finished": None,
            "out": layout.out, "host": socket.gethostname(), "retries": retries,
            "config": _config_json(config), "chain": chain_description(chain),
            "versions": versions(), "subjects": {}}


def failure_from(exc: BaseException, stage: Stage | None, subject: str | None, key: str,
                 run_id: str, attempt: int, *, stage_name: str | None = None
                 ) -> FailureRecord:
    """A failure record from the exception a unit ended with."""
    if isinstance(exc, StageFailure):
        error_type, message, attempt, trace = exc.error_type, exc.message, exc.attempt, exc.trace
    else:
        error_type, message, trace = type(exc).__name__, str(exc), ""
    return FailureRecord(
        run_id=run_id, subject=subject, stage=stage.name if stage else (stage_name or "?"),
        stage_version=stage.version if stage else "", key=key, error_type=error_type,
        message=message[:4000], attempt=attempt, time=time.time(), traceback=trace[-8000:])


def failures_table(failures: list[FailureRecord] | tuple[FailureRecord, ...]) -> pa.Table:
    """Failure records as an Arrow table with :data:`FAILURE_SCHEMA`."""
    rows = [asdict(f) for f in failures]
    for r in rows:
        r["time"] = datetime.fromtimestamp(r["time"], UTC)
    return pa.Table.from_pylist(rows, schema=FAILURE_SCHEMA)


def _predicate(stage: Stage, subject: str | None, rows: pa.Table) -> dict[str, Any]:
    assert stage.publish is not None
    pred: dict[str, Any] = {}
    for col in stage.publish.predicate_columns:
        if col not in rows.column_names:
            raise StageError(f"stage {stage.name}: published rows lack column {col!r}")
        values = rows.column(col).unique().to_pylist()
        if len(values) == 1:
            pred[col] = values[0]
        elif not values and col == "subject_id" and subject is not None:
            pred[col] = subject
        else:
            raise StageError(f"stage {stage.name}: published rows need exactly one value "
                             f"of {col!r}, found {values[:5]}")
    if subject is not None and "subject_id" in pred and pred["subject_id"] != subject:
        raise StageError(f"stage {stage.name}: rows of {pred['subject_id']!r} "
                         f"published for subject {subject!r}")
    return pred


@dataclass
class TableIndex:
    """Which artifacts a published table holds, read from its provenance columns.

    Attributes:
        keys: every ``_artifact_key`` in the table.
        slices: every ``(_stage, subject_id)`` with rows (``subject_id`` ``None`` when the
            table has no such column).
    """

    keys: set[str]
    slices: set[tuple[str, str | None]]

    @classmethod
    def read(cls, table_uri: str, storage_options: dict[str, Any] | None = None) -> TableIndex:
        """Reads the index of a table (empty when the table does not exist).

        Raises:
            StorageError: when the table exists but lacks the provenance columns (it was
                written by a pgt before 0.2: delete it, the next run rebuilds it).
        """
        from storage import delta

        kwargs: dict[str, Any] = {"storage_options": storage_options} if storage_options else {}
        if not delta.exists(table_uri, **kwargs):
            return cls(set(), set())
        names = delta.table_schema(table_uri, **kwargs).names
        if not set(PROVENANCE_COLUMNS) <= set(names):
            raise StorageError(
                f"{table_uri}: published table lacks the provenance columns "
                f"{list(PROVENANCE_COLUMNS)} (written by an older pgt); delete it and rerun: "
                "it is rebuilt from the committed artifacts")
        cols = [STAGE_COLUMN, KEY_COLUMN] + (["subject_id"] if "subject_id" in names else [])
        rows = delta.read_rows(table_uri, columns=cols, **kwargs)
        distinct = rows.group_by(cols).aggregate([]).to_pydict()
        subjects = distinct.get("subject_id", [None] * len(distinct[KEY_COLUMN]))
        return cls(set(distinct[KEY_COLUMN]),
                   set(zip(distinct[STAGE_COLUMN], subjects, strict=True)))

    def holds(self, stage: str, subject: str | None) -> bool:
        """True when the table has rows of this stage (and subject, for subject stages)."""
        if subject is None:
            return any(st == stage for st, _ in self.slices)
        return (stage, subject) in self.slices


def _rows_of(store: ArtifactStore, stage: Stage, key: str) -> pa.Table:
    """The rows an artifact publishes, read without the rest of the artifact."""
    assert stage.publish is not None
    name = stage.publish.rows
    kind, data = store.load_part(stage.name, key, "table.parquet")
    if kind == "output":
        kind, data = store.load_part(stage.name, key, f"table.{name}.parquet")
    if data is None or kind not in ("table", "output"):
        raise StageError(f"stage {stage.name}: artifact {key} has no table {name!r} to publish")
    rows = decode_table(data)
    clash = set(PROVENANCE_COLUMNS) & set(rows.column_names)
    if clash:
        raise StageError(f"stage {stage.name}: published rows use reserved columns {sorted(clash)}")
    n = rows.num_rows
    return (rows.append_column(STAGE_COLUMN, pa.array([stage.name] * n, pa.string()))
            .append_column(VERSION_COLUMN, pa.array([stage.version] * n, pa.string()))
            .append_column(KEY_COLUMN, pa.array([key] * n, pa.string())))


def publish_rows(store: ArtifactStore, units: list[tuple[Stage, str | None, str]],
                 table_uri: str, storage_options: dict[str, Any] | None = None,
                 index: TableIndex | None = None) -> int:
    """Replaces the units' slices of one Delta table by their rows (with provenance).

    Units whose predicates differ only in the first predicate column (usually
    ``subject_id``) share one commit (an ``IN`` predicate), so a backfill makes a few
    commits, not one per subject. Idempotent: after a crash at any point, publishing the
    same artifacts again replaces the same slices with the same rows. ``index`` (updated
    in place) lets a unit without rows skip its commit when its slice is already empty.

    Args:
        store: the artifact store.
        units: ``(stage, subject, key)`` of committed artifacts publishing to this table.
        table_uri: the Delta table.
        storage_options: object-store options.
        index: what the table holds; updated with the published keys.

    Returns:
        The number of rows written.
    """
    from storage import delta  # imported late: the table layer is optional for artifacts

    groups: dict[tuple[Any, ...], list[tuple[pa.Table, dict[str, Any]]]] = {}
    for stage, subject, key in units:
        pub = stage.publish
        assert pub is not None
        rows = _rows_of(store, stage, key)
        if not rows.num_rows and index is not None and not index.holds(stage.name, subject):
            index.keys.add(key)  # nothing to write, nothing stale to replace
            continue
        pred = _predicate(stage, subject, rows)
        rest = tuple((c, pred[c]) for c in pub.predicate_columns[1:])
        groups.setdefault((stage.name, pub.partition_by, rest), []).append((rows, pred))
    kwargs: dict[str, Any] = {"storage_options": storage_options} if storage_options else {}
    n = 0
    for (_, partition_by, rest), items in groups.items():
        first = next(iter(items[0][1]))
        pred = {first: sorted({p[first] for _, p in items}, key=repr), **dict(rest)}
        rows = pa.concat_tables([r for r, _ in items], promote_options="default")
        delta.replace_rows(table_uri, rows, pred,
                           partition_by=list(partition_by) if partition_by else None,
                           **kwargs)
        n += rows.num_rows
    if units:
        crash_test_pause("publish", units[0][0].name)
    if index is not None:
        for stage, subject, key in units:
            index.keys.add(key)
            index.slices.add((stage.name, subject))
    return n


def retract_rows(stage: Stage, subjects: list[str | None], table_uri: str,
                 storage_options: dict[str, Any] | None = None,
                 index: TableIndex | None = None) -> None:
    """Deletes the rows a stage published for subjects whose unit now fails (one commit).

    A failed or skipped unit's previous rows must not stand in as current; they stay
    readable through the table's history (Delta time travel). ``None`` in ``subjects``
    (a dataset stage) deletes every row of the stage.
    """
    from storage import delta

    kwargs: dict[str, Any] = {"storage_options": storage_options} if storage_options else {}
    if not delta.exists(table_uri, **kwargs):
        return
    pred: dict[str, Any] = {STAGE_COLUMN: stage.name}
    named = sorted({s for s in subjects if s is not None})
    if named and None not in subjects:
        pred["subject_id"] = named
    empty = delta.table_schema(table_uri, **kwargs).empty_table()
    delta.replace_rows(table_uri, empty, pred, **kwargs)
    if index is not None:
        index.slices = {(st, s) for st, s in index.slices
                        if st != stage.name or ("subject_id" in pred and s not in named)}


def write_failures(layout: OutputLayout, failures: list[FailureRecord],
                   storage_options: dict[str, Any] | None = None) -> None:
    """Appends failure rows to ``<tables>/failures`` in one commit (as they happen)."""
    from storage import delta

    if failures:
        kwargs = {"storage_options": storage_options} if storage_options else {}
        delta.append_rows(layout.table("failures"), failures_table(failures), **kwargs)


def finish_run(record: dict[str, Any], summary: RunSummary, layout: OutputLayout,
               storage_options: dict[str, Any] | None = None) -> None:
    """Appends the run row to its table and rewrites ``run.json`` (failure rows were
    written as each unit failed, :func:`write_failures`)."""
    from storage import delta

    kwargs = {"storage_options": storage_options} if storage_options else {}
    record.update(status="finished", finished=summary.finished, counts=summary.counts,
                  failures=[asdict(f) for f in summary.failures])
    row = {
        "run_id": summary.run_id, "started": datetime.fromtimestamp(summary.started, UTC),
        "finished": datetime.fromtimestamp(summary.finished, UTC), "status": "finished",
        "out": layout.out, "host": record["host"], "n_subjects": len(record["subjects"]),
        **{k: summary.counts.get(k, 0) for k in ("done", "cached", "failed", "skipped")},
        "config_json": json.dumps(record["config"], sort_keys=True, default=str),
        "chain_json": json.dumps(record["chain"], sort_keys=True),
        "versions_json": json.dumps(record["versions"], sort_keys=True),
    }
    delta.append_rows(layout.table("runs"), pa.Table.from_pylist([row], schema=RUN_SCHEMA),
                      **kwargs)
    write_json(f"{layout.run_dir(summary.run_id)}/run.json", record, storage_options)
