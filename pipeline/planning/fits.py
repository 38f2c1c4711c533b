"""What would make a model fit caps that cannot hold it: the keys to change and the size each gives.

Pure, from headers: the model is sized again (planning/tensors.py) under each alternative
dtype or quantization, so a cap error can say `dtype=bf16 (36.90 MiB)` instead of only the
bytes missing (issue 29).
"""

from __future__ import annotations

import math
from dataclasses import replace

from ..dtypes import DtypePolicy
from ..quant.spec import QuantSpec
from ..quant.targets import QuantSelection, select_quantized_modules
from ..sizes import device_order, format_bytes
from .tensors import plan_tensors

HALF = ("bf16", "bfloat16", "fp16", "float16")


def fit_hint(model, checkpoint, *, dtype: str, overrides: dict, spec: QuantSpec, caps: dict[str, int], **parts) -> str:
    """One clause: the size as configured, the size under each key that shrinks it, and the cap that would do."""

    def size(dt: str, sp: QuantSpec) -> int:
        return total_bytes(model, checkpoint, dtype=dt, overrides=overrides, spec=sp, **parts)

    configured = size(dtype, spec)
    smaller = [(key, n) for key, n in _alternatives(size, dtype, spec) if n < configured]
    text = f"the model takes {format_bytes(configured)} as configured"
    if smaller:
        text += "; it would take " + ", ".join(f"{format_bytes(n)} with {key}" for key, n in smaller)
    return text + f"; or {_cap_key(caps, configured)}"


def total_bytes(model, checkpoint, *, dtype: str, overrides: dict, spec: QuantSpec, tied_groups, keep_in_fp32) -> int:
    """Bytes of the whole model under this dtype and quantization (devices aside)."""
    selection = (
        select_quantized_modules(model, spec, tied_groups=tied_groups, keep_in_fp32=keep_in_fp32)
        if spec.enabled
        else QuantSelection([])
    )
    planned = plan_tensors(
        model,
        checkpoint,
        policy=DtypePolicy(spec.unquantized_dtype or dtype, dict(overrides)),
        keep_in_fp32=keep_in_fp32,
        tied_groups=tied_groups,
        quantized_modules=selection.modules,
        spec=spec,
        transposed=selection.transposed,
    )
    return sum(t.nbytes for t in planned.tensors.values())


def _alternatives(size, dtype: str, spec: QuantSpec):
    """(override, bytes) for each single change that may shrink the model."""
    if spec.enabled and spec.unquantized_dtype and spec.unquantized_dtype not in HALF:
        yield "quantization.unquantized_dtype=null", size(dtype, replace(spec, unquantized_dtype=None))
        if str(dtype).lower() not in HALF:
            yield "quantization.unquantized_dtype=bf16", size(dtype, replace(spec, unquantized_dtype="bf16"))
    elif str(dtype).lower() not in HALF:
        yield "dtype=bf16", size("bf16", spec)
    if spec.prequantized:
        return
    for method in ("int8", "nf4"):
        if not spec.enabled or (spec.is_int8 and method == "nf4"):
            yield f"quantization={method}", size(dtype, QuantSpec(method=method, offloaded=method))


def _cap_key(caps: dict[str, int], need: int) -> str:
    """The cap that would hold the whole model beside the others (or a disk cap to offload to)."""
    held = sorted((d for d in caps if d != "disk"), key=device_order)
    if not held:
        return "add memory.max_memory.cpu"
    last = held[-1]
    others = sum(caps[d] for d in held if d != last)
    mib = math.ceil(max(need - others, 0) / 2**20) + 1
    disk = "" if "disk" in caps else ", or add a disk cap (memory.max_memory.disk) to offload"
    return f"memory.max_memory.{last}={mib}MiB (no-split blocks may need a little more){disk}"
