"""LLM.int8's int8 x int8 -> int32 matmul on the CPU, exact on every CPU.

bitsandbytes' CPU kernel is not exact everywhere: its fp32 fallback rounds once partial sums pass 2**24
(tests/test_cpu_paths.py shows one), and `torch._int_mm` saturates on oneDNN without AVX-512 VNNI. So we
register our own kernel for the op: `torch._int_mm` where a probe at first use shows it exact, otherwise the
fp32 matmul in K-slices short enough to be exact; the rest of the layer stays bitsandbytes' own.
`quantization.cpu_matmul=bitsandbytes` restores bitsandbytes' choice; the choice is process-wide (the last
int8 model built sets it). docs/design.md, "Our CPU int8 matmul".
"""

from __future__ import annotations

import functools
import warnings

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
    """Whether bitsandbytes registers torch._int_mm for the CPU (backends/cpu/ops.py: AVX-512 and torch >= 2.6)."""
    return torch.__version__ >= (2, 6) and torch.backends.cpu.get_cpu_capability() == "AVX512"


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch._int_mm as bitsandbytes calls it: a [..., K] @ b [N, K]."""
    return torch._int_mm(a.reshape(-1, a.shape[-1]), b.t()).reshape(*a.shape[:-1], b.shape[0])


@functools.cache
def int_mm_is_exact() -> bool:
    """Whether torch._int_mm gives exact int32 on this CPU: worst-case and random codes against int64."""
    if not bitsandbytes_uses_int_mm():
        return False  # without AVX-512 torch._int_mm is a slow scalar loop (bitsandbytes' own reason)
    g = torch.Generator().manual_seed(0)
    worst = torch.full((32, 256), 127, dtype=torch.int8), torch.full((32, 256), -128, dtype=torch.int8)
    cases = [(worst[0], worst[0]), (worst[1], worst[1]), (worst[0], worst[1])]
    cases.append(tuple(torch.randint(-128, 128, (32, 2048), generator=g, dtype=torch.int8) for _ in range(2)))
    try:
        return all(torch.equal(int_mm(a, b).long(), a.long() @ b.long().t()) for a, b in cases)
    except RuntimeError:  # no CPU kernel for it in this build
        return False


def int8_matmul_exact_fast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 product: torch._int_mm where this CPU computes it exactly, else fp32 K-slices."""
    return int_mm(a, b) if int_mm_is_exact() else int8_matmul_exact(a, b)


def use_cpu_matmul(mode: str) -> None:
    """Choose the CPU int8 matmul for this process: exact (ours) or bitsandbytes' own choice."""
    if mode not in CPU_MATMULS:
        raise ValueError(f"cpu_matmul {mode!r}: one of {CPU_MATMULS}")
    _mode["matmul"] = mode
    if _mode["registered"] or (bitsandbytes_uses_int_mm() and int_mm_is_exact()):
        return  # bitsandbytes' own torch._int_mm is exact on this CPU: nothing to replace
    _register_cpu_kernel(_cpu_kernel)
    _mode["registered"] = True


def _register_cpu_kernel(kernel) -> None:
    """Our kernel for bitsandbytes::int8_linear_matmul on the CPU, also over bitsandbytes' own one
    (torch 2.13 overrides with a warning; older torch refuses register_kernel, but not a Library impl
    that asks to override)."""
    with warnings.catch_warnings():  # "overriding a previously registered kernel": bitsandbytes' own, on purpose
        warnings.simplefilter("ignore", UserWarning)
        try:
            torch.library.register_kernel("bitsandbytes::int8_linear_matmul", "cpu", kernel)
        except RuntimeError:
            lib = torch.library.Library("bitsandbytes", "IMPL")
            lib.impl("int8_linear_matmul", kernel, "CPU", allow_override=True)
            _mode["library"] = lib  # the registration lives as long as its Library


def _cpu_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if _mode["matmul"] == "bitsandbytes":
        return int_mm(a, b) if bitsandbytes_uses_int_mm() else bitsandbytes_fallback(a, b)
    return int8_matmul_exact_fast(a, b)
