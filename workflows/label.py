"""Jobs: label one subject, or backfill every capture under a root (through the DAG).

``label_subject`` and ``backfill`` only choose captures and call
:func:`pipeline.dag.run_chain`, which resumes from whatever ``out`` already holds. A broken
capture becomes a failure record; the rest of the backfill goes on. Copy this file to
change how captures are found or which chain runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.dag import RunSummary, run_chain
from pipeline.errors import ConfigError
from pipeline.stage import Chain
from workflows.chain import default_chain
from workflows.config import RunConfig


def find_captures(source: str | Path) -> list[Path]:
    """Capture folders: every sub-folder of a root, or the paths listed in a text file.

    Every sub-folder counts, even one without ``capture.json``: it then fails validation
    and becomes a failure record instead of silently disappearing from a backfill.
    A listing file holds one path per line (blank lines and ``#`` comments ignored);
    relative paths are relative to the file.
    """
    source = Path(source)
    if source.is_file():
        paths = []
        for raw in source.read_bytes().splitlines():
            line = os.fsdecode(raw).strip()  # paths need not be UTF-8
            if line and not line.startswith("#"):
                p = Path(line)
                paths.append(p if p.is_absolute() else source.parent / p)
        return paths
    if not source.is_dir():
        raise ConfigError(f"{source}: neither a captures folder nor a listing file")
    # A symlink counts even when it dangles: it then fails, named, instead of vanishing.
    return sorted(p for p in source.iterdir()
                  if (p.is_dir() or p.is_symlink()) and not p.name.startswith("."))


def label_subject(capture: str | Path, out: str, config: RunConfig | None = None, chain: Chain | None = None,
                  **run_options) -> RunSummary:
    """Runs the chain (default: the product's) on one subject's capture."""
    return _run_and_export([Path(capture)], out, config or RunConfig(), chain or default_chain(), run_options)


def backfill(source: str | Path, out: str, config: RunConfig | None = None, chain: Chain | None = None,
             **run_options) -> RunSummary:
    """Runs the chain (default: the product's) on every capture of ``source`` (a root folder or a listing file)."""
    captures = find_captures(source)
    if not captures:
        raise ConfigError(f"{source}: no captures found")
    return _run_and_export(captures, out, config or RunConfig(), chain or default_chain(), run_options)


def _run_and_export(captures: list[Path], out: str, config: RunConfig, chain: Chain, run_options: dict) -> RunSummary:
    """The chain, then its round-0 labels into the label table (when the chain labels)."""
    from workflows.export import export_round0

    summary = run_chain(captures, out, config, chain=chain, **run_options)
    if any(st.name == "selfsup" for st in chain.stages):
        export_round0(summary, config.pipeline_version, run_options.get("storage_options"),
                      run_options.get("tables_uri"))
    return summary
