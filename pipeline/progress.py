"""Progress reporting that suits where the output goes.

On a terminal a tqdm bar redraws itself with carriage returns. Anywhere else (a log file, a
CI job, a pipe) those carriage returns turn into one long line of redraws, so
:func:`progress_bar` prints a plain line at most every :data:`LOG_EVERY_S` seconds, and a
last one when the work ends, instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, TextIO, TypeVar

from tqdm import tqdm

#: Seconds between two progress lines written to a stream that is not a terminal.
LOG_EVERY_S = 10.0

T = TypeVar("T")


class Progress(Protocol):
    """What callers use of a progress bar (tqdm's names)."""

    total: int | float | None

    def update(self, n: int = 1) -> Any:
        """Counts ``n`` more units done."""

    def refresh(self) -> Any:
        """Shows the current state (after ``total`` changed)."""

    def close(self) -> Any:
        """Ends the bar."""


class LogProgress:
    """Progress as plain lines (``desc: done/total unit (pct), elapsed``), for logs.

    Args:
        total: units expected (may grow later through ``total``).
        desc: what is counted, first on each line.
        unit: name of one unit.
        stream: where lines go.
        every_s: least seconds between two lines; the closing line is always written
            when any unit was done.
    """

    def __init__(self, total: int | float | None, desc: str, unit: str, stream: TextIO,
                 every_s: float = LOG_EVERY_S) -> None:
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.every_s = every_s
        self.n = 0
        self._start = self._last = time.monotonic()
        self._closed = False

    def update(self, n: int = 1) -> None:
        """Counts ``n`` more units; writes a line when ``every_s`` passed since the last."""
        self.n += n
        if time.monotonic() - self._last >= self.every_s:
            self._write()

    def refresh(self) -> None:
        """Nothing to redraw in a log."""

    def close(self) -> None:
        """Writes the closing line (once)."""
        if not self._closed and self.n:
            self._write(" done")
        self._closed = True

    def _write(self, suffix: str = "") -> None:
        self._last = time.monotonic()
        of = f"/{self.total:g}" if self.total else ""
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        self.stream.write(f"{self.desc}: {self.n}{of} {self.unit}{pct}, "
                          f"{self._last - self._start:.1f} s{suffix}\n")
        self.stream.flush()


def progress_bar(total: int | float | None, desc: str, unit: str = "it", *,
                 enabled: bool = True, stream: TextIO | None = None,
                 leave: bool = True) -> Progress:
    """A tqdm bar on a terminal, plain log lines elsewhere, nothing when not ``enabled``.

    Args:
        total: units expected.
        desc: label of the bar or lines.
        unit: name of one unit.
        enabled: False (e.g. ``--quiet``) prints nothing at all.
        stream: output stream; default ``sys.stderr`` (looked up at call time).
        leave: keep the finished bar on the terminal (ignored for log lines).
    """
    out = stream if stream is not None else sys.stderr
    if enabled and not _is_terminal(out):
        return LogProgress(total, desc, unit, out)
    return tqdm(total=total, desc=desc, unit=unit, file=out, leave=leave,
                disable=not enabled)


def track(items: Iterable[T], total: int | None, desc: str, unit: str = "it", *,
          enabled: bool = True, stream: TextIO | None = None) -> Iterator[T]:
    """Yields ``items``, counting each one on a :func:`progress_bar`."""
    bar = progress_bar(total, desc, unit, enabled=enabled, stream=stream)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
