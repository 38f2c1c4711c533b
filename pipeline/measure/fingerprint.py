"""What the metric cache checks before it reports a number: the loaded weights' fingerprint and the shards' content.

A cached figure is only true of the weights it was measured on, and keys cannot tell (a shard rewritten in
place with its mtime restored), so the loaded weights are fingerprinted where they live (sha256 on the CPU, a
keyed word sum on a GPU, never a copy to the host); the reference, never loaded as weights, is keyed by the
shards' bytes (`content_digest`). docs/design.md, "The metric cache".
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch

_M = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _M
    return value - (1 << 64) if value >> 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL = _signed(0xBF58476D1CE4E5B9)
_BLOCK = 64 << 20  # bytes per hashed block of a shard
_THREADS = max(1, min(8, os.cpu_count() or 1))  # hashlib threads (weights and shards alike)


def weights_fingerprint(model: torch.nn.Module, offload, key: int) -> tuple[str, int]:
    """(hex digest, bytes read) of every tensor the loaded model computes with, named; equal iff the same weights."""
    key = _signed(key)
    resident = list(_resident(model, offload))
    lines, total = _digests(resident, key)
    for name, read in _on_disk(offload):  # one at a time: never all of the offloaded weights in memory
        tensor = read()
        lines.append(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{_digest(tensor, key)}")
        total += tensor.numel() * tensor.element_size()
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32], total


def _resident(model: torch.nn.Module, offload):
    """(name, tensor) of the state dict (bitsandbytes adds SCB and quant state there), buffers, offloaded CPU copies."""
    named = dict(model.state_dict(keep_vars=True))
    named.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    if offload is not None:
        named.update({f"offload:{n}": t for n, t in dict.items(offload.state_dict)})
    for name in sorted(named):
        tensor = named[name]
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            yield name, tensor


def _on_disk(offload):
    """(name, reader) of each tensor accelerate reads from the checkpoint's files at forward time."""
    if offload is None:
        return
    for name in sorted(offload.index):
        yield f"disk:{name}", lambda name=name: offload[name]
    for name, build in sorted(getattr(offload.state_dict, "build", {}).items()):
        yield f"disk:{name}", build


def _digests(named: list, key: int) -> tuple[list[str], int]:
    """One line per tensor; each storage view digested once (tied weights), CPU ones in parallel threads."""
    first: dict = {}
    for i, (_, t) in enumerate(named):
        first.setdefault(_ident(t), i)
    unique = sorted(set(first.values()))
    with ThreadPoolExecutor(_THREADS) as pool:
        done = dict(zip(unique, pool.map(lambda i: _digest(named[i][1], key), unique), strict=True))
    lines = [f"{n}|{t.dtype}|{tuple(t.shape)}|{done[first[_ident(t)]]}" for n, t in named]
    return lines, sum(named[i][1].numel() * named[i][1].element_size() for i in unique)


def _ident(t: torch.Tensor) -> tuple:
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _digest(tensor: torch.Tensor, key: int) -> str:
    """The tensor's raw bytes, digested where they are: sha256 on the CPU (no torch thread pool to contend for);
    on a GPU, a keyed sum over them as int64 words (_keyed_sum), never a copy to the host."""
    raw = tensor.detach().as_subclass(torch.Tensor).contiguous().reshape(-1).view(torch.uint8)
    if raw.device.type == "cpu":
        return hashlib.sha256(raw.numpy()).hexdigest()[:32]
    if raw.numel() % 8:
        raw = torch.cat([raw, raw.new_zeros(-raw.numel() % 8)])
    return str(int(_keyed_sum(raw.view(torch.int64), key)))


def _keyed_sum(words: torch.Tensor, key: int) -> torch.Tensor:
    """sum over chunks c of (2c+1) * sum_i mix(word_i ^ key_i): order, position and every bit count.

    In place, in chunks of 128 MiB: five passes over the tensor, no allocation beyond two chunk buffers."""
    chunk = max(1, min(words.numel(), 1 << 24))
    keys = torch.arange(chunk, device=words.device, dtype=torch.int64).mul_(_GOLDEN).add_(key)
    mixed, shifted = torch.empty_like(keys), torch.empty_like(keys)
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    for index, start in enumerate(range(0, words.numel(), chunk)):
        part = words[start : start + chunk]
        n = part.numel()
        m, s = mixed[:n], shifted[:n]
        torch.bitwise_xor(part, keys[:n], out=m)
        m.mul_(_MUL)
        torch.bitwise_right_shift(m, 32, out=s)
        total += m.bitwise_xor_(s).sum() * (2 * index + 1)
    return total


def content_digest(paths) -> tuple[str, int]:
    """(sha256 over every file's name, size and bytes, bytes hashed): 64 MiB blocks hashed in parallel threads."""
    files = sorted(os.path.abspath(p) for p in paths)
    blocks = [(p, off) for p in files for off in range(0, max(os.path.getsize(p), 1), _BLOCK)]
    with ThreadPoolExecutor(_THREADS) as pool:
        parts = list(pool.map(lambda b: _block_digest(*b), blocks))
    digest = hashlib.sha256()
    for (path, off), part in zip(blocks, parts, strict=True):
        digest.update(f"{path}|{off}|{part}\n".encode())
    return digest.hexdigest()[:32], sum(os.path.getsize(p) for p in files)


def _block_digest(path: str, offset: int) -> str:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return hashlib.sha256(fh.read(_BLOCK)).hexdigest()
