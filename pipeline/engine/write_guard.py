"""Nothing is written into the checkpoint directory, whatever the configuration: the run directory
(relative ones resolve against the working directory), the model-loader cache and the metric
cache are refused, naming the key, before anything is written (the CLI asks before Hydra makes
the run directory; load() and run() ask again). Stdlib only: the CLI asks before torch."""

from __future__ import annotations

import os

from ..cache_home import cache_dir, write_homes
from ..checkpoint.homes import checkpoint_homes, real, relation
from ..errors import UserError


def source_path(cfg) -> str | None:
    """The checkpoint a config loads: checkpoint.path (a Hub repo id: its cached snapshot), else the built-in
    one's directory in the cache."""
    node = cfg.get("checkpoint") or {}
    path = node.get("path")
    if not path and node.get("builtin"):
        path = os.path.join(cache_dir(), str(node.get("builtin")))
    if path and not os.path.exists(os.path.expanduser(str(path))):
        return _cached_snapshot(str(path), node.get("revision"))
    return str(path) if path else None


def _cached_snapshot(repo_id: str, revision) -> str | None:
    """A Hub repo id's snapshot in the local Hugging Face cache (as the load resolves it); None when it is not
    one (the load says why)."""
    from ..checkpoint.sources import REPO_ID, hub_snapshot

    if not REPO_ID.match(repo_id) or repo_id.startswith((".", "~")):
        return None
    try:
        return hub_snapshot(repo_id, str(revision) if revision else None)
    except UserError:
        return None


def check_writes_outside(cfg, run_key: str, run_dir) -> None:
    """Refuse a run directory or cache that is, or is inside, the checkpoint directory (or where its files are)."""
    source = source_path(cfg)
    homes = checkpoint_homes(source, file_parent=False) if source else []
    if not homes:
        return
    for key, path in [(run_key, run_dir), *write_homes()]:
        if path is None:
            continue
        resolved = real(str(path))
        for home in homes:
            if relation(resolved, home) in ("is", "inside"):
                raise UserError(_message(key, str(path), resolved, home))


def _message(key: str, given: str, resolved: str, home: str) -> str:
    relative = not os.path.isabs(os.path.expanduser(given))
    where = (
        f" ({resolved}, relative to the working directory)"
        if relative
        else ""
        if given == resolved
        else f" ({resolved})"
    )
    hint = " or run from another directory" if relative else ""
    return (
        f"{key}: {given}{where} is inside the checkpoint directory {home}; nothing is ever written there; "
        f"set {key} to a directory outside it{hint}"
    )
