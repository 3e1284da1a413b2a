"""Worker side: execute one stage for one subject (or the dataset) and commit its artifact.

Tasks exchange only small :class:`UnitResult` records through Dask; every input is read
back from the artifact store. That keeps scheduler memory flat, and makes a fresh
execution and a cache hit look the same to the downstream stage.
"""

from __future__ import annotations

import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.artifacts import ArtifactStore
from pipeline.errors import CaptureError, ConfigError, ModelError, StageError
from pipeline.runlog import StageLog
from pipeline.serialize import output_names
from pipeline.stage import Stage, StageConfig, to_jsonable


@dataclass(frozen=True)
class InputRef:
    """Where one input value comes from.

    Attributes:
        kind: ``"capture"`` (value = capture path) or ``"artifact"`` (value = key).
        value: the capture path or the artifact key.
        stage: the producing stage, for artifacts.
    """

    kind: Literal["capture", "artifact"]
    value: str
    stage: str | None = None


#: A subject-scope input, or for a dataset stage ``((subject, ref), ...)``.
InputSpec = InputRef | tuple[tuple[str, InputRef], ...]


@dataclass(frozen=True)
class UnitSpec:
    """Everything a worker needs to run one unit (stage x subject).

    Attributes:
        stage: the stage.
        subject: subject id, or ``None`` for a dataset stage.
        key: content key of the output.
        inputs: one entry per declared input, in order.
        config: declared config field -> value.
        input_keys: input name -> key(s), recorded in the marker for provenance.
        run_id: the run.
    """

    stage: Stage
    subject: str | None
    key: str
    inputs: tuple[InputSpec, ...]
    config: dict[str, Any] = field(default_factory=dict)
    input_keys: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""

    def task_key(self, out_tag: str) -> str:
        """Deterministic Dask key ``<stage>-<subject>-<key[:12]>-<out_tag>``.

        ``out_tag`` names the artifact store, so two runs writing to different outputs
        through one shared scheduler never share a task (and a result) by accident.
        """
        return f"{self.stage.name}-{self.subject or '_dataset'}-{self.key[:12]}-{out_tag}"


@dataclass(frozen=True)
class UnitResult:
    """What a finished task reports.

    Attributes:
        stage: stage name.
        subject: subject id or ``None``.
        key: artifact key.
        executed: False when the artifact was already committed (duplicate or race).
        attempt: attempt number within the run (0 when not executed).
        seconds: wall time of the stage function and commit.
        failure: set when the stage failed on bad input (:data:`NOT_RETRYABLE`): returned
            rather than raised so that Dask does not retry what would fail the same way.
    """

    stage: str
    subject: str | None
    key: str
    executed: bool
    attempt: int = 0
    seconds: float = 0.0
    failure: StageFailure | None = None


#: Errors of bad input (a broken capture, config or model file): the same input fails the
#: same way, so a retry would only repeat the work (deep validation of a long capture).
NOT_RETRYABLE = (CaptureError, ConfigError, ModelError)


class StageFailure(StageError):
    """A unit's stage raised; carries the original error as text so any client can read it.

    Attributes:
        stage, subject, key: the unit.
        error_type: the original exception's class name.
        message: its message.
        attempt: attempt number within the run.
        trace: the formatted traceback.
    """

    def __init__(self, stage: str, subject: str | None, key: str, error_type: str,
                 message: str, attempt: int, trace: str = "") -> None:
        self.stage, self.subject, self.key = stage, subject, key
        self.error_type, self.message, self.attempt, self.trace = (
            error_type, message, attempt, trace)
        super().__init__(f"stage {stage} failed for {subject or 'dataset'} "
                         f"(attempt {attempt}): {error_type}: {message}")

    def __reduce__(self):  # keeps every field through pickling (Dask workers)
        return (type(self), (self.stage, self.subject, self.key, self.error_type,
                             self.message, self.attempt, self.trace))


def _resolve(ref: InputRef, store: ArtifactStore) -> Any:
    if ref.kind == "capture":
        return ref.value
    assert ref.stage is not None
    return store.load(ref.stage, ref.value)


def _load_inputs(spec: UnitSpec, store: ArtifactStore) -> list[Any]:
    args: list[Any] = []
    for inp in spec.inputs:
        if isinstance(inp, InputRef):
            args.append(_resolve(inp, store))
        else:  # dataset stage: one value per participating subject
            args.append({subject: _resolve(ref, store) for subject, ref in inp})
    return args


def execute_unit(spec: UnitSpec, store: ArtifactStore, log: StageLog,
                 *upstream: UnitResult) -> UnitResult:
    """Runs one unit unless its artifact is committed; commits the output.

    ``upstream`` only orders the task after its dependencies in the Dask graph.

    Raises:
        StageFailure: when the stage function, an input load or the commit fails.
    """
    for up in upstream:  # an upstream input failure: this unit is skipped, not failed
        if up.failure is not None:
            raise up.failure
    st = spec.stage
    if store.is_committed(st.name, spec.key):  # a duplicate or a race: never run twice
        return UnitResult(st.name, spec.subject, spec.key, executed=False)
    attempt = store.begin_attempt(st.name, spec.key, spec.run_id)
    ident = {"run_id": spec.run_id, "key": spec.key, "stage": st.name,
             "subject": spec.subject, "attempt": attempt}
    log.append("start", **ident)
    t0 = time.perf_counter()
    try:
        args = _load_inputs(spec, store)
        kwargs: dict[str, Any] = {"config": StageConfig(spec.config)} if st.config_fields else {}
        if st.resumable:
            kwargs["checkpoint"] = store.checkpoint(st.name, spec.key)
        value = st.fn(*args, **kwargs)
        missing = set(st.outputs) - output_names(value)
        if missing:
            raise StageError(f"stage {st.name} output lacks declared outputs {sorted(missing)}")
        writer = uuid.uuid4().hex
        marker = store.commit(st.name, spec.key, value, {
            "version": st.version, "subject": spec.subject, "run_id": spec.run_id,
            "attempt": attempt, "config": to_jsonable(spec.config), "inputs": spec.input_keys,
            "writer": writer})
    except Exception as exc:
        trace = traceback.format_exc()
        log.append("fail", error_type=type(exc).__name__, message=str(exc), **ident)
        failure = StageFailure(st.name, spec.subject, spec.key, type(exc).__name__, str(exc),
                               attempt, trace)
        if isinstance(exc, NOT_RETRYABLE):
            return UnitResult(st.name, spec.subject, spec.key, executed=False,
                              attempt=attempt, failure=failure)
        raise failure from None
    seconds = time.perf_counter() - t0
    if st.resumable:
        store.checkpoint(st.name, spec.key).clear()
    # committed=False: a concurrent duplicate committed first and this output was discarded
    log.append("finish", seconds=seconds, committed=marker.get("writer") == writer, **ident)
    return UnitResult(st.name, spec.subject, spec.key, executed=True, attempt=attempt,
                      seconds=seconds)
