"""Find a checkpoint's files and the location of every tensor in them.

Accepts an HF-layout directory (config.json + model.safetensors, or shards listed
in model.safetensors.index.json) or a single .safetensors file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from ..errors import UserError
from .header import TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
SINGLE_NAME = "model.safetensors"
SHARD_NAME = re.compile(r"(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors")


@dataclass
class Checkpoint:
    path: str  # the directory (or the single file)
    files: list[str]  # absolute shard paths, in load order
    tensors: dict[str, TensorInfo]
    metadata: dict = field(default_factory=dict)
    format: str = "safetensors"
    pickled: dict | None = None  # format "pickle": name -> memory-mapped tensor from torch.load

    @property
    def bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def directory(self) -> str:
        return self.path if os.path.isdir(self.path) else os.path.dirname(self.path)

    def home_of_missing(self) -> str:
        """Where tensors the model needs but the checkpoint lacks should have been: the index, the sibling
        shards a lone shard file names, or the one file."""
        index = os.path.join(self.directory, INDEX_NAME)
        if os.path.isdir(self.path) and os.path.isfile(index):
            return f"{index} has no weight_map entry for them"
        if os.path.isdir(self.path) or self.format != "safetensors":
            return f"{self.files[0] if len(self.files) == 1 else self.path} does not hold them"
        shard = SHARD_NAME.fullmatch(os.path.basename(self.path))
        if shard is None:
            return f"{self.path} does not hold them"
        i, n = int(shard["i"]), int(shard["n"])
        others = [
            f"{shard['stem']}-{k:0{len(shard['i'])}d}-of-{shard['n']}.safetensors" for k in range(1, n + 1) if k != i
        ]
        more = f" (and {len(others) - 2} more)" if len(others) > 2 else ""
        return (
            f"{self.path} is shard {i} of {n}: the other shards ({', '.join(others[:2])}{more}) and "
            f"{INDEX_NAME} should hold them; point checkpoint.path at the directory"
        )

    def summary(self) -> dict:
        return {"path": self.path, "format": self.format, "files": len(self.files), "bytes": self.bytes}


def open_checkpoint(path: str, allow_pickle: bool = False) -> Checkpoint:
    """Read every header (no tensor bytes) and check the index against the shards.

    Pickle checkpoints (.bin/.pt) are refused unless `allow_pickle`, and then read only
    with torch.load(weights_only=True), memory-mapped (see checkpoint/pickled.py).
    """
    if not path or not str(path).strip():
        raise UserError("checkpoint.path: no checkpoint given (empty); set checkpoint.path=/path/to/model")
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise UserError(
            f"checkpoint.path: {path} does not exist; point checkpoint.path at a model directory or .safetensors file"
        )
    if os.path.isfile(path):
        if path.endswith(PICKLE_SUFFIXES):
            return _pickled(path, [path], allow_pickle)
        if not path.endswith(".safetensors"):
            raise UserError(
                f"checkpoint.path: {path} is not a .safetensors file (or a .bin/.pt with checkpoint.allow_pickle=true)"
            )
        tensors, meta = read_header(path)
        return Checkpoint(path, [path], tensors, meta)
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        return _open_sharded(path, index)
    single = os.path.join(path, SINGLE_NAME)
    if os.path.isfile(single):
        tensors, meta = read_header(single)
        return Checkpoint(path, [single], tensors, meta)
    pickles = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES) and not f.startswith("training_args"))
    if pickles:
        return _pickled(path, [os.path.join(path, f) for f in pickles], allow_pickle)
    shards = sorted(f for f in os.listdir(path) if SHARD_NAME.fullmatch(f))
    if shards:
        raise UserError(
            f"{path}: shard files ({', '.join(shards[:2])}{' ...' if len(shards) > 2 else ''}) but no {INDEX_NAME}, "
            f"which says which shard holds each tensor; restore it from where the checkpoint came from"
        )
    found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    hint = f" (found {', '.join(found[:3])}: only safetensors and opted-in pickles are loaded)" if found else ""
    raise UserError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME}{hint}; save the model with safetensors")


def _pickled(root: str, files: list[str], allow: bool) -> Checkpoint:
    if not allow:
        raise UserError(
            f"{files[0]}: a pickle checkpoint; pickles can run code, so they load only when asked: "
            f"set checkpoint.allow_pickle=true (read with torch.load(weights_only=True)) or convert to safetensors"
        )
    from .pickled import read_pickled

    tensors, infos = read_pickled(files)
    return Checkpoint(root, files, infos, {}, format="pickle", pickled=tensors)


def _open_sharded(root: str, index_path: str) -> Checkpoint:
    try:
        with open(index_path) as fh:
            index = json.load(fh)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(
            f"{index_path}: not a valid index (needs a JSON object with a weight_map); re-save the checkpoint"
        ) from None
    shard_of = {name: _inside(root, rel, index_path, name) for name, rel in weight_map.items()}
    shards = list(dict.fromkeys(shard_of.values()))
    tensors: dict[str, TensorInfo] = {}
    metadata: dict = {}
    for shard in shards:
        if not os.path.isfile(shard):
            raise UserError(
                f"{index_path}: names shard {os.path.relpath(shard, root)!r} which does not exist; restore the missing file"
            )
        found, meta = read_header(shard)
        metadata.update(meta)
        for name, info in found.items():
            if shard_of.get(name) == shard:
                tensors[name] = info
    missing = [n for n in weight_map if n not in tensors]
    if missing:
        raise UserError(
            f"{index_path}: tensor {missing[0]!r} is listed for {weight_map[missing[0]]!r} but that shard does not hold it"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return Checkpoint(root, shards, tensors, metadata)


def _inside(root: str, rel, index_path: str, name: str) -> str:
    """An index entry names a file inside the checkpoint directory (no absolute path, no '..'). That file may be
    a symlink to anywhere the user can read (a hub cache's blobs, another disk), as for a single file and for
    transformers: the index is the checkpoint's word, the symlinks are the filesystem's (docs/design.md)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise UserError(f"{index_path}: entry for {name!r} is not a file name ({rel!r})")
    if os.path.isabs(rel) or rel.startswith("\\"):
        raise UserError(
            f"{index_path}: entry for {name!r} is an absolute path ({rel!r}); shards must live inside the checkpoint directory"
        )
    if ".." in rel.replace("\\", "/").split("/"):
        raise UserError(
            f"{index_path}: entry for {name!r} ({rel!r}) leaves the checkpoint directory ('..'); refusing to read it; "
            "name a file inside the directory (a symlink there may point elsewhere)"
        )
    return os.path.join(root, os.path.normpath(rel))
