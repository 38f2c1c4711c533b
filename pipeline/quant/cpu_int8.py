"""LLM.int8's int8 x int8 -> int32 matmul on the CPU, exact on every CPU.

bitsandbytes 0.50 picks its CPU kernel by torch's CPU capability: `torch._int_mm` (exact
int32) on AVX-512, else one fp32 matmul of the int8 codes cast to float. fp32 holds integers
exactly only up to 2**24, so once a dot product's partial sums pass that (K > 1024 with large
codes), the fallback rounds and AVX2 machines get other int32 results than AVX-512 ones
(tests/test_cpu_paths.py shows one). We register our own CPU kernel where bitsandbytes would
fall back: the same fp32 matmul in slices of K short enough that every partial sum is an
integer below 2**24, so the result is exact whatever order the BLAS sums in, and equal to
`torch._int_mm`'s. Everything else in the layer stays bitsandbytes' own (modules, Int8Params,
CB/SCB, quantization of the activations, outlier columns, dequantization).

`quantization.cpu_matmul=bitsandbytes` restores bitsandbytes' own choice (for comparing with
another library's int8 model on an AVX2 machine bit for bit). The kernel is registered once per
process and the choice is process-wide: the last int8 model built sets it.
"""

from __future__ import annotations

import torch

from .spec import CPU_MATMULS

# |code| <= 128, so a slice of K <= 1024 keeps every partial sum of products below 2**24 (= 1024 * 128 * 128)
EXACT_SLICE = (1 << 24) // (128 * 128)

_mode = {"matmul": "exact", "registered": False}


def int8_matmul_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., K] int8 @ b [N, K] int8 -> int32 [..., N], exactly (fp32 BLAS on K-slices, summed in int32)."""
    a2 = a.reshape(-1, a.shape[-1])
    out = None
    for k in range(0, a2.shape[1], EXACT_SLICE):
        part = torch.matmul(a2[:, k : k + EXACT_SLICE].float(), b[:, k : k + EXACT_SLICE].float().t())
        part = part.to(torch.int32)
        out = part if out is None else out.add_(part)
    if out is None:  # K == 0
        out = torch.zeros(a2.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    return out.reshape(*a.shape[:-1], b.shape[0])


def bitsandbytes_fallback(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' own CPU fallback (backends/default/ops.py): one fp32 matmul, exact only below 2**24."""
    return torch.matmul(a.float(), b.float().t()).to(torch.int32)


def bitsandbytes_uses_int_mm() -> bool:
    """Whether bitsandbytes registered torch._int_mm for the CPU (exact already; we leave it alone)."""
    return torch.__version__ >= (2, 6) and torch.backends.cpu.get_cpu_capability() == "AVX512"


def use_cpu_matmul(mode: str) -> None:
    """Choose the CPU int8 matmul for this process: exact (ours where bitsandbytes falls back) or bitsandbytes."""
    if mode not in CPU_MATMULS:
        raise ValueError(f"cpu_matmul {mode!r}: one of {CPU_MATMULS}")
    _mode["matmul"] = mode
    if _mode["registered"] or bitsandbytes_uses_int_mm():
        return
    torch.library.register_kernel("bitsandbytes::int8_linear_matmul", "cpu", _cpu_kernel)
    _mode["registered"] = True


def _cpu_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if _mode["matmul"] == "bitsandbytes":
        return bitsandbytes_fallback(a, b)
    return int8_matmul_exact(a, b)
