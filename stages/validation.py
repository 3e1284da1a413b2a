"""Stage ``validate``: the capture contract is checked before any stage reads the capture."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import check_fields
from pipeline.errors import CaptureError


@dataclass(frozen=True)
class ValidateConfig:
    """Capture validation before anything reads the capture."""

    deep: bool = True
    """Decode every image (slow on long recordings) instead of checking headers only."""

    def __post_init__(self) -> None:
        check_fields(self)


def validate_capture_stage(capture: str, config):
    """Raises :class:`CaptureError` listing every problem; returns the summary otherwise.

    Peak segments' prompts are checked against the embedded rig definition's prompts (the
    rig the chain labels with). The failure record of a broken subject then carries the
    validator's messages.
    """
    from pipeline.serialize import StageOutput
    from rigs.definition import load_default_rig_definition
    from storage.capture import Capture
    from storage.validate import summarize_capture, validate_capture

    prompts = {p.name for p in load_default_rig_definition().prompts}
    problems = validate_capture(
        capture, deep=bool(config["validate.deep"]), progress=lambda done, total: None,
        prompts=prompts,
    )  # fmt: skip
    if problems:
        detail = "; ".join(str(p) for p in problems[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise CaptureError(capture, f"{len(problems)} problem(s): {detail}{more}")
    cap = Capture.open(capture)
    return StageOutput(meta={"subject_id": cap.subject_id, "summary": summarize_capture(capture)})
