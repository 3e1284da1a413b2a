"""Tests of the label Delta table (storage.label_table) and the Delta helpers (storage.delta).

They check SPEC §4: exact schema, atomic (subject, round) replacement with one version per
write, time travel, no partial reads under a concurrent writer, two writer processes, and
the same rows read back through pyarrow, DuckDB, Polars and dask.dataframe.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pa_fs
import pytest
from deltalake.exceptions import DeltaError

from pipeline.errors import PgtError, StorageError
from storage import delta
from storage.label_table import (
    LABEL_SCHEMA_VERSION,
    PARTITION_COLUMN,
    STATS_COLUMNS,
    TABLE_PROPERTIES,
    LabelTable,
    blendshape_matrix,
    label_schema,
    labels_to_arrow,
    validate_label_table,
)

# The default rig's 53 names in rig order (docs/contracts.md).
NAMES = """browDown_L browDown_R browInnerUp_L browInnerUp_R browOuterUp_L browOuterUp_R
cheekPuff_L cheekPuff_R cheekSquint_L cheekSquint_R eyeBlink_L eyeBlink_R eyeLookDown_L
eyeLookDown_R eyeLookIn_L eyeLookIn_R eyeLookOut_L eyeLookOut_R eyeLookUp_L eyeLookUp_R
eyeSquint_L eyeSquint_R eyeWide_L eyeWide_R jawForward jawLeft jawOpen jawRight mouthClose
mouthDimple_L mouthDimple_R mouthFrown_L mouthFrown_R mouthFunnel mouthLeft mouthLowerDown_L
mouthLowerDown_R mouthPress_L mouthPress_R mouthPucker mouthRight mouthRollLower
mouthRollUpper mouthShrugLower mouthShrugUpper mouthSmile_L mouthSmile_R mouthStretch_L
mouthStretch_R mouthUpperUp_L mouthUpperUp_R noseSneer_L noseSneer_R""".split()  # noqa: SIM905

F32, STR, I16 = pa.float32(), pa.string(), pa.int16()


def make_labels(
    subject: str,
    t: int = 30,
    *,
    value: float = 0.25,
    recording: str = "rec000",
    label_source: str = "self_supervision",
    label_round: int = 0,
    run_id: str = "run-a",
) -> pa.Table:
    """T rows of one recording; every blendshape = value + frame/1000 (identifiable)."""
    fi = np.arange(t)
    q = np.tile([1.0, 0.0, 0.0, 0.0], (t, 1))
    bs = np.full((t, len(NAMES)), value) + fi[:, None] / 1000.0
    return labels_to_arrow(
        subject,
        recording,
        fi,
        fi.astype(np.int64) * 33_333_333,
        bs,
        np.zeros((t, 4)),
        q,
        np.tile([0.0, 0.01, 0.05], (t, 1)),
        blendshape_names=NAMES,
        confidence=np.ones(t),
        label_source=label_source,
        label_round=label_round,
        pipeline_version="0.1.0",
        rig_version="ict-53",
        run_id=run_id,
    )


def local_fs(uri: str) -> pa_fs.FileSystem:
    """pyarrow-native filesystem for deltalake's datasets (avoids delta-rs#2184 exit abort)."""
    return pa_fs.SubTreeFileSystem(os.path.abspath(uri), pa_fs.LocalFileSystem())


# ------------------------------------------------------------------------------- schema


