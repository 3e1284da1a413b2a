"""Generic helpers over typed run configs (frozen dataclasses, one section per stage).

The engine knows no product config: each stage's section sits beside the stage
(``stages/<name>.py``) and the product gathers them in ``workflows.config.RunConfig``.
Stages declare the dotted fields they read (e.g. ``"landmarks.detector"``); only those
enter their cache keys. ``pgt`` exposes every field as ``--set section.field=VALUE``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.errors import ConfigError


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
    """A copy of ``config`` with ``{"section.field": "text"}`` values parsed to field types."""
    for dotted, text in overrides.items():
        parts = dotted.split(".")
        config = _set(config, parts, text, dotted)
    return config


def _set(obj: Any, parts: list[str], text: str, dotted: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if parts[0] not in fields:
        raise ConfigError(f"unknown config option {dotted!r}")
    current = getattr(obj, parts[0])
    if len(parts) > 1:
        return dataclasses.replace(obj, **{parts[0]: _set(current, parts[1:], text, dotted)})
    kind = type(current)
    try:
        value = (text.lower() in ("1", "true", "yes", "on")) if kind is bool else kind(text)
    except ValueError as exc:
        raise ConfigError(f"config option {dotted}: {text!r} is not a {kind.__name__}") from exc
    return dataclasses.replace(obj, **{parts[0]: value})
