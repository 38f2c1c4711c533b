"""What a run depended on, for report.json `environment`: package versions, the CPU code path
torch (and bitsandbytes, which asks torch) chose, bitsandbytes' native backend, the GPUs.

A figure in a report is only comparable with another measured on the same stack; this says
which stack, without importing anything the run did not import itself.
"""

from __future__ import annotations

import os
import platform
import sys

from ..hf.version import NEWEST_TESTED, OLDEST, in_tested_range, package_version

PACKAGES = (
    "hydra-model-loader",
    "torch",
    "transformers",
    "accelerate",
    "safetensors",
    "bitsandbytes",
    "hydra-core",
    "omegaconf",
    "huggingface_hub",
    "tokenizers",
    "numpy",
    "gguf",
    "sentencepiece",
    "peft",
)


def environment() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "transformers_tested": {"oldest": OLDEST, "newest": NEWEST_TESTED, "in_range": in_tested_range()},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
        "torch_threads": torch.get_num_threads(),
        "cuda": _cuda(torch),
        "bitsandbytes_backend": _bitsandbytes_backend(),
    }


def _cuda(torch) -> dict | None:
    """CUDA version and device names, only when this run started CUDA (asking would start it)."""
    if not torch.cuda.is_initialized():
        return None
    return {
        "version": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


def _bitsandbytes_backend() -> str | None:
    """bitsandbytes' native library ("cpu", "cuda", ...), when this run imported bitsandbytes."""
    ext = sys.modules.get("bitsandbytes.cextension")
    if ext is None:
        return None
    lib = getattr(ext, "lib", None)
    return f"{getattr(ext, 'BNB_BACKEND', '?')} ({type(lib).__name__})".lower() if lib is not None else None