def test_schema_has_exact_contract_order_dtypes_and_metadata() -> None:
    schema = label_schema(NAMES)
    expected = (
        [("subject_id", STR), ("recording_id", STR), ("frame_index", pa.int32())]
        + [("timestamp_ns", pa.int64())]
        + [(f"bs_{n}", F32) for n in NAMES]
        + [(c, F32) for c in ("gaze_left_yaw", "gaze_left_pitch", "gaze_right_yaw")]
        + [("gaze_right_pitch", F32)]
        + [(c, F32) for c in ("head_qw", "head_qx", "head_qy", "head_qz")]
        + [(c, F32) for c in ("head_tx", "head_ty", "head_tz")]
        + [("confidence", F32), ("residual_keypoint_px", F32), ("residual_photometric", F32)]
        + [("status", STR), ("failure_reason", STR), ("label_source", STR)]
        + [("label_round", I16), ("pipeline_version", STR), ("rig_version", STR)]
        + [("run_id", STR), ("schema_version", I16), ("subject_partition", STR)]
    )
    assert [(f.name, f.type) for f in schema] == expected
    assert len(schema) == 4 + 53 + 4 + 7 + 3 + 2 + 6 + 1
    assert [(f.name, f.type) for f in label_schema(NAMES, version=1)] == expected[:-1]
    assert schema.field("failure_reason").nullable
    assert not schema.field("subject_id").nullable
    assert schema.metadata[b"pgt.label_schema_version"] == str(LABEL_SCHEMA_VERSION).encode()
    assert b'"eyeLookUp_R"' in schema.metadata[b"pgt.blendshape_names"]


def test_labels_to_arrow_builds_canonical_rows() -> None:
    t = make_labels("subj0001", 7, value=0.5)
    assert t.schema.equals(label_schema(NAMES), check_metadata=True)
    assert t.column("status").to_pylist() == ["ok"] * 7
    assert t.column("failure_reason").null_count == 7
    assert t.column("residual_photometric").null_count == 7
    assert t.column("schema_version").to_pylist() == [LABEL_SCHEMA_VERSION] * 7
    m = blendshape_matrix(t, NAMES)
    assert m.dtype == np.float32 and m.shape == (7, 53)
    np.testing.assert_allclose(m[:, 0], 0.5 + np.arange(7) / 1000.0, rtol=1e-6)
    sub = blendshape_matrix(t, ["jawOpen", "browDown_L"])
    np.testing.assert_array_equal(sub[:, 1], m[:, 0])


T, K = 5, len(NAMES)
_GOOD = dict(
    frame_index=np.arange(T),
    timestamp_ns=np.arange(T, dtype=np.int64),
    blendshapes=np.zeros((T, K)),
    gaze=np.zeros((T, 4)),
    head_quat=np.tile([1.0, 0, 0, 0], (T, 1)),
    head_t=np.zeros((T, 3)),
)


@pytest.mark.parametrize(
    ("override", "must_mention"),
    [
        ({"blendshapes": np.zeros((T, K - 1))}, ["blendshapes", "(5, 53)", "(5, 52)"]),
        ({"blendshapes": np.zeros((T + 1, K))}, ["blendshapes", "(6, 53)"]),
        ({"gaze": np.zeros((T, 2))}, ["gaze", "(5, 4)", "(5, 2)"]),
        ({"head_quat": np.zeros((T, 3))}, ["head_quat", "(5, 4)"]),
        ({"head_t": np.zeros(T)}, ["head_t", "(5, 3)", "(5,)"]),
        ({"timestamp_ns": np.arange(T + 2)}, ["timestamp_ns", "(5,)", "(7,)"]),
        ({"frame_index": np.zeros((T, 1), int)}, ["frame_index", "(T,)"]),
        ({"frame_index": np.zeros(T, int)}, ["frame_index", "duplicates"]),
        ({"confidence": np.ones(T + 1)}, ["confidence", "(5,)", "(6,)"]),
        ({"head_quat": np.tile([2.0, 0, 0, 0], (T, 1))}, ["head_quat", "unit"]),
        ({"head_quat": np.tile([-1.0, 0, 0, 0], (T, 1))}, ["head_quat", "w >= 0"]),
        ({"status": ["ok"] * (T - 1) + ["bogus"]}, ["status", "bogus"]),
        ({"failure_reason": ["x"] * 2}, ["failure_reason", "(5,)"]),
        ({"label_source": "teacher"}, ["label_source", "teacher"]),
        ({"label_round": 2}, ["label_round", "self_supervision"]),
        ({"subject_id": "../evil"}, ["subject_id", "safe"]),
        ({"subject_id": "subj0001\n"}, ["subject_id", "safe"]),  # "$" matches before a newline
        ({"recording_id": "rec000\n"}, ["recording_id", "safe"]),
        ({"timestamp_ns": np.zeros(T)}, ["timestamp_ns", "integers"]),
    ],
)
def test_labels_to_arrow_rejects_bad_arguments_clearly(override: dict, must_mention: list) -> None:
    kw = dict(
        _GOOD,
        subject_id="subj0001",
        recording_id="rec000",
        blendshape_names=NAMES,
        label_source="self_supervision",
        label_round=0,
        pipeline_version="0.1.0",
        rig_version="ict-53",
        run_id="r",
    )
    kw.update(override)
    with pytest.raises(StorageError) as info:
        labels_to_arrow(**kw)
    assert isinstance(info.value, PgtError)
    for text in must_mention:
        assert text in str(info.value), (text, str(info.value))


