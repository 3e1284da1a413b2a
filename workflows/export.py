"""Job step: write a run's round-0 labels (the ``selfsup`` artifacts) to the label table.

The stage's artifact is content-addressed and knows no run, so the labels enter the table
here, stamped with the run that produced or reused them: one atomic
``write_subject_round`` per subject (source ``self_supervision``, round 0), which replaces
that subject's earlier round-0 rows. Subjects whose stage failed are left as they are;
their failure records say why.
"""

from __future__ import annotations

from typing import Any

from pipeline.dag import RunSummary
from pipeline.runlog import OutputLayout

#: The label table's name under the run's tables root.
LABEL_TABLE = "labels"


def export_round0(summary: RunSummary, pipeline_version: str, storage_options: dict[str, Any] | None = None,
                  tables_uri: str | None = None) -> dict[str, int]:
    """Writes every subject's ``selfsup`` labels of ``summary``'s run to the label table.

    Returns:
        subject -> the Delta version of its commit.
    """
    from pipeline.artifacts import ArtifactStore
    from stages.selfsup.stage import SelfSupLabels
    from storage.label_table import LabelTable

    layout = OutputLayout(summary.out, tables_uri)
    store = ArtifactStore(layout.artifacts, storage_options)
    table = LabelTable(layout.table(LABEL_TABLE), storage_options)
    versions = {}
    for (stage, subject), state in sorted(summary.states.items(), key=lambda kv: str(kv[0])):
        if stage != "selfsup" or state not in ("done", "cached"):
            continue
        labels = SelfSupLabels.from_output(store.load(stage, summary.keys[(stage, subject)]))
        versions[subject] = table.write_subject_round(
            labels.label_table(run_id=summary.run_id, pipeline_version=pipeline_version))
    return versions
