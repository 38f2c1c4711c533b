"""Portable CPU numerics for int8 models: the same logits on every CPU.

LLM.int8 rounds activations, so last-bit differences in the float work around its layers (torch's reductions
and transcendental functions depend on the vector width, MKL picks its GEMM path by CPU) become other int8
codes a few layers later (issue 15). While validate measures (`portable_numerics`, a TorchDispatchMode, so it
covers any architecture), every order-dependent op on CPU float tensors (`FP64_OPS`) is computed in fp64 and
rounded once. It belongs to the measurement, not to the model (issue 30: fp64 made generate about 3x slower).
Why and what was measured: docs/design.md, "Portable CPU numerics for int8 models".
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten

# Ops whose CPU result depends on the vector width, MKL's code path or the thread count:
# reductions, GEMMs and convolutions, transcendental functions (torch hands some to MKL's
# VML). Named at the level the mode sees them (a composite op such as `linear` or `softmax`
# reaches it before its decomposition, and its decomposition then runs as one call). Found by
# hashing every op's inputs and outputs over 17 architectures under ATEN_CPU_CAPABILITY=
# avx512/avx2/default and MKL's AVX2 path (docs/quantization.md); the rest of the list are the
# same kinds of op (every reduction, every such function), since a new model may call them.
_OPS = {
    "scaled_dot_product_attention": ("default",),
    "_scaled_dot_product_flash_attention_for_cpu": ("default",),
    "softmax": ("int",),
    "_softmax": ("default",),
    "log_softmax": ("int",),
    "_log_softmax": ("default",),
    "layer_norm": ("default",),
    "native_layer_norm": ("default",),
    "group_norm": ("default",),
    "native_group_norm": ("default",),
    "rms_norm": ("default",),
    "sum": ("default", "dim_IntList"),
    "mean": ("default", "dim"),
    "var": ("default", "dim", "correction"),
    "std": ("default", "dim", "correction"),
    "norm": ("Scalar", "ScalarOpt_dim"),
    "logsumexp": ("default",),
    "cross_entropy_loss": ("default",),
    "nll_loss": ("default",),
    "silu": ("default",),
    "gelu": ("default",),
    "sigmoid": ("default",),
    "tanh": ("default",),
    "erf": ("default",),
    "exp": ("default",),
    "expm1": ("default",),
    "log": ("default",),
    "log1p": ("default",),
    "sin": ("default",),
    "cos": ("default",),
    "pow": ("Tensor_Scalar", "Tensor_Tensor", "Scalar"),
    "softplus": ("default",),
    "mish": ("default",),
    "elu": ("default",),
    "conv1d": ("default",),
    "conv2d": ("default",),
    "convolution": ("default",),
    "bmm": ("default",),
    "baddbmm": ("default",),
    "einsum": ("default",),
}
FP64_OPS = frozenset(getattr(getattr(aten, name), o) for name, overloads in _OPS.items() for o in overloads)
# GEMMs whose second operand may be a weight: in fp64 by column blocks, so a large head never
# needs a whole fp64 copy of its weight at once.
GEMMS = frozenset({aten.linear.default, aten.matmul.default, aten.mm.default, aten.addmm.default})
BLOCK_BYTES = 64 << 20  # fp64 bytes of one weight block
LOW_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _is_cpu_float(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in LOW_FLOATS and x.device.type == "cpu"


def _to_fp64(x):
    """CPU float tensors to fp64, and a low-float dtype argument (softmax's `dtype=`) with them."""
    if isinstance(x, torch.dtype):
        return torch.float64 if x in LOW_FLOATS else x
    return x.double() if _is_cpu_float(x) else x


def _to_meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) else x


def result_dtype(args, kwargs) -> torch.dtype:
    """The floating dtype an op returns on these inputs: its `dtype=` argument, else the promoted dtype of
    its float tensors (what torch gives every op in FP64_OPS with one output)."""
    asked = kwargs.get("dtype")
    if isinstance(asked, torch.dtype):
        return asked
    floats = [a.dtype for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor) and a.is_floating_point()]
    return functools.reduce(torch.promote_types, floats)


def in_fp64(func, args, kwargs):
    """func computed in fp64, each floating output cast to the dtype func gives on the original inputs."""
    out = func(*tree_map(_to_fp64, args), **tree_map(_to_fp64, kwargs))
    if isinstance(out, torch.Tensor):
        return out.to(result_dtype(args, kwargs)) if out.is_floating_point() else out
    like = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))  # several outputs: their dtypes, no compute

    def back(o, m):
        return o.to(m.dtype) if isinstance(o, torch.Tensor) and o.dtype.is_floating_point else o

    return type(out)(back(o, m) for o, m in zip(out, like, strict=True))