def test_validate_rejects_wrong_dtype_order_and_missing_columns() -> None:
    good = make_labels("subj0001", 3)
    bad_type = good.set_column(2, "frame_index", good.column("frame_index").cast(pa.int64()))
    with pytest.raises(StorageError, match=r"frame_index: int64 \(expected int32\)"):
        validate_label_table(bad_type)
    with pytest.raises(StorageError, match=r"missing=\['confidence'\]"):
        validate_label_table(good.drop_columns(["confidence"]))
    swapped = good.select([1, 0, *range(2, good.num_columns)])
    with pytest.raises(StorageError, match="column order differs"):
        validate_label_table(swapped)


# ------------------------------------------------------------------- writes and versions


def test_replace_subject_round_is_atomic_and_one_version_per_write(tmp_path) -> None:
    lt = LabelTable(str(tmp_path / "labels"))
    assert lt.version() is None and lt.versions() == [] and lt.subjects() == []
    assert lt.write_subject_round(make_labels("s1", 30, value=0.1)) == 0
    assert lt.write_subject_round(make_labels("s2", 20, value=0.2)) == 1
    s2_before = lt.read(subject_id="s2")

    v = lt.write_subject_round(make_labels("s1", 12, value=0.9, run_id="run-b"))
    assert v == 2 and lt.versions() == [0, 1, 2]

    s1 = lt.read(subject_id="s1")
    assert s1.num_rows == 12  # the 30 old rows are gone, not merged
    assert set(s1.column("run_id").to_pylist()) == {"run-b"}
    np.testing.assert_allclose(blendshape_matrix(s1, ["jawOpen"])[:, 0].min(), 0.9, rtol=1e-6)
    assert lt.read(subject_id="s2").equals(s2_before)  # other subjects untouched
    assert lt.subjects() == ["s1", "s2"]
    assert lt.history()[0]["pgt.run_id"] == "run-b"
    assert lt.history()[0]["pgt.subject_id"] == "s1"

    # time travel: every commit is a readable version with its own content
    assert lt.read(version=0).num_rows == 30
    old = lt.read(subject_id="s1", version=1)
    assert old.num_rows == 30 and set(old.column("run_id").to_pylist()) == {"run-a"}
    assert lt.read(version=2).num_rows == 32


def test_rounds_and_sources_are_separate_replace_keys(tmp_path) -> None:
    lt = LabelTable(str(tmp_path / "labels"))
    lt.write_subject_round(make_labels("s1", 10))
    lt.write_subject_round(make_labels("s1", 11, label_source="distillation", label_round=1))
    lt.write_subject_round(make_labels("s1", 12, label_source="distillation", label_round=2))
    lt.write_subject_round(make_labels("s1", 5, label_source="distillation", label_round=1))
    assert lt.read(subject_id="s1", label_round=0).num_rows == 10
    assert lt.read(subject_id="s1", label_round=1).num_rows == 5
    assert lt.read(subject_id="s1", label_round=2).num_rows == 12
    assert lt.read(label_source="distillation").num_rows == 17


