"""Outputs and tables on an object store, against moto's S3 server on 127.0.0.1.

The captures stay local; the output root, its Delta tables and a label table live in a
bucket. Through the ``pgt`` command: a backfill, its resume (endpoint from the environment
only), ``status`` and ``metrics``; then the label table's write, replace, time travel and
concurrent writers.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.artifacts import ArtifactStore, filesystem
from pipeline.errors import ConfigError
from pipeline.status import status
from pipeline.storage_options import (
    ENDPOINT_ENV,
    delta_options,
    fsspec_options,
    parse_storage_options,
    sibling_url,
)
from storage import delta
from storage.capture import Capture
from storage.label_table import PARTITION_COLUMN, LabelTable
from tests.cli_runner import QUICK_RUN
from tests.cli_runner import run_pgt as _pgt
from workflows.chain import STAGES
from workflows.metrics import MetricsJob, run_metrics

pytestmark = pytest.mark.timeout(900)  # a hang (e.g. a store that never answers) fails

BUCKET = "pgt-test"
OUT = f"s3://{BUCKET}/pgt"


#: moto's server, in its own process: deltalake holds the GIL while it waits for the store
#: (``DeltaTable.history``), so a server thread in the test process would never answer.
#: It exits when its stdin closes, so it cannot outlive the test process.
_SERVER = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""


@pytest.fixture(scope="module")
def s3():
    """The endpoint URL of a fresh S3 server holding an empty :data:`BUCKET`.

    Test credentials come from the environment (as in production); the endpoint is not
    in it, so each test chooses how it reaches the store.
    """
    import boto3

    env = pytest.MonkeyPatch()
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN",
                 "AWS_ALLOW_HTTP"):
        env.delenv(name, raising=False)
    env.setenv("AWS_ACCESS_KEY_ID", "testing")
    env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    env.setenv("AWS_REGION", "us-east-1")
    env.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask a metadata service
    server = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        endpoint = f"http://127.0.0.1:{int(server.stdout.readline())}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        env.undo()




def _run_id(stdout: str) -> str:
    (run_id,) = re.findall(r"^run (\d{8}T\d{6}Z-[0-9a-f]{8}):", stdout, re.MULTILINE)
    return run_id


@pytest.fixture(scope="module")
def s3_runs(s3, tiny_root, tmp_path_factory):
    """A backfill to S3 (endpoint given by ``--storage-option``), then the same backfill
    again (endpoint from ``AWS_ENDPOINT_URL`` only), both run from an empty folder where
    any stray local write would show. Returns ``(stdout 1, stdout 2, that folder)``."""
    cwd = tmp_path_factory.mktemp("s3-cwd")
    captures = str(tiny_root / "captures")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        first = _pgt("backfill", captures, "--out", OUT, "--workers", "1", "--quiet", *QUICK_RUN,
                     "--storage-option", f"endpoint_url={s3}")
        mp.setenv("AWS_ENDPOINT_URL", s3)
        second = _pgt("backfill", captures, "--out", OUT, "--workers", "1", "--quiet", *QUICK_RUN)
    return first, second, cwd


def test_backfill_writes_artifacts_records_and_tables_to_the_bucket(s3, s3_runs, tiny_subject):
    first, _, cwd = s3_runs
    assert f"done {len(STAGES)}" in first and "failed 0" in first
    run_id = _run_id(first)
    fs, root = filesystem(OUT, {"endpoint_url": s3})
    assert fs.protocol[0] == "s3"
    assert fs.exists(f"{root}/runs/{run_id}/run.json")
    assert fs.exists(f"{root}/runs/{run_id}/dask-report.html")
    committed = ArtifactStore(f"{OUT}/artifacts", {"endpoint_url": s3}).committed()
    assert sorted(stage for stage, _ in committed) == sorted(st.name for st in STAGES)
    capture_dir, _ = tiny_subject
    rows = delta.read_rows(f"{OUT}/tables/landmarks", storage_options={"endpoint_url": s3})
    capture = Capture.open(capture_dir)
    assert rows.num_rows == sum(capture.phone_frame_count(e) for e in capture.phone_expressions)
    assert set(rows.column("subject_id").to_pylist()) == {capture_dir.name}
    runs = delta.read_rows(f"{OUT}/tables/runs", storage_options={"endpoint_url": s3})
    assert run_id in runs.column("run_id").to_pylist()
    assert list(cwd.iterdir()) == [], "nothing may be written to the local disk"


def test_resume_from_the_bucket_recomputes_nothing(s3, s3_runs):
    first, second, _ = s3_runs
    assert f"cached {len(STAGES)}, done 0, failed 0" in second, second
    assert _run_id(second) != _run_id(first)
    rows = delta.read_rows(f"{OUT}/tables/landmarks", storage_options={"endpoint_url": s3})
    assert rows.num_rows > 0 and len(set(rows.column("subject_id").to_pylist())) == 1


def test_status_reads_the_runs_in_the_bucket(s3, s3_runs):
    _, second, _ = s3_runs
    text = _pgt("status", OUT, "--storage-option", f"endpoint_url={s3}")
    assert f"run {_run_id(second)} (finished)" in text, text
    for st in STAGES:
        assert f"| {st.name} | 1 | 0 | 0 | 0 |" in text
    with pytest.MonkeyPatch.context() as mp:  # the library call, endpoint from the environment
        mp.setenv("AWS_ENDPOINT_URL", s3)
        report = status(OUT)
    assert report.run_id == _run_id(second)
    assert report.counts() == {st: {"done": 1, "failed": 0, "skipped": 0, "pending": 0}
                               for st in (s.name for s in STAGES)}


def test_metrics_of_a_label_table_in_the_bucket_match_the_local_ones(s3, tiny_root, tmp_path):
    truth = tiny_root / "ground_truth"
    fs, _ = filesystem(OUT, {"endpoint_url": s3})
    fs.put(str(truth / "labels"), f"{BUCKET}/gt/labels", recursive=True)
    _pgt("metrics", f"s3://{BUCKET}/gt/labels", "--captures", str(tiny_root / "captures"),
         "--truth", str(truth), "--storage-option", f"endpoint_url={s3}")
    # written beside the label table, in the bucket
    remote = delta.read_rows(f"s3://{BUCKET}/gt/metrics", storage_options={"endpoint_url": s3})
    run_metrics(MetricsJob(labels=str(truth / "labels"), captures=str(tiny_root / "captures"),
                           truth=str(truth), out=str(tmp_path / "metrics")))
    local = delta.read_rows(str(tmp_path / "metrics"))
    keep = [c for c in local.column_names if c not in ("computed_at", "run_id")]
    assert remote.num_rows == local.num_rows > 0
    assert _sorted_rows(remote.select(keep)) == _sorted_rows(local.select(keep))


def _sorted_rows(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=repr)


@pytest.fixture(scope="module")
def truth_labels(tiny_root) -> pa.Table:
    """The tiny subject's true label rows (one subject, round and source)."""
    return LabelTable(str(tiny_root / "ground_truth" / "labels")).read()


