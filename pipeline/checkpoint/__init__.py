"""Reading checkpoints: safetensors headers, sharded indexes, tensor locations."""
from .layout import Checkpoint, TensorInfo, open_checkpoint

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint"]
