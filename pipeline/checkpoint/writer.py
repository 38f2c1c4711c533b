"""Write an HF-layout safetensors checkpoint directory, atomically: a temporary directory renamed into place.

A crash never leaves half a checkpoint at the destination; the source checkpoint is
never written to (the caller checks that the destination lies outside it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"


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
    (replacing it); returns the shard count."""
    parent = os.path.dirname(dest) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".save-", dir=parent)
    try:
        weight_map = _write_shards(tmp, tensors, max_shard_bytes, metadata)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(tmp, INDEX_NAME), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2, sort_keys=True)
        for name in copied:
            src = os.path.join(copy_from, name) if copy_from else None
            if src and os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, name))
        for name, doc in (json_files or {}).items():
            with open(os.path.join(tmp, name), "w") as fh:
                json.dump(doc, fh, indent=2, sort_keys=True)
                fh.write("\n")
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(set(weight_map.values()))


def _write_shards(folder: str, tensors: dict, max_bytes: int, metadata: dict) -> dict[str, str]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, os.path.join(folder, fname), metadata={"format": "pt", **metadata})
        weight_map.update(dict.fromkeys(names, fname))
    return weight_map
