"""Replace an earlier save by renames, so that a crash at any instant leaves a complete save, and
clean up after a save that was killed (`.save-`/`.old-` directories; docs/design.md, "Save never destroys
what it did not write").
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from .save_mark import foreign_entry, is_complete, owner_alive, read_mark, remove_ours

# Crash tests stop a real save at a phase (then SIGKILL it): the instants a kill must survive.
PAUSE_ENV = "PIPELINE_TEST_SAVE_PAUSE"


def pause_point(phase: str) -> None:
    """Hold here when PIPELINE_TEST_SAVE_PAUSE names this phase (tests only; never set otherwise)."""
    if os.environ.get(PAUSE_ENV) == phase:
        print(f"save paused at {phase}", file=sys.stderr, flush=True)
        time.sleep(3600)


def temp_beside(dest: str, kind: str) -> str:
    """A new empty directory `.<kind>-<name>-XXXX` beside `dest` (same filesystem: renames are atomic)."""
    parent, name = os.path.split(dest)
    return tempfile.mkdtemp(prefix=f".{kind}-{name}-", dir=parent)


def replace_dir(new: str, dest: str) -> None:
    """Put the complete save `new` at `dest`; an earlier save there (checked ours) is removed only after."""
    parent = os.path.dirname(dest)
    if not os.path.lexists(dest) or (os.path.isdir(dest) and not os.listdir(dest)):
        os.rename(new, dest)  # onto nothing, or onto an empty directory: one atomic rename
        _sync_dir(parent)
        return
    old = temp_beside(dest, "old")
    os.rename(dest, old)  # replaces the empty directory `old` atomically
    try:
        pause_point("swapped")
        os.rename(new, dest)
    except BaseException:
        if not os.path.lexists(dest):
            os.rename(old, dest)  # the swap did not happen: the earlier save goes back
        raise
    _sync_dir(parent)
    mark = read_mark(old)
    if mark is not None:
        remove_ours(old, mark, on_first=lambda: pause_point("removing"))


def recover(dest: str) -> list[str]:
    """What a killed save to `dest` left: a half swap rolled back, our stale directories removed; returns
    one line per leftover (what was done, or why it was left alone)."""
    parent, name = os.path.split(dest)
    if not os.path.isdir(parent):
        return []
    found = sorted(
        os.path.join(parent, e.name)
        for e in os.scandir(parent)
        if e.name.startswith((f".save-{name}-", f".old-{name}-")) and e.is_dir(follow_symlinks=False)
    )
    notes = []
    if not os.path.lexists(dest):
        for old in (f for f in found if os.path.basename(f).startswith(".old-")):
            mark = read_mark(old)
            if is_complete(old, mark) and not foreign_entry(old, mark):
                os.rename(old, dest)
                notes.append(f"{dest}: restored the earlier save from {old} (a save was killed while swapping)")
                found.remove(old)
                break
    return notes + [_clean(folder) for folder in found]


def _clean(folder: str) -> str:
    """Remove one stale directory of ours; say what was done or why it stays."""
    mark = read_mark(folder)
    if mark is None:
        if not os.listdir(folder):
            os.rmdir(folder)
            return f"{folder}: removed (empty, left by a killed save)"
        return f"{folder}: left as is (not written by a save: no mark); remove it yourself if it is not needed"
    if owner_alive(mark):
        return f"{folder}: left as is (process {mark['pid']} is still saving there)"
    foreign = foreign_entry(folder, mark)
    if foreign:
        return f"{folder}: left as is (holds {foreign}); remove it yourself if it is not needed"
    remove_ours(folder, mark)
    return f"{folder}: removed (left by a killed save)"


def _sync_dir(path: str) -> None:
    """The renames reach the disk (a power cut keeps the old or the new save, as a kill does)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
