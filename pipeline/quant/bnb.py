"""bitsandbytes glue: empty quantized modules, and weights quantized on their own device.

Imported lazily and quietly (its CPU backend warns about optional kernels we do not use).
"""

from __future__ import annotations

import functools
import logging

import torch

from ..dtypes import policy_dtype
from .cpu_int8 import use_cpu_matmul
from .spec import QuantSpec


@functools.cache  # setLevel clears every logger's cache: once, not per module built (it cost 2 s of auto's search)
def import_bitsandbytes():
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # "inputs will be cast from bfloat16 to float16": inherent to LLM.int8, said once in the docs, not per layer
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


def empty_module(old: torch.nn.Module, spec: QuantSpec, threshold: float | None = None) -> torch.nn.Module:
    """The bitsandbytes module that replaces Linear `old` (build it under init_empty_weights)."""
    bnb = import_bitsandbytes()
    bias = old.bias is not None
    if isinstance(old, torch.nn.Linear):
        in_features, out_features = old.in_features, old.out_features
    else:  # GPT-2's Conv1D keeps its weight as (in, out); its quantized weight is (out, in), as in transformers
        in_features, out_features = old.weight.shape
    if spec.is_int8:
        use_cpu_matmul(spec.cpu_matmul)  # exact int32 on every CPU (quant/cpu_int8.py)
        new = bnb.nn.Linear8bitLt(
            in_features,
            out_features,
            bias=bias,
            has_fp16_weights=False,
            threshold=spec.threshold if threshold is None else threshold,
        )
    else:
        new = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=bias,
            compute_dtype=policy_dtype(spec.compute_dtype, "quantization.compute_dtype"),
            compress_statistics=spec.double_quant,
            quant_type=spec.method,
        )
    new.source_cls = type(old)  # what transformers records (its save and dequantize read it)
    return new


def set_int8_thresholds(model: torch.nn.Module, thresholds: dict[str, float], threshold: float) -> None:
    """A loaded int8 model's outlier threshold, changed in place (it acts at forward time; the int8 weights and
    their scales do not depend on it): `threshold` everywhere except the per-module `thresholds`."""
    bnb = import_bitsandbytes()
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            module.state.threshold = thresholds.get(name, threshold)


def quantize_int8(weight: torch.Tensor):
    """LLM.int8 row-wise quantization on the weight's own device, exactly as Int8Params does it."""
    bnb = import_bitsandbytes()
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    return int8_params(cb, scb)


def int8_params(cb: torch.Tensor, scb: torch.Tensor):
    """Int8Params from int8 codes and their fp32 row scales (computed now, or as a checkpoint saved them)."""
    bnb = import_bitsandbytes()
    return bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)


def quantize_four_bit(weight: torch.Tensor, module, spec: QuantSpec):
    """nf4/fp4 blockwise quantization on the weight's own device, from the compute dtype (as Params4bit does
    from the load dtype), so that dequantized weights come back in the dtype the layer multiplies in.

    On CPUs with AVX512-BF16, bitsandbytes would repack the weight at the first forward (absmax to bf16,
    double quantization undone), changing its size after the plan; we keep the canonical layout there, so
    the plan holds on every device and double quantization keeps its saving on the CPU.
    """
    bnb = import_bitsandbytes()
    packed, state = bnb.functional.quantize_4bit(
        weight.contiguous().to(module.compute_dtype),
        blocksize=spec.blocksize,
        compress_statistics=spec.double_quant,
        quant_type=spec.method,
        quant_storage=torch.uint8,
    )
    module.support_avx512bf16_for_cpu = False
    module.quant_state = state
    return bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=spec.blocksize,
        compress_statistics=spec.double_quant,
        quant_type=spec.method,
        quant_storage=torch.uint8,
        module=module,
        bnb_quantized=True,
    )


def saved_params(weight: torch.Tensor, stats: dict[str, torch.Tensor], module, device: torch.device):
    """The parameter of a pre-quantized weight from the stats it was saved with, as transformers rebuilds it
    (integrations/bitsandbytes.py: Int8Params with SCB; Params4bit.from_prequantized), on `device`."""
    bnb = import_bitsandbytes()
    if "SCB" in stats:
        return int8_params(weight, stats["SCB"].to(device))
    param = bnb.nn.Params4bit.from_prequantized(
        data=weight, quantized_stats=dict(stats), requires_grad=False, device=device, module=module
    )
    module.support_avx512bf16_for_cpu = False  # keep the saved layout (see quantize_four_bit)
    return param
