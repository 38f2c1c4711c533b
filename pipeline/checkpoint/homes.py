"""Where a checkpoint's bytes really live, and how another path relates to them.

Save and the run's own files are checked against these before anything is written: the
checkpoint directory and the real directories its files resolve to (a hub cache's snapshot
links into `blobs/`), all compared as real paths, so a symlink or `..` cannot hide them.
Stdlib only: the CLI asks before torch is imported.
"""

from __future__ import annotations

import json
import os

INDEX_NAME = "model.safetensors.index.json"


def real(path: str) -> str:
    """The absolute real path (symlinks resolved, `~` expanded); a missing tail stays as written."""
    return os.path.realpath(os.path.abspath(os.path.expanduser(str(path))))


def checkpoint_homes(path: str, *, file_parent: bool = True) -> list[str]:
    """Real directories holding the checkpoint at `path`: the directory itself (a single file: its
    parent, unless file_parent=False), and the directories its files and symlinks resolve to."""
    root = real(path)
    if os.path.isfile(root):
        return [os.path.dirname(root)] if file_parent else []
    if not os.path.isdir(root):
        return []
    homes = {root: None}
    for name in _file_names(root):
        target = real(os.path.join(root, name))
        homes.setdefault(os.path.dirname(target), None)
    return list(homes)


def _file_names(root: str) -> list[str]:
    """Top-level entries and the files the index names (it may name files in subdirectories). An entry that
    leaves the directory by name (absolute, `..`) is never read (layout.py refuses it), so it is no home."""
    names = os.listdir(root)
    try:
        with open(os.path.join(root, INDEX_NAME)) as fh:
            names += [str(v) for v in json.load(fh).get("weight_map", {}).values() if _stays_inside(str(v))]
    except (OSError, ValueError, AttributeError):
        pass  # no index, or a bad one: loading says so; the top level is still protected
    return names


def _stays_inside(rel: str) -> bool:
    return not (os.path.isabs(rel) or rel.startswith("\\") or ".." in rel.replace("\\", "/").split("/"))


def relation(path: str, home: str) -> str | None:
    """'is', 'inside' or 'contains' when real path `path` and real path `home` overlap, else None."""
    if path == home:
        return "is"
    common = os.path.commonpath([path, home])
    if common == home:
        return "inside"
    if common == path:
        return "contains"
    return None
