"""SIGTERM and SIGINT while stages run become `Interrupted` in the main thread, so the runner writes report.json
(status `interrupted`) before the process ends: Slurm, torchrun and `kill` send SIGTERM, whose default ends a
Python process at once, without a report or a `finally`."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from ..errors import Interrupted

_CAUGHT = (signal.SIGTERM, signal.SIGINT)


def _raise(signum, frame):
    raise Interrupted(signum)


def interruption_in(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The signal behind `exc`: a library may wrap it (Python 3.11 turns an exception raised while a class
    body is created into RuntimeError, "Error calling __set_name__"), and it is still the signal."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def raise_on_signals() -> None:
    """The CLI, from its start: SIGTERM too ends in one line and exit 143 (before the runner, without a report)."""
    for s in _CAUGHT:
        if signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(s, _raise)


class _Guard:
    """Raises on a signal until held; while held (the report being written) it keeps the signal for later."""

    def __init__(self):
        self.held = False
        self.pending: int | None = None

    def __call__(self, signum, frame):
        if self.held:
            self.pending = self.pending or signum
            return
        raise Interrupted(signum)

    def hold(self) -> None:
        self.held = True


@contextmanager
def interruptible():
    """Raise Interrupted on SIGTERM/SIGINT inside the block; handlers the program set itself are left alone."""
    guard = _Guard()
    if threading.current_thread() is not threading.main_thread():
        yield guard  # signal handlers belong to the main thread: there, Python's defaults stay
        return
    defaults = (signal.SIG_DFL, signal.default_int_handler, _raise)
    previous = {s: signal.getsignal(s) for s in _CAUGHT}
    ours = [s for s, h in previous.items() if h in defaults]
    for s in ours:
        signal.signal(s, guard)
    try:
        yield guard
    finally:
        for s in ours:
            signal.signal(s, previous[s])
    if guard.pending is not None:  # came while the report was written: delivered now, to the handler before ours
        signal.raise_signal(guard.pending)


def describe(exc: KeyboardInterrupt, stages: list[dict]) -> str:
    """The report's error line: which signal, the stage it stopped, the stages done before it."""
    what = f"interrupted by {exc.signal_name}" if isinstance(exc, Interrupted) else "interrupted by the user (Ctrl-C)"
    running = [s["name"] for s in stages if s.get("status") == "interrupted"]
    done = [s["name"] for s in stages if s.get("status") == "ok"]
    where = f" during stage {running[-1]}" if running else " before the first stage"
    return f"{what}{where} (stages done: {', '.join(done) or 'none'})"
