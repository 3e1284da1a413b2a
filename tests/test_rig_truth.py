"""benchmarks/rig_truth.py reproduces a subject's true expression meshes without rendering."""

from __future__ import annotations

import numpy as np

from benchmarks.rig_truth import true_expressions
from rigs.definition import load_default_rig_definition
from rigs.face_model import load_ict_face_model
from stages.synthesis.presets import get_preset
from stages.synthesis.truth import SubjectTruth
from tests.conftest import TINY_SEED


def test_replay_equals_the_generators_truth(tiny_subject):
    """Same prompts, weights, gaze, meshes and rig as ``pgt synth`` wrote (which rendered)."""
    _, truth_dir = tiny_subject
    truth = SubjectTruth.open(truth_dir)
    written = truth.expressions()
    replay = true_expressions(get_preset("tiny"), TINY_SEED, 0, load_ict_face_model(), load_default_rig_definition())
    assert replay.prompts == tuple(str(p) for p in written["prompts"])
    np.testing.assert_array_equal(replay.b, written["b"])
    np.testing.assert_array_equal(replay.gaze, written["gaze"])
    np.testing.assert_array_equal(replay.vertices, written["vertices"])
    np.testing.assert_array_equal(np.asarray(replay.subject.rig.deltas, truth.rig.deltas.dtype), truth.rig.deltas)
