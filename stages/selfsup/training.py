"""A resumable Adam loop: warm-up, cosine decay, atomic checkpoints, deterministic batches.

A killed run resumes from its last checkpoint and ends with the same parameters as an
uninterrupted one: each step's batch is drawn from a generator seeded by (seed, step),
not from a stream that a restart would reset, and the checkpoint holds the parameters,
Adam's moments, the step and the loss history.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation schedule."""

    steps: int = 2000
    """Adam steps. >= 1."""
    batch_size: int = 16
    """Frames per step. >= 1."""
    learning_rate: float = 2e-3
    """Peak learning rate. > 0."""
    warmup_steps: int = 50
    """Steps of linear warm-up from 0 to the peak. >= 0."""
    final_lr_fraction: float = 0.05
    """The cosine decay ends at this fraction of the peak; in [0, 1]."""
    checkpoint_every: int = 200
    """Steps between checkpoints (and at the end). >= 1."""
    seed: int = 0
    """Seeds the batches (with the step) and the network's initial weights."""
    clip_grad_norm: float = 10.0
    """Gradients are scaled down to this total norm; a step whose loss or gradient is not
    finite is skipped (counted in the history's ``skipped``). > 0."""

    def __post_init__(self) -> None:
        checks = (
            ("steps", self.steps >= 1), ("batch_size", self.batch_size >= 1),
            ("learning_rate", self.learning_rate > 0), ("warmup_steps", self.warmup_steps >= 0),
            ("final_lr_fraction", 0 <= self.final_lr_fraction <= 1),
            ("checkpoint_every", self.checkpoint_every >= 1), ("clip_grad_norm", self.clip_grad_norm > 0),
        )
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise ConfigError(f"invalid training config field(s): {', '.join(bad)} ({self})")


@dataclass
class TrainHistory:
    """Per-step loss terms (name -> list of floats) and where the run started."""

    terms: dict[str, list[float]] = field(default_factory=dict)
    resumed_from: int = 0

    def append(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.terms.setdefault(k, []).append(float(v))


def learning_rate_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak rate at ``step`` (0-based): linear warm-up, then cosine decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(step: int, n_items: int, cfg: TrainConfig) -> np.ndarray:
    """The frames of ``step``: a function of (seed, step) only, so a resume redraws them."""
    rng = np.random.default_rng([cfg.seed, step])
    return rng.choice(n_items, size=min(cfg.batch_size, n_items), replace=False)


class CheckpointStore(Protocol):
    """Where progress goes: :class:`pipeline.artifacts.Checkpoint` (the engine's), or any
    object with these two methods."""

    def load(self) -> bytes | None: ...

    def exists(self) -> bool: ...

    def save(self, data: bytes) -> None: ...


def _save(checkpoint: CheckpointStore, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    checkpoint.save(buf.getvalue())


def _load(checkpoint: CheckpointStore) -> dict | None:
    data = checkpoint.load()
    return None if data is None else torch.load(io.BytesIO(data), weights_only=False)


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Torch's deterministic algorithms for the block (restored after).

    Scatter-adds in the renderer's backward pass otherwise sum in a thread-dependent order
    (measured: gradients differ by 2e-4 between two identical steps on 2 threads), and a
    resumed run would drift from an uninterrupted one.
    """
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def train(
    module: torch.nn.Module,
    step_loss: Callable[[np.ndarray, int], tuple[torch.Tensor, dict[str, float]]],
    n_items: int,
    cfg: TrainConfig,
    checkpoint: CheckpointStore | None = None,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainHistory:
    """Minimises ``step_loss`` over ``module``'s parameters, resuming from ``checkpoint``.

    Args:
        module: every trainable parameter (network and appearance).
        step_loss: (batch indices, 0-based step) -> (scalar loss, named terms for the history).
        n_items: the number of frames to draw batches from.
        cfg: the schedule.
        checkpoint: where to resume from and save to; None trains without checkpoints.
        progress: called after each step with (steps done, terms).

    Returns:
        The history of every step, the resumed steps' included.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate)
    history = TrainHistory()
    start = 0
    state = None if checkpoint is None else _load(checkpoint)
    if state is not None:
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        history = TrainHistory(terms=state["history"], resumed_from=state["step"])
        start = state["step"]
    with deterministic():
        _run(module, optimizer, step_loss, n_items, cfg, checkpoint, progress, history, start)
    return history


def _run(module, optimizer, step_loss, n_items, cfg, checkpoint, progress, history, start) -> None:
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate * learning_rate_factor(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss, terms = step_loss(batch_indices(step, n_items, cfg), step)
        loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm))
        skipped = not (np.isfinite(norm) and np.isfinite(float(loss.detach())))
        if not skipped:  # a non-finite loss or gradient would poison Adam's moments
            optimizer.step()
        history.append({**terms, "grad_norm": norm, "skipped": float(skipped)})
        done = step + 1
        if checkpoint is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            _save(checkpoint, {"module": module.state_dict(), "optimizer": optimizer.state_dict(),
                               "step": done, "history": history.terms})
        if progress is not None:
            progress(done, terms)
