"""The product's run config: every stage's section, gathered above the engine.

Each section is declared beside its stage (``stages/<name>.py``); adding a stage adds
one field here. ``pgt`` exposes every field as ``--set section.field=VALUE``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline import __version__
from stages.face_mask import FaceMaskConfig
from stages.fusion import FusionConfig
from stages.landmarks import LandmarksConfig
from stages.validation import ValidateConfig


@dataclass(frozen=True)
class RunConfig:
    """Everything a labelling run reads."""

    validate: ValidateConfig = field(default_factory=ValidateConfig)
    landmarks: LandmarksConfig = field(default_factory=LandmarksConfig)
    face_mask: FaceMaskConfig = field(default_factory=FaceMaskConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    pipeline_version: str = __version__
    """Written into every label row."""
