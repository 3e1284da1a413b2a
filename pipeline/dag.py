"""Driver: plan units (stage x subject), skip committed ones, run the rest on Dask.

Resume semantics: the plan is derived from storage alone. Every unit's content key is
computed from the config and its inputs' keys; a unit whose artifact is committed is a
cache hit and never submitted. A dataset stage is a barrier: it is planned once every
upstream unit is resolved, over the subjects whose inputs all succeeded.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from distributed import Client, Future, as_completed, performance_report

from pipeline import records
from pipeline.artifacts import ArtifactStore, fingerprint_captures
from pipeline.cluster import default_n_workers, gpu_resources, open_client
from pipeline.config import validate_config
from pipeline.errors import ConfigError
from pipeline.progress import progress_bar
from pipeline.runlog import OutputLayout, StageLog, write_json
from pipeline.stage import (
    CAPTURE,
    Chain,
    Stage,
    config_values,
    content_key,
    key_config,
    library_versions,
)
from pipeline.storage_options import fsspec_options
from pipeline.tasks import InputRef, StageFailure, UnitSpec, execute_unit
from storage import delta

#: Published rows are flushed every this many units or seconds, whichever comes first.
PUBLISH_BATCH = 256
PUBLISH_EVERY_S = 30.0
UnitId = tuple[str, str | None]


@dataclass
class Unit:
    """Driver-side state of one unit (stage x subject, subject ``None`` for a dataset)."""

    stage: Stage
    subject: str | None
    key: str | None = None
    state: str = "planned"  # cached | submitted | done | failed | skipped
    future: Future | None = None
    reason: str = ""


@dataclass(frozen=True)
class RunSummary:
    """What :func:`run_chain` did.

    Attributes:
        run_id: the run's id.
        out: output root.
        started, finished: POSIX times.
        counts: units per state: ``done`` (executed now), ``cached``, ``failed``, ``skipped``.
        failures: one record per failed unit.
        keys: ``(stage, subject)`` -> content key (``subject`` is ``None`` for dataset stages).
        states: ``(stage, subject)`` -> final state.
        run_dir: the run's folder (record, plan, stage log, report).
        timings: seconds spent in ``fingerprint`` (captures), ``plan`` (first planning
            pass: keys, cache checks, submission), ``execute`` (until every unit resolved)
            and ``total``.
    """

    run_id: str
    out: str
    started: float
    finished: float
    counts: dict[str, int]
    failures: tuple[records.FailureRecord, ...]
    keys: dict[UnitId, str] = field(default_factory=dict)
    states: dict[UnitId, str] = field(default_factory=dict)
    run_dir: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when nothing failed or was skipped."""
        return not self.counts.get("failed") and not self.counts.get("skipped")


@dataclass(frozen=True)
class _Prepared:
    """What a run checks and reads before anything runs (errors here stop the run early).

    Attributes:
        values: stage -> declared config field -> value (what the stage receives).
        key_values: stage -> the same fields as they enter the key (files fingerprinted).
        libraries: distribution -> installed version, over every stage's declaration.
        indexes: published table name -> what it holds.
    """

    values: dict[str, dict[str, Any]]
    key_values: dict[str, dict[str, Any]]
    libraries: dict[str, str]
    indexes: dict[str, records.TableIndex]


def _prepare(chain: Chain, config: Any, layout: OutputLayout,
             storage_options: dict[str, Any] | None) -> _Prepared:
    validate_config(config)
    values = {st.name: config_values(st, config) for st in chain}  # missing fields fail here
    return _Prepared(
        values=values,
        key_values={st.name: key_config(st, config) for st in chain},
        libraries=library_versions(sorted({n for st in chain for n in st.library_versions})),
        indexes={st.publish.table: records.TableIndex.read(layout.table(st.publish.table),
                                                           storage_options)
                 for st in chain if st.publish})


def _check_worker_libraries(client: Client, libraries: dict[str, str]) -> None:
    """The workers run the stages: their library versions must be the ones in the keys."""
    if not libraries:
        return
    for worker, found in client.run(library_versions, list(libraries)).items():
        if found != libraries:
            diff = {n: (libraries[n], found.get(n)) for n in libraries
                    if found.get(n) != libraries[n]}
            raise ConfigError(f"worker {worker} has other library versions than the driver "
                              f"(driver, worker): {diff}; content keys would not describe "
                              "the outputs")