def test_several_recordings_in_one_write_and_filters(tmp_path) -> None:
    lt = LabelTable(str(tmp_path / "labels"))
    both = pa.concat_tables([make_labels("s1", 4), make_labels("s1", 6, recording="rec001")])
    lt.write_subject_round(both)
    lt.write_subject_round(make_labels("s2", 3))
    assert lt.read(subject_id="s1", recording_id="rec001").num_rows == 6
    assert lt.read(subject_id=["s1", "s2"]).num_rows == 13
    assert lt.read(columns=["subject_id", "bs_jawOpen"]).column_names == [
        "subject_id",
        "bs_jawOpen",
    ]


def test_write_rejects_mixed_keys_and_foreign_schema(tmp_path) -> None:
    lt = LabelTable(str(tmp_path / "labels"))
    two = pa.concat_tables([make_labels("s1", 3), make_labels("s2", 3)])
    with pytest.raises(StorageError, match="one subject_id per write"):
        lt.write_subject_round(two)
    with pytest.raises(StorageError, match="duplicate"):
        lt.write_subject_round(pa.concat_tables([make_labels("s1", 3), make_labels("s1", 2)]))
    lt.write_subject_round(make_labels("s1", 3))
    other_rig = labels_to_arrow(
        "s3", "rec000", np.arange(2), np.arange(2), np.zeros((2, 3)), np.zeros((2, 4)),
        np.tile([1.0, 0, 0, 0], (2, 1)), np.zeros((2, 3)), blendshape_names=["a", "b", "c"],
        label_source="self_supervision", label_round=0, pipeline_version="x",
        rig_version="y", run_id="z",
    )  # fmt: skip
    with pytest.raises(StorageError, match="blendshape columns differ"):
        lt.write_subject_round(other_rig)
    assert lt.versions() == [0]  # nothing was committed by the rejected writes


def test_delta_helpers_quote_predicates_and_wrap_errors(tmp_path) -> None:
    uri = str(tmp_path / "generic")
    rows = pa.table({"k": ["o'brien", "x"], "n": pa.array([1, 2], pa.int16())})
    assert delta.sql_predicate({"k": "o'brien", "n": 1}) == "\"k\" = 'o''brien' AND \"n\" = 1"
    assert delta.append_rows(uri, rows) == 0
    new = pa.table({"k": ["o'brien"], "n": pa.array([1], pa.int16())})
    assert delta.replace_rows(uri, new, {"k": "o'brien", "n": 1}) == 1
    assert delta.read_rows(uri, filters={"k": "o'brien"}).num_rows == 1
    assert delta.read_rows(uri, filters={"k": ["x", "o'brien"]}).num_rows == 2
    whole = delta.read_rows(uri, columns=["n", "k"])  # full scans go through delta-rs
    assert whole.schema == pa.schema([("n", pa.int16()), ("k", pa.string())])
    assert sorted(whole.column("k").to_pylist()) == ["o'brien", "x"]
    with pytest.raises(StorageError, match="no such columns"):
        delta.read_rows(uri, columns=["nope"])
    assert delta.table_version(uri) == 1 and delta.exists(uri)
    # rows that do not match the predicate are refused (nothing committed)
    with pytest.raises(StorageError, match="generic"):
        delta.replace_rows(uri, rows, {"k": "x"})
    with pytest.raises(StorageError, match="generic"):
        delta.append_rows(uri, pa.table({"k": [1.5]}))
    missing = str(tmp_path / "nope")
    with pytest.raises(StorageError, match="nope"):
        delta.read_rows(missing)
    assert delta.table_version(missing) is None and not delta.exists(missing)
    assert delta.table_version(uri) == 1