def _as_subject(table: pa.Table, subject: str) -> pa.Table:
    # the subject's id and its partition value (label table v2) move together
    for column in ("subject_id", PARTITION_COLUMN):
        i = table.schema.get_field_index(column)
        if i >= 0:
            table = table.set_column(i, table.schema.field(i),
                                     pa.array([subject] * table.num_rows, table.schema.field(i).type))
    return table


def test_label_table_write_replace_and_time_travel_in_the_bucket(s3, truth_labels):
    table = LabelTable(f"s3://{BUCKET}/labels-a", {"endpoint_url": s3})
    v0 = table.write_subject_round(truth_labels)
    other = _as_subject(truth_labels, "other-subject")
    v1 = table.write_subject_round(other)
    conf = truth_labels.schema.get_field_index("confidence")
    relabelled = truth_labels.set_column(
        conf, truth_labels.schema.field(conf), pa.array([0.25] * truth_labels.num_rows, pa.float32()))
    v2 = table.write_subject_round(relabelled)
    subject = truth_labels.column("subject_id")[0].as_py()
    assert _sorted_rows(table.read(subject_id=subject)) == _sorted_rows(relabelled)
    assert _sorted_rows(table.read(subject_id="other-subject")) == _sorted_rows(other)
    assert _sorted_rows(table.read(version=v0)) == _sorted_rows(truth_labels)
    assert v0 < v1 < v2 == table.version()


