"""Write synthetic HF-layout checkpoints of real architectures, for benchmarks and plan tests.

`sparse=True` writes real safetensors headers and leaves the data as a hole in the
file (no disk used, nothing to read): enough to plan a 70B model on a laptop.
Otherwise the data is random (normal * 0.02) and the files load like any checkpoint.

    python -m pipeline.checkpoint.synthetic --shape llama-70b --sparse /tmp/llama70b
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct

import torch

from ..dtypes import SAFETENSORS_DTYPES, itemsize

_SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
# Llama-2-7B / 70B shapes, and smaller ones for CPU benchmarks and tests, in _SHAPE_FIELDS order.
SHAPES = {
    name: dict(zip(_SHAPE_FIELDS, values, strict=True))
    for name, values in {
        "llama-7b": (32000, 4096, 11008, 32, 32, 32),
        "llama-70b": (32000, 8192, 28672, 80, 64, 8),
        "llama-400m": (32000, 1024, 4096, 20, 16, 16),
        "llama-tiny": (256, 64, 128, 3, 4, 2),
    }.items()
}
_ST_NAME = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def llama_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(
        **SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False, architectures=["LlamaForCausalLM"]
    )


def tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """State-dict names and shapes of the model `config` describes, from a meta skeleton."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(config)
    return [(n, tuple(t.shape)) for n, t in model.state_dict().items()]


def write_checkpoint(
    dest: str,
    shape: str = "llama-7b",
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 10**9,
    sparse: bool = False,
    seed: int = 0,
) -> str:
    os.makedirs(dest, exist_ok=True)
    config = llama_config(shape)
    config.dtype = str(dtype).removeprefix("torch.")
    tensors = tensor_shapes(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in tensors:
        n = math.prod(shp) * itemsize(dtype)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += n
    gen = torch.Generator().manual_seed(seed)
    # Random values from a 64 Mi-element pool, each tensor starting at another offset: a 7B
    # checkpoint is written in seconds, and its values still look like trained weights to int8.
    pool = None if sparse else (torch.randn(2**26, generator=gen) * 0.02).to(dtype)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(os.path.join(dest, fname), shard, dtype, pool)
        weight_map.update({name: fname for name, _ in shard})
    total = sum(math.prod(s) * itemsize(dtype) for _, s in tensors)
    with open(os.path.join(dest, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    config.save_pretrained(dest)
    return dest


def _write_shard(path, shard, dtype, pool) -> None:
    header, offset = {}, 0
    for name, shp in shard:
        n = math.prod(shp) * itemsize(dtype)
        header[name] = {"dtype": _ST_NAME[dtype], "shape": list(shp), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        if pool is None:
            fh.truncate(8 + len(blob) + offset)
            return
        raw = pool.view(torch.uint8).numpy()
        for k, (_name, shp) in enumerate(shard):
            left = math.prod(shp) * itemsize(dtype)
            pos = (k * 7919 * itemsize(dtype)) % len(raw)
            while left:
                n = min(left, len(raw) - pos)
                fh.write(memoryview(raw[pos : pos + n]))
                left -= n
                pos = 0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest")
    ap.add_argument("--shape", default="llama-7b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    ap.add_argument("--sparse", action="store_true", help="headers only; data left as a hole")
    a = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    print(write_checkpoint(a.dest, a.shape, dtype, int(a.max_shard_gb * 10**9), a.sparse))


if __name__ == "__main__":
    main()