# --------------------------------------------------------------------------- concurrency


def test_reader_never_sees_a_partial_replace(tmp_path) -> None:
    lt = LabelTable(str(tmp_path / "labels"))
    lt.write_subject_round(make_labels("other", 40))
    lt.write_subject_round(make_labels("s1", 50, value=0.0))
    sizes = {50, 80}
    seen: list[tuple[int, int, int]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for i in range(20):
                n = 80 if i % 2 == 0 else 50
                lt.write_subject_round(make_labels("s1", n, value=float(i), run_id=f"w{i}"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            done.set()

    th = threading.Thread(target=writer)
    th.start()
    reader = LabelTable(lt.uri)
    while not done.is_set() or len(seen) < 5:
        s1 = reader.read(subject_id="s1", columns=["run_id", "frame_index"])
        total = reader.read(columns=["subject_id"]).num_rows
        seen.append((s1.num_rows, len(set(s1.column("run_id").to_pylist())), total))
    th.join()
    assert not errors, errors
    for n, n_runs, total in seen:
        assert n in sizes and n_runs == 1, (n, n_runs)  # one whole write, never a mix
        assert total - 40 in sizes
    assert len({n for n, _, _ in seen}) == 2, "the reader should have overlapped the writer"
    assert lt.versions() == list(range(22))


def _writer_process(uri: str, prefix: str, n_subjects: int) -> None:
    """Child process: write n subjects, then relabel each (2 x n commits)."""
    lt = LabelTable(uri)
    for rnd in ("first", "second"):
        for i in range(n_subjects):
            lt.write_subject_round(make_labels(f"{prefix}{i}", 8 + i, run_id=f"{prefix}-{rnd}"))


def test_two_writer_processes_never_lose_or_duplicate_rows(tmp_path) -> None:
    uri = str(tmp_path / "labels")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer_process, args=(uri, p, 5)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]

    lt = LabelTable(uri)
    t = lt.read()
    keys = list(
        zip(
            *(t.column(c).to_pylist() for c in ("subject_id", "recording_id", "frame_index")),
            strict=True,
        )
    )
    assert len(keys) == len(set(keys))  # every row exactly once
    assert t.num_rows == 2 * sum(8 + i for i in range(5))
    for p in ("a", "b"):
        for i in range(5):
            rows = lt.read(subject_id=f"{p}{i}")
            assert rows.num_rows == 8 + i
            assert set(rows.column("run_id").to_pylist()) == {f"{p}-second"}
    assert lt.versions() == list(range(20))  # one commit per write, none lost


# ------------------------------------------------------------------------------ readers


def test_pyarrow_duckdb_polars_dask_read_the_same_rows(tmp_path) -> None:
    import dask.dataframe as dd
    import duckdb
    import polars as pl
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    uri = str(tmp_path / "labels")
    lt = LabelTable(uri)
    for i, s in enumerate(("s1", "s2", "s3")):
        lt.write_subject_round(make_labels(s, 10 + i, value=0.1 * i))
    lt.write_subject_round(make_labels("s2", 4, value=0.7))  # the old s2 files must not show
    key = ["subject_id", "recording_id", "frame_index"]
    cols = [*key, "bs_jawOpen", "gaze_left_yaw", "head_qw", "status", "label_round"]
    ref = lt.read().select(cols).to_pandas().sort_values(key).reset_index(drop=True)
    assert len(ref) == 10 + 4 + 12

    dt = DeltaTable(uri)
    via_pyarrow = dt.to_pyarrow_table(filesystem=local_fs(uri)).select(cols).to_pandas()
    files = dt.file_uris()  # the current version's Parquet files only
    # v2 partitions by a copy of subject_id: the files themselves still hold subject_id
    assert all("subject_id" in pq.read_schema(f).names for f in files)
    via_duckdb = duckdb.sql(f"SELECT {', '.join(cols)} FROM read_parquet({files!r})").df()
    via_polars = pl.read_delta(uri).select(cols).to_pandas()
    via_dask = dd.read_parquet(files, columns=cols).compute()

    for name, df in [("pyarrow", via_pyarrow), ("duckdb", via_duckdb), ("polars", via_polars),
                     ("dask", via_dask)]:  # fmt: skip
        got = df.sort_values(key).reset_index(drop=True)
        assert len(got) == len(ref), name
        for c in cols:
            np.testing.assert_array_equal(
                got[c].to_numpy(), ref[c].to_numpy(), err_msg=f"{name}:{c}"
            )


# ------------------------------------------------------------ layout and maintenance


def _log_lines(uri: str, version: int) -> list[str]:
    return Path(uri, "_delta_log", f"{version:020d}.json").read_text().splitlines()


def _commit_actions(uri: str, version: int) -> tuple[list[str], list[str]]:
    """(removed, added) data-file paths of one commit, from its log entry."""
    actions = [json.loads(line) for line in _log_lines(uri, version)]
    removed = [a["remove"]["path"] for a in actions if "remove" in a]
    added = [a["add"]["path"] for a in actions if "add" in a]
    return removed, added


def _subject_of_file(uri: str, path: str) -> set[str]:
    import pyarrow.parquet as pq

    return set(pq.read_table(Path(uri, path), columns=["subject_id"])["subject_id"].to_pylist())


def test_compaction_keeps_one_subject_per_file_rows_and_history(tmp_path) -> None:
    from deltalake import DeltaTable

    lt = LabelTable(str(tmp_path / "labels"))
    for i in range(6):
        lt.write_subject_round(make_labels(f"s{i}", 10 + i))
        lt.write_subject_round(make_labels(f"s{i}", 3, label_source="distillation", label_round=1))
    lt.write_subject_round(make_labels("s2", 4, label_source="distillation", label_round=1))
    order = [
        ("subject_id", "ascending"),
        ("label_round", "ascending"),
        ("frame_index", "ascending"),
    ]
    before = lt.read().sort_by(order)
    assert len(DeltaTable(lt.uri).file_uris()) == 12
    metrics = lt.optimize()
    assert metrics["version"] == 13 and lt.versions() == list(range(14))
    files = pa.table(DeltaTable(lt.uri).get_add_actions(flatten=True))["path"].to_pylist()
    assert len(files) == 6  # one file per subject: the rounds merged, subjects never
    assert sorted(_subject_of_file(lt.uri, f).pop() for f in files) == [f"s{i}" for i in range(6)]
    assert all(len(_subject_of_file(lt.uri, f)) == 1 for f in files)
    assert lt.read().sort_by(order).equals(before)
    assert lt.read(subject_id="s2", label_round=1).num_rows == 4
    assert lt.read(version=12).num_rows == before.num_rows  # time travel still works


def test_replace_after_compaction_touches_only_that_subjects_files(tmp_path) -> None:
    lt = LabelTable(str(tmp_path / "labels"))
    for i in range(8):  # two writes per subject, then compaction (the state after a run)
        lt.write_subject_round(make_labels(f"s{i}", 20))
        lt.write_subject_round(make_labels(f"s{i}", 5, label_source="distillation", label_round=1))
    lt.optimize()
    files_before = set(delta.data_files(lt.uri))

    v = lt.write_subject_round(make_labels("s3", 20, value=0.9, run_id="relabel"))
    removed, added = _commit_actions(lt.uri, v)
    assert removed and added
    assert all(p.startswith(f"{PARTITION_COLUMN}=s3/") for p in removed + added), (removed, added)
    untouched = {f for f in files_before if f"/{PARTITION_COLUMN}=s3/" not in f}
    assert untouched <= set(delta.data_files(lt.uri))  # every other subject's file stays
    assert len(untouched) == 7
    # the log keeps min/max statistics only for the columns reads and replaces filter on
    stats = json.loads(
        next(json.loads(x)["add"]["stats"] for x in _log_lines(lt.uri, v) if '"add"' in x)
    )
    assert sorted(stats["minValues"]) == sorted(STATS_COLUMNS)
    s3 = lt.read(subject_id="s3")
    assert sorted(set(s3.column("run_id").to_pylist())) == ["relabel", "run-a"]
    assert lt.read(subject_id="s3", label_round=1).num_rows == 5  # the other round kept
    assert lt.read().num_rows == 8 * 25


def test_writes_compact_a_subject_that_accumulates_files(tmp_path) -> None:
    lt = LabelTable(str(tmp_path / "labels"), auto_compact_files=2)
    lt.write_subject_round(make_labels("other", 5))
    for r in range(1, 4):
        lt.write_subject_round(make_labels("s1", 5, label_source="distillation", label_round=r))
    files = delta.data_files(lt.uri)
    assert sum(f"/{PARTITION_COLUMN}=s1/" in f for f in files) == 1  # 3 files -> compacted
    assert sum(f"/{PARTITION_COLUMN}=other/" in f for f in files) == 1
    assert lt.read(subject_id="s1").num_rows == 15
    assert lt.history()[0]["operation"] == "OPTIMIZE"


class _RaceCounter(logging.Handler):
    """Counts storage.delta's "lost a race" records: commits that conflicted and retried."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.races = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.races += "lost a race" in record.getMessage()


def _relabel_process(uri: str, subjects: list[str], barrier, queue) -> None:
    """Child process: relabel each subject twice, released with the other writer."""
    counter = _RaceCounter()
    log = logging.getLogger("storage.delta")
    log.setLevel(logging.INFO)
    log.addHandler(counter)
    lt = LabelTable(uri)
    barrier.wait()
    for rnd in ("x", "y"):
        for s in subjects:
            lt.write_subject_round(make_labels(s, 12, value=0.5, run_id=f"{s}-{rnd}"))
    queue.put(counter.races)


def test_writers_of_different_subjects_never_conflict(tmp_path) -> None:
    uri = str(tmp_path / "labels")
    lt = LabelTable(uri)
    for i in range(8):
        lt.write_subject_round(make_labels(f"s{i}", 12))
        lt.write_subject_round(make_labels(f"s{i}", 3, label_source="distillation", label_round=1))
    lt.optimize()
    v0 = lt.version()
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    groups = [["s0", "s1", "s2", "s3"], ["s4", "s5", "s6", "s7"]]
    procs = [ctx.Process(target=_relabel_process, args=(uri, g, barrier, queue)) for g in groups]
    for p in procs:
        p.start()
    races = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert races == [0, 0]  # no commit had to be retried
    assert lt.version() == v0 + 16  # one commit per write, none lost
    for i in range(8):
        rows = lt.read(subject_id=f"s{i}", label_round=0)
        assert rows.num_rows == 12 and set(rows.column("run_id").to_pylist()) == {f"s{i}-y"}
        assert lt.read(subject_id=f"s{i}", label_round=1).num_rows == 3


# ------------------------------------------------------------ commits that raise late


def _fail_after_landing(monkeypatch, exc: BaseException) -> list[int]:
    """Make the next write_deltalake commit for real, then raise ``exc`` (once)."""
    real = delta.write_deltalake
    calls: list[int] = []

    def flaky(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            raise exc

    monkeypatch.setattr(delta, "write_deltalake", flaky)
    return calls


@pytest.mark.parametrize(
    "exc",
    [OSError("connection reset after the log put"), DeltaError("Generic error: hook")],
    ids=["io-error", "delta-error"],
)
def test_append_that_raised_after_landing_is_not_repeated(tmp_path, monkeypatch, exc) -> None:
    uri = str(tmp_path / "generic")
    rows = pa.table({"k": ["a", "b"], "n": pa.array([1, 2], pa.int16())})
    assert delta.append_rows(uri, rows) == 0
    calls = _fail_after_landing(monkeypatch, exc)
    assert delta.append_rows(uri, rows) == 1  # the landed version, reported as success
    assert len(calls) == 1  # no second attempt
    assert delta.read_rows(uri).num_rows == 4  # the rows once, not twice
    assert delta.table_version(uri) == 1


def test_replace_that_raised_after_landing_is_not_repeated(tmp_path, monkeypatch) -> None:
    lt = LabelTable(str(tmp_path / "labels"))
    lt.write_subject_round(make_labels("s1", 10))
    _fail_after_landing(monkeypatch, OSError("timeout"))
    assert lt.write_subject_round(make_labels("s1", 7, run_id="new")) == 1
    assert lt.versions() == [0, 1]
    assert lt.read(subject_id="s1").column("run_id").to_pylist() == ["new"] * 7


def test_a_commit_that_did_not_land_is_still_retried(tmp_path, monkeypatch) -> None:
    uri = str(tmp_path / "generic")
    rows = pa.table({"k": ["a"], "n": pa.array([1], pa.int16())})
    delta.append_rows(uri, rows)
    real = delta.write_deltalake
    calls: list[int] = []

    def fails_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("connection refused before the put")
        real(*args, **kwargs)

    monkeypatch.setattr(delta, "write_deltalake", fails_first)
    assert delta.append_rows(uri, rows) == 1
    assert len(calls) == 2 and delta.read_rows(uri).num_rows == 2


# ------------------------------------------------------------------ schema versions


def _write_v1_table(uri: str) -> pa.Table:
    """A label table as version-1 code wrote it: no partition column, unpartitioned."""
    rows = []
    for s in ("s1", "s2"):
        t = make_labels(s, 6).drop_columns([PARTITION_COLUMN])
        t = t.set_column(
            t.schema.get_field_index("schema_version"),
            pa.field("schema_version", I16, nullable=False),
            pa.array([1] * 6, I16),
        )
        rows.append(t)
        delta.append_rows(uri, t)
    return pa.concat_tables(rows)


def test_v1_tables_stay_readable_refuse_writes_clearly_and_upgrade(tmp_path) -> None:
    from deltalake import DeltaTable

    uri = str(tmp_path / "labels")
    v1_rows = _write_v1_table(uri)
    lt = LabelTable(uri)
    assert lt.schema_version() == 1
    got = lt.read(subject_id="s2")
    assert got.schema.equals(label_schema(NAMES), check_metadata=True)
    assert got.column(PARTITION_COLUMN).to_pylist() == ["s2"] * 6
    assert got.column("schema_version").to_pylist() == [1] * 6  # rows keep their version
    with pytest.raises(StorageError, match=r"schema v1.*upgrade\(\)"):
        lt.write_subject_round(make_labels("s1", 3))
    assert lt.version() == 1

    assert lt.upgrade() == 3 and lt.upgrade() is None  # v2: table properties, v3: rewrite
    assert LabelTable(uri).schema_version() == 2
    assert DeltaTable(uri).metadata().partition_columns == [PARTITION_COLUMN]
    assert DeltaTable(uri).metadata().configuration == TABLE_PROPERTIES
    order = [("subject_id", "ascending"), ("frame_index", "ascending")]
    assert (
        lt.read()
        .drop_columns([PARTITION_COLUMN])
        .sort_by(order)
        .equals(validate_label_table(v1_rows, version=1).sort_by(order))
    )
    assert lt.read(version=1).num_rows == 12  # the v1 versions stay readable
    lt.write_subject_round(make_labels("s1", 3, run_id="after"))
    assert lt.read(subject_id="s1").num_rows == 3 and lt.read().num_rows == 9
