"""Generic helpers over typed run configs (frozen dataclasses, one section per stage).

The engine knows no product config: each stage's section sits beside the stage
(``stages/<name>.py``) and the product gathers them in ``workflows.config.RunConfig``.
Stages declare the dotted fields they read (e.g. ``"landmarks.detector"``); only those
enter their cache keys. ``pgt`` exposes every field as ``--set section.field=VALUE``.

Conventions a config section follows (see docs/orchestration.md):

* ``Literal[...]`` for a choice among names, checked by :func:`check_fields`, which a
  section's ``__post_init__`` calls before its own value checks;
* :func:`path_field` for a field that names a file or folder: such a field enters the
  content key by the fingerprint of its contents (:func:`fingerprint_path`), so replacing
  the weights at the same path reruns the stage and moving them does not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from pipeline.errors import ConfigError

#: Field metadata key marking a field that names a file or folder.
PATH_META = "pgt.path"

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def path_field(default: str = "", *, kind: Literal["file", "folder"] = "file") -> Any:
    """A ``str`` dataclass field naming a local file or folder ("" = not set).

    Its content, not its path string, enters the content key of a stage reading it.
    """
    return dataclasses.field(default=default, metadata={PATH_META: kind})


def path_kind(f: dataclasses.Field) -> str | None:
    """``"file"`` or ``"folder"`` for a :func:`path_field`, else ``None``."""
    return f.metadata.get(PATH_META)


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # unresolvable annotations: fall back to no checks
        return {}


def choices(cls: type, name: str) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` field of ``cls``, else ``None``."""
    hint = _hints(cls).get(name)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def check_fields(obj: Any) -> None:
    """Checks a config section's fields against their annotations.

    ``Literal`` fields must hold one of their values; ``bool``, ``int``, ``float`` and
    ``str`` fields a value of that type (an ``int`` passes as a ``float``); floats must be
    finite. Call it first thing in a section's ``__post_init__``.

    Raises:
        ConfigError: naming the class, the field and, for a choice, the allowed values.
    """
    cls = type(obj)
    hints = _hints(cls)
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints.get(f.name)
        where = f"{cls.__name__}.{f.name}"
        if typing.get_origin(hint) is Literal:
            allowed = typing.get_args(hint)
            if value not in allowed:
                raise ConfigError(f"{where}: {value!r} is not one of "
                                  f"{', '.join(map(str, allowed))}")
        elif hint is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}: {value!r} is not a bool")
        elif hint is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}: {value!r} is not an int")
        elif hint is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{where}: {value!r} is not a number")
            if not math.isfinite(value):
                raise ConfigError(f"{where}: {value!r} is not finite")
        elif hint is str and not isinstance(value, str):
            raise ConfigError(f"{where}: {value!r} is not a string")


