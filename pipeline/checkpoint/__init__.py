"""Checkpoint formats: safetensors headers and sharded indexes (read without tensor bytes), opted-in
pickles, synthetic checkpoints for benchmarks, and the built-in default model's recipe."""

from .layout import Checkpoint, TensorInfo, open_checkpoint

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint"]
