"""The product's run config: every stage's section, gathered above the engine.

Each section is declared beside its stage (``stages/<name>.py``); adding a stage adds
one field here. ``pgt`` exposes every field as ``--set section.field=VALUE``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline import __version__
from rigs.example_rig import ExampleRigConfig
from stages.face_mask import FaceMaskConfig
from stages.fit_config import FitConfig
from stages.fusion import FusionConfig
from stages.landmarks import LandmarksConfig
from stages.refine import RefineConfig
from stages.selfsup.stage import SelfSupConfig
from stages.texture import TextureConfig
from stages.validation import ValidateConfig


@dataclass(frozen=True)
class RunConfig:
    """Everything a labelling run reads."""

    validate: ValidateConfig = field(default_factory=ValidateConfig)
    landmarks: LandmarksConfig = field(default_factory=LandmarksConfig)
    face_mask: FaceMaskConfig = field(default_factory=FaceMaskConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    texture: TextureConfig = field(default_factory=TextureConfig)
    rig: ExampleRigConfig = field(default_factory=ExampleRigConfig)
    selfsup: SelfSupConfig = field(default_factory=SelfSupConfig)
    pipeline_version: str = __version__
    """Written into every label row."""