def validate_config(config: Any, prefix: str = "") -> None:
    """Checks every dataclass section of ``config`` before a run: :func:`check_fields`
    (sections check themselves when built; this covers configs without a
    ``__post_init__``), and that each set :func:`path_field` names an existing file or
    folder. Mappings are left alone.

    Raises:
        ConfigError: naming the dotted field.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return
    check_fields(config)
    for f in dataclasses.fields(config):
        value, dotted = getattr(config, f.name), f"{prefix}{f.name}"
        kind = path_kind(f)
        if kind and value and not (Path(value).expanduser().is_file() if kind == "file"
                                   else Path(value).expanduser().is_dir()):
            raise ConfigError(f"config option {dotted}: {value}: no such {kind}")
        validate_config(value, f"{dotted}.")


def config_options(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Flattened ``section.field`` -> dataclass field of the config class ``cls``, for the CLI."""
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):  # a section: recurse into its fields
            out.update(config_options(type(default), f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f
    return out


def with_overrides(config: Any, overrides: dict[str, str]) -> Any:
    """A copy of ``config`` with ``{"section.field": "text"}`` values parsed to field types.

    All overrides of one section are applied together, so the section's checks see the
    final combination (``detector=face_alignment`` with its ``weights``), whatever order
    they were given in.

    Raises:
        ConfigError: for an unknown option, a value of the wrong type, a value outside a
            ``Literal``'s choices (the message lists them) or a failed section check.
    """
    tree: dict[str, Any] = {}
    for dotted, text in overrides.items():
        node = tree
        *sections, name = dotted.split(".")
        for s in sections:
            node = node.setdefault(s, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config option {dotted!r}: {s!r} is not a section")
        node[name] = text
    return _apply(config, tree, "")


def _apply(obj: Any, tree: dict[str, Any], prefix: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"config option {prefix.rstrip('.')!r} is not a section")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    for name, sub in tree.items():
        dotted = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"unknown config option {dotted!r}")
        current = getattr(obj, name)
        if isinstance(sub, dict):
            changes[name] = _apply(current, sub, f"{dotted}.")
        elif dataclasses.is_dataclass(current):
            raise ConfigError(f"config option {dotted!r} is a section: set one of its fields")
        else:
            changes[name] = _parse(type(obj), name, current, sub, dotted)
    try:
        return dataclasses.replace(obj, **changes)
    except ConfigError as exc:
        raise ConfigError(f"config section {prefix.rstrip('.') or 'root'}: {exc}") from None


def _parse(cls: type, name: str, current: Any, text: str, dotted: str) -> Any:
    allowed = choices(cls, name)
    if allowed is not None:
        for value in allowed:
            if str(value) == text:
                return value
        raise ConfigError(f"config option {dotted}: {text!r} is not one of "
                          f"{', '.join(map(str, allowed))}")
    kind = type(current)
    if kind is bool:
        if text.lower() not in _TRUE + _FALSE:
            raise ConfigError(f"config option {dotted}: {text!r} is not a bool "
                              f"(one of {', '.join(_TRUE + _FALSE)})")
        return text.lower() in _TRUE
    try:
        return kind(text)
    except ValueError as exc:
        raise ConfigError(f"config option {dotted}: {text!r} is not a {kind.__name__}") from exc


# -- fingerprints of the files a config names ----------------------------------------------
_FILE_FP: dict[tuple[str, int, int, int], str] = {}


def _file_sha256(path: str, st: os.stat_result) -> str:
    """sha256 of a file's bytes, cached by (path, size, mtime, inode) for this process."""
    ident = (path, st.st_size, st.st_mtime_ns, st.st_ino)
    if ident not in _FILE_FP:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _FILE_FP[ident] = h.hexdigest()
    return _FILE_FP[ident]


def fingerprint_path(path: str | Path, kind: str = "file") -> str:
    """sha256 fingerprint of a file's bytes, or of a folder's files (relative paths and
    bytes, in sorted order); the path string itself does not enter it.

    Raises:
        ConfigError: when the path does not exist or is not of the expected kind.
    """
    p = Path(path).expanduser().absolute()
    if kind == "file":
        if not p.is_file():
            raise ConfigError(f"{path}: no such file")
        return _file_sha256(str(p), p.stat())
    if not p.is_dir():
        raise ConfigError(f"{path}: no such folder")
    h = hashlib.sha256(b"hmc-pgt-folder-fp\n")
    for root, dirs, names in os.walk(p):
        dirs.sort()
        for name in sorted(names):
            f = Path(root, name)
            if f.is_file():
                rel = f.relative_to(p).as_posix()
                h.update(f"{rel}\0{_file_sha256(str(f), f.stat())}\n".encode())
    return h.hexdigest()


T = TypeVar("T")


def config_section(config: Any, name: str, cls: type[T]) -> T:
    """A stage's typed section from what the engine passes (``{name: section}``).

    Args:
        config: the engine's config view declaring ``name`` (a whole section), an instance
            of ``cls`` itself, or None for the defaults.
        name: the section's field name in the run config (e.g. ``"fusion"``).
        cls: the section's dataclass.

    Raises:
        ConfigError: the view holds something other than a ``cls``.
    """
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    section = config[name]
    if not isinstance(section, cls):
        raise ConfigError(f"config {name} must be a {cls.__name__}, got {type(section).__name__}")
    return section
