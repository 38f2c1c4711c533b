"""Progress of long steps: the load's bar (bytes and tensors with their rate, on a terminal or when forced), and
rate-limited log lines for steps that run without one (validate's metrics)."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


def progress_bar(total: int, tensors: int, progress: bool | None):
    """A tqdm bar, or None when stderr is not a terminal (and progress is not forced) or progress=false."""
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="load_shards", file=sys.stderr)
    bar.tensors_total, bar.tensors_done = tensors, 0
    return bar


def tick(bar) -> None:
    """One more tensor done."""
    if bar is not None:
        bar.tensors_done += 1
        bar.set_postfix_str(f"{bar.tensors_done}/{bar.tensors_total} tensors", refresh=False)


class Progress:
    """Log lines for one long step that has no bar (validate's reference, perplexity, greedy text): done/total,
    elapsed and ETA, at most one line per `interval` seconds, plus the first and the last, so a long run says
    where it is in run.log and on the console without flooding either."""

    def __init__(self, what: str, total: int, unit: str, interval: float = 2.0, logger: logging.Logger | None = None):
        self.what, self.total, self.unit, self.interval = what, max(int(total), 1), unit, float(interval)
        self.log = logger or log
        self.done = 0
        self.start = time.perf_counter()
        self._logged_at: float | None = None
        self._logged_done = 0

    def advance(self) -> None:
        self.done += 1
        self.total = max(self.total, self.done)  # a block run more often than counted: never past 100%
        now = time.perf_counter()
        if self._logged_at is None or self.done == self.total or now - self._logged_at >= self.interval:
            self._line(now)

    def finish(self) -> None:
        """The last line, when the step stopped before its total (greedy text at its end-of-sequence token)."""
        if self.done != self._logged_done:
            self._line(time.perf_counter(), stopped=True)

    def _line(self, now: float, stopped: bool = False) -> None:
        elapsed = now - self.start
        if self.done >= self.total or stopped:
            tail = "done" if self.done >= self.total else "done (stopped early)"
        else:
            tail = f"ETA {elapsed / max(self.done, 1) * (self.total - self.done):.1f} s"
        self.log.info("%s: %s %d/%d, %.1f s, %s", self.what, self.unit, self.done, self.total, elapsed, tail)
        self._logged_at, self._logged_done = now, self.done
