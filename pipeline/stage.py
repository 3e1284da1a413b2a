"""The stage contract: what a chain step declares, and how its content key is derived.

A stage is a pure function from typed inputs plus the config fields it declares to a
typed output. Everything that can change its output is part of its declaration, so the
content key (:func:`content_key`) identifies an output without running the stage:

* ``name`` and ``version`` (bump the version whenever the code's output changes);
* the values of the declared ``config_fields`` (dotted paths into the run config); a
  field declared with :func:`pipeline.config.path_field` enters by the fingerprint of
  the file or folder it names, not by its path (:func:`key_config`);
* the installed versions of the declared ``library_versions`` (e.g. ``"mediapipe"``);
* the keys of its inputs (other stages' artifacts, or the capture's fingerprint).

Calling convention, used by the executor (``pipeline.tasks``):

``fn(*inputs, config=StageConfig)`` with one positional argument per declared input, in
declaration order. ``config`` is passed only when the stage declares config fields.

* input ``"capture"``: the capture folder's path (``str``);
* input ``"<stage>"``: that stage's loaded artifact (see ``pipeline.serialize``);
* a ``scope="dataset"`` stage receives each subject-scoped input as
  ``dict[subject_id, value]`` over the subjects whose inputs all succeeded.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Literal

import numpy as np

from pipeline.config import fingerprint_path, path_kind
from pipeline.errors import ConfigError

#: The reserved input name of a stage that reads the subject's capture folder.
CAPTURE = "capture"

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True)
class Publish:
    """Declares that a stage's rows are published to a Delta table after commit.

    The stage's artifact holds the rows (a ``pa.Table``, or ``StageOutput.tables[rows]``).
    The driver publishes them with three provenance columns (``_stage``,
    ``_stage_version``, ``_artifact_key``) whenever the table does not hold the planned
    key (a fresh output, a cached one after another config ran, a new or deleted
    table): the rows matching the predicate built from ``predicate_columns`` are
    replaced by the new ones in one Delta commit, batched over subjects. A unit that
    fails or is skipped has its earlier rows deleted. A crash anywhere therefore leaves
    the table equal to an uninterrupted run's (``pipeline.records``).

    Attributes:
        table: table name, stored at ``<tables>/<table>``.
        rows: name of the table inside a ``StageOutput`` (ignored for a bare ``pa.Table``).
        predicate_columns: columns whose (single) value in the rows identifies the slice
            this artifact owns, e.g. ``("subject_id",)`` or ``("subject_id", "label_round")``.
        partition_by: Delta partition columns used when the table is created.
    """

    table: str
    rows: str = "rows"
    predicate_columns: tuple[str, ...] = ("subject_id",)
    partition_by: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Stage:
    """One chain step.

    Attributes:
        name: unique lower-case identifier; also the artifact folder name.
        version: code version; bump it when the output for the same inputs changes.
        fn: the pure function (module-level, so workers import it by reference).
        inputs: ``"capture"`` and/or names of earlier stages, in call order.
        config_fields: dotted paths into the run config that ``fn`` reads; only these
            enter the content key, so an undeclared read is a caching bug.
        resources: ``"gpu"`` stages get ``resources={"GPU": 1}`` when workers offer it.
        scope: ``"subject"`` runs once per subject; ``"dataset"`` is a cross-subject
            barrier that runs once with every subject's inputs.
        outputs: names the output must contain (arrays, tables or meta keys of a
            ``StageOutput``); empty means "not checked".
        publish: optional Delta table the output rows are published to.
        description: one line for status reports and docs.
        library_versions: distribution names (``importlib.metadata``) whose installed
            versions change the output, e.g. ``("mediapipe",)``; they enter the key.
        resumable: ``fn`` takes a ``checkpoint`` keyword (a
            :class:`pipeline.artifacts.Checkpoint` of this unit's key) to save progress
            to and resume from after a kill; it is removed once the output commits.
    """

    name: str
    version: str
    fn: Callable[..., Any]
    inputs: tuple[str, ...] = (CAPTURE,)
    config_fields: tuple[str, ...] = ()
    resources: Literal["cpu", "gpu"] = "cpu"
    scope: Literal["subject", "dataset"] = "subject"
    outputs: tuple[str, ...] = ()
    publish: Publish | None = None
    description: str = ""
    library_versions: tuple[str, ...] = ()
    resumable: bool = False

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name) or self.name == CAPTURE:
            raise ConfigError(f"stage name {self.name!r} must match {_NAME_RE.pattern}")
        if not self.version or not isinstance(self.version, str):
            raise ConfigError(f"stage {self.name}: version must be a non-empty string")
        if not callable(self.fn):
            raise ConfigError(f"stage {self.name}: fn is not callable")
        for attr in ("inputs", "config_fields", "outputs", "library_versions"):
            if not isinstance(getattr(self, attr), tuple):
                raise ConfigError(f"stage {self.name}: {attr} must be a tuple")
        if len(set(self.inputs)) != len(self.inputs):
            raise ConfigError(f"stage {self.name}: duplicate inputs {self.inputs}")
        for f in self.config_fields:
            if not _FIELD_RE.fullmatch(f):
                raise ConfigError(f"stage {self.name}: bad config field {f!r}")
        if self.resources not in ("cpu", "gpu"):
            raise ConfigError(f"stage {self.name}: resources must be 'cpu' or 'gpu'")
        if self.scope not in ("subject", "dataset"):
            raise ConfigError(f"stage {self.name}: scope must be 'subject' or 'dataset'")

    @property
    def signature(self) -> str:
        """``name@version``, as shown in run records."""
        return f"{self.name}@{self.version}"


class StageConfig(Mapping[str, Any]):
    """Read-only view of the declared config fields, keyed by their dotted path.

    Reading an undeclared field raises ``KeyError``: that is what keeps cache keys honest.
    """

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getitem__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise KeyError(
                f"config field {name!r} is not declared by this stage "
                f"(declared: {sorted(self._values)})"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"StageConfig({self._values!r})"


def get_config_value(config: Any, dotted: str) -> Any:
    """Resolves ``"a.b.c"`` through nested dataclasses, objects and mappings.

    Raises:
        ConfigError: when a path component does not exist.
    """
    value = config
    for part in dotted.split("."):
        if isinstance(value, Mapping):
            if part not in value:
                raise ConfigError(f"config has no field {dotted!r} (missing {part!r})")
            value = value[part]
        elif hasattr(value, part):
            value = getattr(value, part)
        else:
            raise ConfigError(f"config has no field {dotted!r} (missing {part!r})")
    return value


def config_values(stage: Stage, config: Any) -> dict[str, Any]:
    """The declared fields' values of ``config``, in declaration order."""
    return {f: get_config_value(config, f) for f in stage.config_fields}


def _field_of(config: Any, dotted: str) -> dataclasses.Field | None:
    """The dataclass field a dotted path ends at (``None`` inside mappings)."""
    *parents, name = dotted.split(".")
    owner = get_config_value(config, ".".join(parents)) if parents else config
    if dataclasses.is_dataclass(owner) and not isinstance(owner, type):
        return next((f for f in dataclasses.fields(owner) if f.name == name), None)
    return None


def _keyable(value: Any, f: dataclasses.Field | None, where: str) -> Any:
    kind = path_kind(f) if f is not None else None
    if kind and value:
        try:
            return {kind: fingerprint_path(value, kind)}
        except ConfigError as exc:
            raise ConfigError(f"config field {where}: {exc}") from None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a whole section
        return {g.name: _keyable(getattr(value, g.name), g, f"{where}.{g.name}")
                for g in dataclasses.fields(value)}
    return to_jsonable(value)


def key_config(stage: Stage, config: Any) -> dict[str, Any]:
    """The declared fields as they enter the content key: JSON values, with every
    :func:`~pipeline.config.path_field` replaced by its content fingerprint.

    Raises:
        ConfigError: for a missing field, or a named file or folder that does not exist.
    """
    return {f: _keyable(get_config_value(config, f), _field_of(config, f), f)
            for f in stage.config_fields}


def library_versions(names: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Installed version of each distribution (``"not installed"`` when absent)."""
    import importlib.metadata

    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def to_jsonable(value: Any) -> Any:
    """Converts a config value to plain JSON types, deterministically.

    Dataclasses become dicts of their fields (class names are left out so that moving a
    class does not invalidate caches), tuples become lists, paths strings, enums their
    value, sets sorted lists; non-finite floats become strings.

    Raises:
        ConfigError: for a value with no stable JSON form.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, np.ndarray):
        return {"dtype": str(value.dtype), "shape": list(value.shape),
                "data": to_jsonable(value.tolist())}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((to_jsonable(v) for v in value), key=canonical_json)
    raise ConfigError(f"config value of type {type(value).__name__} has no canonical JSON form")


def canonical_json(value: Any) -> str:
    """Canonical JSON text: sorted keys, no whitespace, ASCII only."""
    return json.dumps(to_jsonable(value), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=False)


def content_key(stage: Stage, values: Mapping[str, Any], input_keys: Mapping[str, Any],
                subject: str | None, libraries: Mapping[str, str] | None = None) -> str:
    """The artifact key of one stage execution: sha256 hex of its canonical description.

    Args:
        stage: the stage.
        values: declared config field -> value as it enters the key (see
            :func:`key_config`: files named by the config by their fingerprint).
        input_keys: input name -> upstream key (a capture fingerprint or artifact key),
            or for a dataset stage ``{subject: key}``.
        subject: the subject id for subject-scoped stages, ``None`` for dataset stages.
        libraries: version of each of ``stage.library_versions`` (see
            :func:`library_versions`).
    """
    payload = {
        "stage": stage.name,
        "version": stage.version,
        "scope": stage.scope,
        "subject": subject,
        "config": {f: values[f] for f in stage.config_fields},
        "inputs": dict(input_keys),
    }
    if stage.library_versions:
        libraries = libraries or {}
        missing = [n for n in stage.library_versions if n not in libraries]
        if missing:
            raise ConfigError(f"stage {stage.name}: no version given for {missing}")
        payload["libraries"] = {n: libraries[n] for n in stage.library_versions}
    return hashlib.sha256(canonical_json(payload).encode("ascii")).hexdigest()


@dataclass(frozen=True)
class Chain:
    """An ordered, validated list of stages (a DAG given in topological order).

    Attributes:
        stages: the stages; each input names ``"capture"`` or an earlier stage.
    """

    stages: tuple[Stage, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        seen: dict[str, Stage] = {}
        for st in self.stages:
            if st.name in seen:
                raise ConfigError(f"duplicate stage name {st.name!r}")
            for inp in st.inputs:
                if inp != CAPTURE and inp not in seen:
                    raise ConfigError(
                        f"stage {st.name!r} reads {inp!r}, which is not an earlier stage")
            if st.publish is not None and st.scope == "dataset" and \
                    st.publish.predicate_columns == ("subject_id",):
                raise ConfigError(
                    f"dataset stage {st.name!r} must publish with its own predicate_columns")
            seen[st.name] = st

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def __contains__(self, name: object) -> bool:
        return any(st.name == name for st in self.stages)

    def __getitem__(self, name: str) -> Stage:
        for st in self.stages:
            if st.name == name:
                return st
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        """Stage names in chain order."""
        return tuple(st.name for st in self.stages)

    def with_stage(self, stage: Stage) -> Chain:
        """A new chain with ``stage`` appended."""
        return Chain((*self.stages, stage))

    def dependents(self, name: str) -> tuple[str, ...]:
        """Names of the stages that (transitively) read ``name``'s output."""
        out: list[str] = []
        frontier = {name}
        for st in self.stages:
            if frontier.intersection(st.inputs):
                out.append(st.name)
                frontier.add(st.name)
        return tuple(out)
