"""Test helpers: tiny checkpoints of real transformers architectures, corrupt-file tools, the CLI in a subprocess."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _configs():
    from transformers import (
        BloomConfig,
        BloomForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    return {
        "llama": (
            LlamaForCausalLM,
            LlamaConfig(
                vocab_size=256,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
                max_position_embeddings=128,
            ),
        ),
        "gpt2": (
            GPT2LMHeadModel,
            GPT2Config(vocab_size=256, n_embd=64, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
        ),
        "bloom": (BloomForCausalLM, BloomConfig(vocab_size=256, hidden_size=64, n_layer=3, n_head=4)),
        "t5": (
            T5ForConditionalGeneration,
            T5Config(
                vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0
            ),
        ),
    }


ARCHS = ["llama", "gpt2", "bloom", "t5"]


def make_checkpoint(arch: str, dest: Path, dtype=torch.float32, shards: int = 3, seed: int = 0) -> Path:
    """Save a randomly initialised model of a real architecture, split into >= `shards` files."""
    cls, config = _configs()[arch]
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(dest, max_shard_size=max(total // (shards + 1), 1))
    n = len(list(dest.glob("*.safetensors")))
    assert n >= shards, f"{arch}: only {n} shards"
    return dest


def tree_digest(path: Path) -> str:
    """Hash of every file's name, size and bytes: proves a directory was not written to."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def with_extra_tensor(src: Path, dest: Path) -> Path:
    """A copy of a sharded checkpoint plus one tensor no model parameter takes (the source is untouched)."""
    import json
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dest)
    save_file({"extra.weight": torch.zeros(2)}, dest / "extra.safetensors")
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra.weight"] = "extra.safetensors"
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


def rewrite_header(shard: Path, mutate) -> None:
    """Apply `mutate` to a safetensors file's JSON header in place (for corrupt-file tests)."""
    import json
    import struct

    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    mutate(header)
    blob = json.dumps(header).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    shard.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PIPELINE_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
