"""Write an HF-layout safetensors checkpoint directory beside its destination, then swap it in.

Written, marked (checkpoint/save_mark.py) and renamed into place (checkpoint/swap.py), so a kill leaves the
earlier save or the new one complete (docs/design.md, "Save never destroys what it did not write"). A full
disk is one line: checked before the first byte when the free space is known, and on ENOSPC while writing,
with the temporary directory removed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import torch
from safetensors.torch import save_file

from ..errors import UserError
from .save_mark import remove_ours, write_mark
from .swap import pause_point, replace_dir, temp_beside

INDEX_NAME = "model.safetensors.index.json"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def write_checkpoint_dir(
    dest: str,
    tensors: dict[str, torch.Tensor],
    *,
    metadata: dict[str, str],
    max_shard_bytes: int,
    copy_from: str | None = None,
    copied: tuple[str, ...] = (),
    json_files: dict[str, dict] | None = None,
) -> int:
    """Shards, index, the `copied` files of `copy_from` and `json_files` (name -> document) into `dest`
    (replacing an earlier save there); returns the shard count."""
    shards = _plan_shards(tensors, max_shard_bytes)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map = {n: fname for fname, names in shards for n in names}
    texts = {INDEX_NAME: {"metadata": {"total_size": total}, "weight_map": weight_map}, **(json_files or {})}
    texts = {name: json.dumps(doc, indent=2, sort_keys=True) + "\n" for name, doc in texts.items()}
    copies = {n: os.path.join(copy_from, n) for n in copied if copy_from and os.path.isfile(os.path.join(copy_from, n))}
    needed = total + sum(os.path.getsize(p) for p in copies.values()) + sum(len(t) for t in texts.values())
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    check_space(parent, needed)
    names = [f for f, _ in shards] + list(copies) + list(texts)
    tmp = temp_beside(dest, "save")
    mark = {"files": dict.fromkeys(names)}
    try:
        write_mark(tmp, "writing", mark["files"])
        for fname, members in shards:
            save_file({n: tensors[n] for n in members}, os.path.join(tmp, fname), metadata={"format": "pt", **metadata})
        for name, src in copies.items():
            shutil.copyfile(src, os.path.join(tmp, name))
        for name, text in texts.items():
            with open(os.path.join(tmp, name), "w") as fh:
                fh.write(text)
        _sync_files(tmp, names)
        write_mark(tmp, "complete", {n: os.path.getsize(os.path.join(tmp, n)) for n in names})
        pause_point("written")
        replace_dir(tmp, dest)
    except BaseException as exc:
        if os.path.isdir(tmp):
            remove_ours(tmp, mark)
        if _is_no_space(exc):
            raise UserError(_no_space(parent, needed, "ran out of space while writing")) from None
        raise
    return len(shards)


def check_space(parent: str, needed: int) -> None:
    """Refuse before writing when the filesystem's free space is known to be short."""
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return  # unknown: ENOSPC while writing is still caught
    if free < needed:
        raise UserError(_no_space(parent, needed, f"has {_mib(free)} free"))


def _is_no_space(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, from Python's writes or safetensors' (its error only says it in the message)."""
    if isinstance(exc, OSError):
        return exc.errno in _NO_SPACE
    text = str(exc)
    return isinstance(exc, Exception) and any(f"(os error {e})" in text for e in _NO_SPACE)


def _no_space(parent: str, needed: int, what: str) -> str:
    return (
        f"stages.save.path: {parent} {what}; the save needs {needed} bytes ({_mib(needed)}), "
        "beside any earlier save it replaces; free space there or choose a directory on another disk"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _sync_files(folder: str, names: list[str]) -> None:
    """Every file on disk before the mark says complete."""
    for name in names:
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _plan_shards(tensors: dict, max_bytes: int) -> list[tuple[str, list[str]]]:
    """(file name, tensor names) per shard, in order, each at most max_bytes unless one tensor is larger."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return [(f"model-{i:05d}-of-{len(shards):05d}.safetensors", names) for i, names in enumerate(shards, 1)]
