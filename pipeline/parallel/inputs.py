"""What cannot be combined with tensor parallel, refused at plan time (exit 2) before any tensor byte is read.

Every rank keeps all of its shards on its own device and runs every layer: there is
no device map to choose and nothing to offload. Saved int8 and 4-bit checkpoints,
4-bit quantization and pickle files are not sharded (yet).
"""

from __future__ import annotations

from ..errors import UserError
from ..quant.spec import QuantSpec
from ..sizes import MaxMemory
from .spec import ParallelSpec

STRATEGIES = ("auto", "cpu")


def check_inputs(
    parallel: ParallelSpec, *, strategy: str, explicit_map, max_memory: MaxMemory, checkpoint, spec: QuantSpec
) -> None:
    on_gpu = parallel.device_type == "cuda"
    if strategy not in STRATEGIES or (strategy == "cpu" and on_gpu) or explicit_map:
        own = "auto (the rank's own GPU)" if on_gpu else "auto or cpu"
        raise UserError(
            f"device_map={strategy}: with parallel=tensor every rank holds its shards on its own device; "
            f"use device_map={own}, or parallel=none for a device map"
        )
    offload = [k for k in max_memory.devices if k == "disk" or (k == "cpu" and on_gpu)]
    if offload:
        raise UserError(
            f"memory.max_memory.{offload[0]}: tensor parallel does not offload (each rank holds its shards on its "
            "GPU); drop the cpu/disk caps, or use parallel=none to offload"
        )
    gpus = [k for k in max_memory.devices if k.isdigit()]
    if gpus and not on_gpu:
        raise UserError(
            f"memory.max_memory.{gpus[0]}: the ranks run on the CPU (parallel.device=cpu or no GPU here); "
            "give a cpu cap, or parallel.device=cuda"
        )
    if checkpoint.format != "safetensors":
        raise UserError(
            f"{checkpoint.path}: tensor parallel reads byte ranges of safetensors files; this checkpoint is a "
            "pickle: convert it to safetensors"
        )
    if spec.prequantized or spec.is_four_bit:
        what = "a saved int8 checkpoint" if spec.prequantized else f"quantization={spec.method}"
        raise UserError(f"parallel=tensor: {what} is not sharded yet; use quantization=none or int8, or parallel=none")