def gemm_in_fp64(func, args, kwargs):
    """linear/matmul/mm/addmm in fp64 over blocks of the output's last dim, each block rounded once."""
    dtype = result_dtype(args, kwargs)
    if func is aten.linear.default:  # (x, weight [N, K], bias [N]): the output's columns are weight rows
        x, w, bias = (list(args) + [None])[:3]
        cols = w.shape[0]

        def block(j, k):
            return aten.linear.default(x.double(), w[j:k].double(), None if bias is None else bias[j:k].double())

    elif func is aten.addmm.default:  # (bias, a, b [K, N])
        bias, a, w = args[:3]
        cols = w.shape[-1]
        bias = bias.expand(a.shape[0], cols)

        def block(j, k):
            return aten.addmm.default(_to_fp64(bias[:, j:k]), _to_fp64(a), _to_fp64(w[:, j:k]), **kwargs)

    else:  # matmul, mm: (a, b [..., K, N])
        a, w = args[:2]
        if w.dim() < 2:
            return in_fp64(func, args, kwargs)
        cols = w.shape[-1]

        def block(j, k):
            return func(_to_fp64(a), _to_fp64(w[..., j:k]))

    step = max(1, BLOCK_BYTES // max(1, w.numel() // max(cols, 1) * 8))
    parts = [block(j, min(j + step, cols)).to(dtype) for j in range(0, cols, step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def grouped_mm_in_fp64(func, args, kwargs):
    """torch._grouped_mm (fused MoE experts: rows of `a` by group @ each group's weight) in fp64.

    torch has no fp64 kernel for it; each group is a GEMM, done as the other GEMMs are. Layouts
    other than 2D activations x 3D expert weights, and a bias, run torch's own kernel."""
    a, w = args[:2]
    offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
    if a.dim() != 2 or w.dim() != 3 or offs is None or kwargs.get("bias") is not None or len(args) > 3:
        return func(*args, **kwargs)
    out = torch.empty(a.shape[0], w.shape[-1], dtype=kwargs.get("out_dtype") or a.dtype)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = gemm_in_fp64(aten.mm.default, (a[start:end], w[g]), {})
        start = end
    return out


def mixed_scaled_mm(A, CA, CB, SCA, SCB, outlier_cols=None, bias=None):
    """bitsandbytes' int8_mixed_scaled_mm with the outlier columns' product in fp64, rounded once."""
    out = torch.ops.bitsandbytes.int8_scaled_mm.default(CA, CB, SCA, SCB, bias=bias, dtype=A.dtype)
    if outlier_cols is None or not outlier_cols.numel():
        return out, torch.empty(0, device=A.device, dtype=A.dtype)
    sub_a = A[:, outlier_cols].contiguous()
    sub_b = torch.ops.bitsandbytes.int8_vectorwise_dequant.default(CB[:, outlier_cols].contiguous(), SCB)
    return out + (sub_a.double() @ sub_b.to(A.dtype).double().t()).to(out.dtype), sub_a


def portable_call(func, args, kwargs):
    """func(*args, **kwargs), in fp64 and rounded once where its CPU result would depend on the CPU."""
    if func is _mixed_mm_op() and _is_cpu_float(args[0]):
        return mixed_scaled_mm(*args, **kwargs)
    if func in GEMMS and any(_is_cpu_float(a) for a in args):
        return gemm_in_fp64(func, args, kwargs)
    if func is aten._grouped_mm.default and _is_cpu_float(args[0]):
        return grouped_mm_in_fp64(func, args, kwargs)
    if func in FP64_OPS and any(_is_cpu_float(a) for a in tree_flatten((args, kwargs))[0]):
        return in_fp64(func, args, kwargs)
    return func(*args, **kwargs)


class PortableNumerics(TorchDispatchMode):
    """Runs the ops whose CPU result depends on the CPU in fp64, rounded once (portable_call), except
    while `state["native"]` is set (the output head, see portable_numerics)."""

    def __init__(self, state: dict | None = None):
        super().__init__()
        self.state = state if state is not None else {"native": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.state["native"]:
            return func(*args, **(kwargs or {}))
        return portable_call(func, args, kwargs or {})


@functools.cache
def _mixed_mm_op():
    from .bnb import import_bitsandbytes

    import_bitsandbytes()
    return torch.ops.bitsandbytes.int8_mixed_scaled_mm.default


@contextlib.contextmanager
def portable_numerics(model: torch.nn.Module):
    """While the block runs, `model` (and any other CPU work) computes under PortableNumerics.

    validate enters it around its measurements only (measure/metrics.py), so report.json is the same
    on every CPU while the model handed back keeps torch's and bitsandbytes' own kernels: its class's
    forward, no mode, no hook left after the block. The output head runs torch's own kernel: it is the
    forward's last op and nothing quantized reads its output, so a CPU's other summation order stays a
    last-bit difference in the logits (measured 6.5e-7 relative) instead of being amplified; in fp64 it
    would cost a converted copy of the largest weight at every decoding step."""
    state = {"native": 0}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    hooks = []
    if isinstance(head, torch.nn.Module):
        hooks.append(head.register_forward_pre_hook(lambda *_: _count(state, +1)))
        hooks.append(head.register_forward_hook(lambda *_: _count(state, -1), always_call=True))  # also on a raise
    try:
        with PortableNumerics(state):
            yield model
    finally:
        for hook in hooks:
            hook.remove()


def _count(state: dict, step: int) -> None:
    state["native"] += step


def measured_portably(spec, tensors) -> bool:
    """Whether validate measures under portable_numerics: int8, cpu_numerics=portable, and some int8 layer planned
    on the CPU (`tensors`: the plan's PlannedTensors); elsewhere every kernel is the device's own anyway."""
    return spec.is_int8 and spec.cpu_numerics == "portable" and int8_on_cpu(tensors)


def int8_on_cpu(tensors) -> bool:
    return any(t.quantized == "int8" and t.device == "cpu" for t in tensors)
