"""The run config: typed dataclasses, each field documented where it is declared.

Stages declare the dotted fields they read (e.g. ``"landmarks.detector"``); only those
enter their cache keys. ``pgt`` exposes every field as ``--section.field VALUE``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline import __version__
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class ValidateConfig:
    """Capture validation before anything reads the capture."""

    deep: bool = True
    """Decode every image (slow on long recordings) instead of checking headers only."""


@dataclass(frozen=True)
class LandmarksConfig:
    """Landmarks and face mask per phone frame (SPEC §3 item 1)."""

    detector: str = "mediapipe"
    """mediapipe, face_alignment (needs ``weights``) or precomputed (needs ``precomputed_dir``)."""
    weights: str = ""
    """Local face-alignment weights file; never downloaded."""
    precomputed_dir: str = ""
    """Folder of precomputed landmark files, ``<expression>/<index:06d>.npz``."""
    min_confidence: float = 0.5
    """Frames whose detection confidence is below this are rejected."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a labelling run reads."""

    validate: ValidateConfig = field(default_factory=ValidateConfig)
    landmarks: LandmarksConfig = field(default_factory=LandmarksConfig)
    pipeline_version: str = __version__
    """Written into every label row."""


def config_options(cls: type = RunConfig, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Flattened ``section.field`` -> dataclass field, for the CLI."""
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):  # a section: recurse into its fields
            out.update(config_options(type(default), f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f
    return out


def with_overrides(config: RunConfig, overrides: dict[str, str]) -> RunConfig:
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