class _Run:
    """One run's planning and completion loop."""

    def __init__(self, client: Client, chain: Chain, prep: _Prepared,
                 subjects: dict[str, tuple[str, str]], store: ArtifactStore, log: StageLog,
                 layout: OutputLayout, run_id: str, retries: int, progress: bool,
                 storage_options: dict[str, Any] | None) -> None:
        self.client, self.chain, self.subjects = client, chain, subjects
        self.store, self.log, self.layout, self.run_id = store, log, layout, run_id
        self.retries, self.storage_options = retries, storage_options
        self.values, self.key_values = prep.values, prep.key_values
        self.libraries = prep.libraries
        self.gpu = gpu_resources(client)
        self.tag = hashlib.sha256(f"{store.fs.protocol}:{store.root}".encode()).hexdigest()[:8]
        self.units: dict[UnitId, Unit] = {}
        self.by_task: dict[str, Unit] = {}
        self.running: Counter[str] = Counter()
        self.failures: list[records.FailureRecord] = []
        # results are fetched asynchronously; the loop must be this client's, not the
        # process's default client's (another client's loop never sees these futures)
        self.ac = as_completed(loop=client.loop, with_results=True, raise_errors=False)
        self.blocked = False
        self.to_publish: list[Unit] = []
        self.to_retract: list[Unit] = []
        self.published_tables: set[str] = set()
        # what each published table holds (read once; kept current by this run's commits)
        self.indexes = prep.indexes
        self.timings: dict[str, float] = {}
        self.last_flush = time.monotonic()
        self.bar = progress_bar(0, "stages", "task", enabled=progress)

    # -- planning ---------------------------------------------------------------------
    def plan(self) -> None:
        """Plans every unit whose inputs are known, in chain order."""
        self.blocked = False
        for st in self.chain:
            if st.scope == "dataset":
                if (st.name, None) not in self.units:
                    self._plan_dataset(st)
                continue
            for subject in self.subjects:
                if (st.name, subject) not in self.units:
                    self._plan_subject(st, subject)

    def _upstream(self, name: str, subject: str | None) -> Unit | None:
        scope = self.chain[name].scope
        return self.units.get((name, subject if scope == "subject" else None))

    def _plan_subject(self, st: Stage, subject: str) -> None:
        refs: list[Any] = []
        ikeys: dict[str, Any] = {}
        deps: list[Future] = []
        for inp in st.inputs:
            if inp == CAPTURE:
                path, fp = self.subjects[subject]
                refs.append(InputRef("capture", path))
                ikeys[inp] = fp
                continue
            up = self._upstream(inp, subject)
            if up is None:
                self.blocked = True
                return
            if up.state in ("failed", "skipped"):
                self._skip(Unit(st, subject), f"input {inp} {up.state}")
                return
            refs.append(InputRef("artifact", up.key or "", inp))
            ikeys[inp] = up.key
            if up.future is not None:
                deps.append(up.future)
        self._launch(Unit(st, subject), refs, ikeys, deps)

    def _plan_dataset(self, st: Stage) -> None:
        ok_subjects = list(self.subjects)
        for inp in st.inputs:
            if inp == CAPTURE:
                continue
            ups = ([self._upstream(inp, None)] if self.chain[inp].scope == "dataset"
                   else [self._upstream(inp, s) for s in self.subjects])
            if any(u is None or u.state in ("planned", "submitted") for u in ups):
                self.blocked = True  # barrier: wait until every upstream unit resolved
                return
            if self.chain[inp].scope == "dataset":
                if ups[0] is not None and ups[0].state in ("failed", "skipped"):
                    self._skip(Unit(st, None), f"input {inp} {ups[0].state}")
                    return
            else:
                ok_subjects = [s for s, u in zip(self.subjects, ups, strict=True)
                               if s in ok_subjects and u is not None
                               and u.state in ("done", "cached")]
        if not ok_subjects:
            self._skip(Unit(st, None), "no subject has all inputs")
            return
        refs: list[Any] = []
        ikeys: dict[str, Any] = {}
        for inp in st.inputs:
            if inp == CAPTURE:
                refs.append(tuple((s, InputRef("capture", self.subjects[s][0]))
                                  for s in ok_subjects))
                ikeys[inp] = {s: self.subjects[s][1] for s in ok_subjects}
            elif self.chain[inp].scope == "dataset":
                up = self.units[(inp, None)]
                refs.append(InputRef("artifact", up.key or "", inp))
                ikeys[inp] = up.key
            else:
                keys = {s: self.units[(inp, s)].key or "" for s in ok_subjects}
                refs.append(tuple((s, InputRef("artifact", k, inp)) for s, k in keys.items()))
                ikeys[inp] = keys
        self._launch(Unit(st, None), refs, ikeys, [])

    def _launch(self, unit: Unit, refs: list[Any], ikeys: dict[str, Any],
                deps: list[Future]) -> None:
        st = unit.stage
        unit.key = content_key(st, self.key_values[st.name], ikeys, unit.subject,
                               self.libraries)
        self.units[(st.name, unit.subject)] = unit
        if self.store.is_committed(st.name, unit.key):
            unit.state = "cached"
            self._publish(unit)
            return
        spec = UnitSpec(stage=st, subject=unit.subject, key=unit.key, inputs=tuple(refs),
                        config=self.values[st.name], input_keys=ikeys, run_id=self.run_id)
        resources = self.gpu if st.resources == "gpu" else None
        unit.future = self.client.submit(execute_unit, spec, self.store, self.log, *deps,
                                         key=spec.task_key(self.tag), retries=self.retries,
                                         resources=resources, pure=False)
        unit.state = "submitted"
        self.by_task[unit.future.key] = unit
        self.running[st.name] += 1
        self.ac.add(unit.future)
        self.bar.total += 1
        self.bar.refresh()

    def _skip(self, unit: Unit, reason: str) -> None:
        unit.state, unit.reason = "skipped", reason
        self.units[(unit.stage.name, unit.subject)] = unit
        self.log.append("skip", run_id=self.run_id, key=unit.key, stage=unit.stage.name,
                        subject=unit.subject, reason=reason)
        self.retract(unit)

    # -- completion -------------------------------------------------------------------
    def _complete(self, fut: Future, result: Any) -> None:
        unit = self.by_task.pop(fut.key)
        unit.future = None
        self.running[unit.stage.name] -= 1
        if fut.status == "finished" and result.failure is not None:
            self._fail(unit, result.failure)
        elif fut.status == "finished":
            unit.state = "done" if result.executed else "cached"
            self._publish(unit)
        else:
            exc = (result[1] if isinstance(result, tuple)  # (type, exception, traceback)
                   else result if isinstance(result, BaseException)
                   else RuntimeError(f"task ended in state {fut.status}"))
            mine = (exc.key == unit.key if isinstance(exc, StageFailure)
                    else getattr(exc, "task", fut.key) == fut.key)
            if mine:
                self._fail(unit, exc)
            else:
                src = exc.stage if isinstance(exc, StageFailure) else "upstream"
                self._skip(unit, f"input {src} failed")
        fut.release()
        self.bar.update(1)

    def _fail(self, unit: Unit, exc: BaseException, *, retract: bool = True) -> None:
        unit.state = "failed"
        unit.reason = (f"{exc.error_type}: {exc.message}" if isinstance(exc, StageFailure)
                       else f"{type(exc).__name__}: {exc}")
        attempt = exc.attempt if isinstance(exc, StageFailure) else self.retries + 1
        self.record_failures([records.failure_from(exc, unit.stage, unit.subject,
                                                   unit.key or "", self.run_id, attempt)])
        if retract:
            self.retract(unit)

    def record_failures(self, failures: list[records.FailureRecord]) -> None:
        """Appends failure rows to the failures table now, so a driver crash loses none."""
        self.failures.extend(failures)
        try:
            records.write_failures(self.layout, failures, self.storage_options)
        except Exception as exc:  # noqa: BLE001 - run.json still lists them at the end
            self.log.append("failure-record-failed", run_id=self.run_id, message=str(exc))

    def _publish(self, unit: Unit) -> None:
        """Queues a committed unit's rows unless its table already holds its key."""
        pub = unit.stage.publish
        if pub is None or unit.key is None:
            return
        if unit.state == "cached" and unit.key in self.indexes[pub.table].keys:
            return
        self.to_publish.append(unit)
        self._maybe_flush()

    def retract(self, unit: Unit) -> None:
        """Queues the deletion of rows a now failed or skipped unit published earlier."""
        pub = unit.stage.publish
        if pub is not None and self.indexes[pub.table].holds(unit.stage.name, unit.subject):
            self.to_retract.append(unit)
            self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self.to_publish) + len(self.to_retract) >= PUBLISH_BATCH or \
                time.monotonic() - self.last_flush > PUBLISH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Publishes queued rows and retractions: one Delta commit per table and group."""
        by_table: dict[str, list[Unit]] = {}
        for u in self.to_publish:
            assert u.stage.publish is not None
            by_table.setdefault(u.stage.publish.table, []).append(u)
        retract: dict[tuple[str, str], list[Unit]] = {}
        for u in self.to_retract:
            assert u.stage.publish is not None
            retract.setdefault((u.stage.publish.table, u.stage.name), []).append(u)
        self.to_publish, self.to_retract, self.last_flush = [], [], time.monotonic()
        self.published_tables.update(by_table)
        self.published_tables.update(table for table, _ in retract)
        for table, units in by_table.items():
            uri, index = self.layout.table(table), self.indexes[table]
            try:
                records.publish_rows(self.store, [(u.stage, u.subject, u.key or "")
                                                  for u in units], uri, self.storage_options,
                                     index)
            except Exception:  # isolate the bad unit; a bad table must not stop the run
                for u in units:
                    try:
                        records.publish_rows(self.store, [(u.stage, u.subject, u.key or "")],
                                             uri, self.storage_options, index)
                    except Exception as exc:
                        self._fail(u, exc, retract=False)
        for (table, _), units in retract.items():
            try:
                records.retract_rows(units[0].stage, [u.subject for u in units],
                                     self.layout.table(table), self.storage_options,
                                     self.indexes[table])
            except Exception as exc:  # noqa: BLE001 - the failure rows say what failed
                self.log.append("retract-failed", run_id=self.run_id, table=table,
                                message=str(exc))

    def loop(self) -> None:
        """Runs until every unit is resolved."""
        t0 = time.perf_counter()
        self.plan()
        self.timings["plan"] = time.perf_counter() - t0
        self.write_plan()
        while True:
            for fut, result in self.ac:
                name = self.by_task[fut.key].stage.name
                self._complete(fut, result)
                if self.blocked and self.running[name] == 0:
                    self.plan()
                    self.write_plan()
            self.flush()  # publish what is queued before re-planning or finishing
            if not self.blocked:
                break
            self.plan()
            if self.ac.is_empty() and self.blocked:
                raise RuntimeError("planner deadlock: blocked units with nothing running")
        self.bar.close()
        self.compact_published()
        self.timings["execute"] = time.perf_counter() - t0

    def compact_published(self) -> None:
        """Compacts each table this run published to: one commit per subject otherwise
        leaves thousands of small files whose opening dominates every read
        (docs/storage.md). Rows and history are unchanged; a failure only costs speed."""
        for table in sorted(self.published_tables):
            try:
                delta.optimize(self.layout.table(table), storage_options=self.storage_options)
            except Exception as exc:  # noqa: BLE001 - compaction is an optimisation
                self.log.append("compact-failed", run_id=self.run_id, table=table, message=str(exc))

    def write_plan(self) -> None:
        """Writes the planned units with their keys and states (``plan.json``)."""
        write_json(f"{self.layout.run_dir(self.run_id)}/plan.json", [
            {"stage": u.stage.name, "subject": u.subject, "key": u.key, "state": u.state,
             "reason": u.reason} for u in self.units.values()], self.storage_options)


def run_chain(captures: list[Path] | list[str], out: str | Path, config: Any, *,
              chain: Chain, workers: int | None = None,
              scheduler_address: str | None = None, progress: bool = True,
              retries: int = 1, processes: bool = True, run_id: str | None = None,
              storage_options: dict[str, Any] | None = None, tables_uri: str | None = None,
              report: bool = True, fingerprint: Literal["stat", "content"] = "stat",
              client: Client | None = None) -> RunSummary:
    """Runs the chain over the captures; resumes from whatever storage already holds.

    Args:
        captures: capture folders, one per subject.
        out: output root (folder or fsspec URL); layout in docs/orchestration.md.
        config: the run config (dataclass / mapping); stages read their declared fields.
        chain: the stages (the product's is :func:`workflows.chain.default_chain`).
        workers: embedded LocalCluster worker count (default: CPUs, memory-capped, at most one
            per capture).
        scheduler_address: use this existing Dask scheduler instead.
        progress: report progress: a bar on a terminal, else a log line every 10 s.
        retries: extra attempts per unit before it becomes a failure record.
        processes: embedded workers as processes (default) or threads.
        run_id: explicit run id (default: time + random suffix).
        storage_options: fsspec options for ``out``.
        tables_uri: Delta tables root (default ``<out>/tables``).
        report: save a Dask performance report in the run folder.
        fingerprint: capture fingerprint mode (``stat`` or ``content``).
        client: an already connected client (overrides ``workers``/``scheduler_address``).

    Returns:
        The run summary; failed subjects are in ``summary.failures``, never raised.

    Raises:
        ConfigError: for an empty chain, a bad or missing config field, a file the config
            names that does not exist, or workers whose library versions differ.
        StorageError: for a published table written without provenance columns.
    """
    if not len(chain):
        raise ConfigError("the chain has no stages")
    layout = OutputLayout(str(out), tables_uri)
    run_id = run_id or records.new_run_id()
    prep = _prepare(chain, config, layout, storage_options)  # fail fast, before any record
    store = ArtifactStore(layout.artifacts, storage_options)
    run_dir = layout.run_dir(run_id)
    log = StageLog(run_dir, storage_options)
    started = time.time()
    paths = [str(Path(c).resolve()) for c in captures]
    record = records.run_record(run_id, started, layout, chain, config, retries)
    record["libraries"] = prep.libraries
    write_json(f"{run_dir}/run.json", record, storage_options)

    def _execute(cl: Client) -> _Run:
        _check_worker_libraries(cl, prep.libraries)
        t0 = time.perf_counter()
        subjects, bad = fingerprint_captures(cl, paths, fingerprint)
        t_fp = time.perf_counter() - t0
        record["subjects"] = {s: p for s, (p, _) in subjects.items()}
        # Captures refused before any stage (unsafe or duplicate ids, unusable folders) are
        # recorded now, so that `pgt status` counts them even if the run dies later.
        record["capture_failures"] = [
            {"subject": name, "error_type": type(err).__name__, "message": str(err)[:4000]}
            for name, err in bad]
        write_json(f"{run_dir}/run.json", record, storage_options)
        run = _Run(cl, chain, prep, subjects, store, log, layout, run_id, retries,
                   progress, storage_options)
        run.record_failures([records.failure_from(err, None, name, "", run_id, 1,
                                                  stage_name=CAPTURE) for name, err in bad])
        for name, _ in bad:  # an unreadable capture's earlier rows are not current either
            for st in chain:
                if st.scope == "subject":
                    run.retract(Unit(st, name, state="failed"))
        run.timings["fingerprint"] = t_fp
        run.loop()
        return run

    def _with_report(cl: Client) -> _Run:
        if not report:
            return _execute(cl)
        report_options = fsspec_options(run_dir, storage_options)
        with cl.as_current(), performance_report(filename=f"{run_dir}/dask-report.html",
                                                 storage_options=report_options):
            return _execute(cl)

    try:
        if client is not None:
            run = _with_report(client)
        else:
            # no more embedded workers than captures: a lone subject's stages then get
            # every core (pipeline/cluster.py: each worker's share)
            n = workers if workers is not None else min(default_n_workers(), max(1, len(paths)))
            with open_client(workers=n, scheduler_address=scheduler_address, processes=processes) as cl:
                run = _with_report(cl)
        run.write_plan()
        counts = Counter(u.state for u in run.units.values())
        counts["failed"] += sum(1 for f in run.failures if f.stage == CAPTURE)
        summary = RunSummary(
            run_id=run_id, out=str(out), started=started, finished=time.time(),
            counts={k: counts.get(k, 0) for k in ("done", "cached", "failed", "skipped")},
            failures=tuple(run.failures),
            keys={uid: u.key for uid, u in run.units.items() if u.key},
            states={uid: u.state for uid, u in run.units.items()}, run_dir=run_dir,
            timings=run.timings)
        records.finish_run(record, summary, layout, storage_options)
    except BaseException as exc:  # never leave the run "running" for ever in `pgt status`
        record.update(status="failed", finished=time.time(),
                      error=f"{type(exc).__name__}: {exc}"[:4000])
        with contextlib.suppress(Exception):  # the original error matters more
            write_json(f"{run_dir}/run.json", record, storage_options)
        raise
    summary.timings["total"] = time.time() - started  # records included
    return summary
