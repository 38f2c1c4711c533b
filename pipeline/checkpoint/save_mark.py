"""The mark a save leaves in its directory, so that only what we wrote is ever replaced or removed.

`.model-loader-save.json` is written first (state `writing`, the names about to be written,
the writer's pid) and rewritten last (state `complete`, every file's size). A directory is
ours to replace only when its mark is complete and accounts for every entry in it, sizes
included: a file someone added or changed is theirs, and the directory is left alone.
Removal deletes the mark last, so a removal cut short is still recognisably ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

MARK = ".model-loader-save.json"
_MARK_TMP = MARK + ".tmp"
# safetensors writes each shard to a temporary file beside it (Rust's tempfile: ".tmp" + 6 characters), then
# renames it: a save killed mid-shard leaves one in its directory, ours while the mark says "writing"
_PARTIAL_SHARD = re.compile(r"\.tmp[A-Za-z0-9]{6}")
_WRITER = "model-loader stages.save"


def write_mark(folder: str, state: str, files: dict[str, int | None]) -> None:
    """The mark, atomically (a crash leaves the old mark or the new one) and flushed to disk."""
    doc = {"written_by": _WRITER, "state": state, "pid": os.getpid(), "files": files}
    tmp = os.path.join(folder, _MARK_TMP)
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(folder, MARK))


def read_mark(folder: str) -> dict | None:
    """The mark of `folder`, or None when it has none (or one we did not write)."""
    try:
        with open(os.path.join(folder, MARK)) as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return None
    ok = isinstance(doc, dict) and doc.get("written_by") == _WRITER and isinstance(doc.get("files"), dict)
    return doc if ok else None


def foreign_entry(folder: str, mark: dict) -> str | None:
    """The first entry of `folder` its mark does not account for, said why; None when all are ours."""
    files = mark["files"]
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name in (MARK, _MARK_TMP) or _partial_shard(entry.name, mark):
            continue
        if entry.name not in files:
            return f"{entry.name} (not written by the save)"
        if entry.is_symlink() or not entry.is_file():
            return f"{entry.name} (not a plain file)"
        size = files[entry.name]
        if mark["state"] == "complete" and size != entry.stat().st_size:
            return f"{entry.name} (changed since the save)"
    return None


def is_complete(folder: str, mark: dict | None) -> bool:
    """A finished save with every file it lists present at its size."""
    if mark is None or mark.get("state") != "complete":
        return False
    for name, size in mark["files"].items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return False
    return True


def owner_alive(mark: dict) -> bool:
    """Whether the process that wrote the mark still runs (another process: a save under way)."""
    pid = mark.get("pid")
    if not isinstance(pid, int) or pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _partial_shard(name: str, mark: dict) -> bool:
    return mark.get("state") == "writing" and bool(_PARTIAL_SHARD.fullmatch(name))


def remove_ours(folder: str, mark: dict, on_first=None) -> bool:
    """Delete the files the mark lists, then the mark, then the directory (kept if anything else is in it)."""
    for i, name in enumerate(sorted(mark["files"])):
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            continue
        if i == 0 and on_first is not None:
            on_first()
    partial = [e.name for e in os.scandir(folder) if _partial_shard(e.name, mark) and e.is_file(follow_symlinks=False)]
    for name in (*partial, _MARK_TMP, MARK):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, name))
    try:
        os.rmdir(folder)
    except OSError:
        return False
    return True
