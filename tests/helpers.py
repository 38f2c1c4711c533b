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


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
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


BNB_KINDS = {
    "int8": {"load_in_8bit": True},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "nf4-single": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False},
}


def save_bnb_quantized(src: Path, dest: Path, kind: str, shards: int = 3) -> Path:
    """What a user downloads as a pre-quantized model: transformers quantizes `src` with bitsandbytes
    (BitsAndBytesConfig) on the CPU and writes it with save_pretrained, in 2+ shards (about `shards`)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(**BNB_KINDS[kind]))
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(dest, max_shard_size=max(total // shards, 1))
    assert len(list(dest.glob("*.safetensors"))) >= 2
    return dest


def bnb_reference(path: Path):
    """transformers' from_pretrained of a pre-quantized directory, with bitsandbytes' CPU repacking off (int8
    runs torch's and bitsandbytes' own kernels, as the pipeline's int8 models do).

    On CPUs with AVX512-BF16, Linear4bit repacks its weight at the first forward (absmax to bf16, double
    quantization undone) and multiplies through another kernel; the pipeline keeps the saved layout so its
    plan stays exact (pipeline/quant/bnb.py). Turning the repack off in the reference compares the same
    computation; the tensors themselves are compared before any forward.
    """
    from transformers import AutoModelForCausalLM

    from pipeline.quant.bnb import import_bitsandbytes

    bnb = import_bitsandbytes()
    model = AutoModelForCausalLM.from_pretrained(path)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def assert_same_tensors(ours: torch.nn.Module, theirs: torch.nn.Module) -> int:
    """Every state_dict entry equal in name, dtype and bits (bitsandbytes layers include their int8 SCB or
    4-bit absmax, quant_map, nested stats and packed quant_state); returns how many were compared."""
    a, b = ours.state_dict(), theirs.state_dict()
    assert sorted(a) == sorted(b)
    for key, value in b.items():
        assert a[key].dtype == value.dtype and torch.equal(a[key].cpu(), value.cpu()), key
    return len(b)


HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_snapshot(src: Path, cache: Path, repo: str = "tiny/llama", revision: str = HUB_REVISION) -> Path:
    """`src` laid out as huggingface_hub's cache keeps a download: blobs by sha256, the snapshot's files as
    relative symlinks into ../../blobs, refs/main naming the revision. Returns the snapshot directory."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        (root / "blobs" / digest).write_bytes(f.read_bytes())
        os.symlink(f"../../blobs/{digest}", snapshot / f.name)
    return snapshot