def test_concurrent_writers_in_the_bucket_lose_no_commit(s3, truth_labels):
    """Delta commits on S3 are conditional puts: two writers never overwrite a version."""
    uri = f"s3://{BUCKET}/labels-concurrent"
    rounds = 4
    errors: list[BaseException] = []
    versions: list[int] = []

    def writer(subject: str) -> None:
        try:
            table = LabelTable(uri, {"endpoint_url": s3})
            for _ in range(rounds):
                versions.append(table.write_subject_round(_as_subject(truth_labels, subject)))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in ("w-a", "w-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(versions)) == 2 * rounds, f"two writers got one version: {versions}"
    rows = LabelTable(uri, {"endpoint_url": s3}).read()
    assert rows.num_rows == 2 * truth_labels.num_rows
    counts = pc.value_counts(rows.column("subject_id")).to_pylist()
    assert sorted((c["values"], c["counts"]) for c in counts) == [
        ("w-a", truth_labels.num_rows), ("w-b", truth_labels.num_rows)]


# ------------------------------------------------------------------ option parsing and mapping

def test_storage_option_flags_parse_to_typed_nested_options():
    assert parse_storage_options(["endpoint_url=http://h:9000/x=y", "anon=TRUE",
                                  "client_kwargs.region_name=eu-west-1"]) == {
        "endpoint_url": "http://h:9000/x=y", "anon": True,
        "client_kwargs": {"region_name": "eu-west-1"}}
    for bad, why in ((["s3cr3t"], "has no '='"), (["=v"], "not a (dotted) identifier"),
                     (["a..b=1"], "not a (dotted) identifier")):
        with pytest.raises(ConfigError, match=re.escape(why)) as info:
            parse_storage_options(bad)
        assert "s3cr3t" not in str(info.value), "a value is never echoed"


def test_fsspec_names_reach_deltalake_and_back(monkeypatch):
    for name in ENDPOINT_ENV + ("AWS_ALLOW_HTTP",):
        monkeypatch.delenv(name, raising=False)
    fs_style = {"endpoint_url": "http://127.0.0.1:9000", "key": "k", "secret": "s",
                "client_kwargs": {"region_name": "eu-west-1"}, "use_listings_cache": False}
    assert delta_options("s3://b/t", fs_style) == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "eu-west-1", "AWS_ALLOW_HTTP": "true"}
    delta_style = {"AWS_ENDPOINT_URL": "https://s3.example", "aws_access_key_id": "k",
                   "AWS_SKIP_SIGNATURE": "true", "AWS_S3_ALLOW_UNSAFE_RENAME": "false"}
    assert fsspec_options("s3://b/t", delta_style) == {
        "endpoint_url": "https://s3.example", "key": "k", "anon": True}
    assert delta_options("s3://b/t", delta_style) == {
        "AWS_ENDPOINT_URL": "https://s3.example", "AWS_ACCESS_KEY_ID": "k",
        "AWS_SKIP_SIGNATURE": "true", "AWS_S3_ALLOW_UNSAFE_RENAME": "false"}
    # an explicit key of the library's own spelling wins over the translation
    assert fsspec_options("s3://b", {"key": "mine", "AWS_ACCESS_KEY_ID": "other"})["key"] == "mine"
    assert delta_options("/local/table", fs_style) is None
    assert delta_options("gs://b/t", {"token": "t"}) is None, "S3 names only map for s3://"


def test_an_http_endpoint_in_the_environment_is_allowed_for_deltalake(monkeypatch):
    monkeypatch.delenv("AWS_ALLOW_HTTP", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio:9000")
    assert delta_options("s3://b/t", None) == {"AWS_ALLOW_HTTP": "true"}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://minio:9000")
    assert delta_options("s3://b/t", None) is None


def test_sibling_url_keeps_the_protocol():
    assert sibling_url("s3://b/gt/labels/", "metrics") == "s3://b/gt/metrics"
    assert sibling_url("/data/gt/labels", "metrics") == "/data/gt/metrics"
    with pytest.raises(ConfigError):
        sibling_url("s3://b", "metrics")
