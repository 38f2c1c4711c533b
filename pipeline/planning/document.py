"""plan.json and the plan table in the log: what was planned and every input that determined it.

Same inputs give a byte-identical plan.json.
"""

from __future__ import annotations

import os

from ..dtypes import dtype_name
from ..quant.spec import QuantSpec
from ..sizes import format_bytes
from .plan import Plan


def plan_document(
    plan: Plan,
    checkpoint,
    *,
    model_class: str,
    dtype: str,
    dtype_overrides: dict,
    spec: QuantSpec,
    no_split,
    tied_groups,
) -> dict:
    return {
        "inputs": {
            "checkpoint": {
                "path": checkpoint.path,
                "files": [{"name": f, "bytes": os.path.getsize(f)} for f in checkpoint.files],
            },
            "model_class": model_class,
            "dtype": dtype,
            "unquantized_dtype": spec.unquantized_dtype,
            "dtype_overrides": dict(dtype_overrides),
            "strategy": plan.strategy,
            "max_memory": plan.max_memory,
            "quantization": spec.to_json(),
            "no_split_modules": no_split,
            "tied_groups": tied_groups,
        },
        "device_map": plan.device_map,
        "predicted_bytes": plan.predicted_bytes,
        "module_bytes": plan.module_bytes(),
        "quantized_modules": plan.quantized_modules,
        "skipped_modules": plan.skipped,
        "missing_keys": plan.missing,
        "unexpected_keys": plan.unexpected,
        "tensors": {name: t.to_json() for name, t in sorted(plan.tensors.items())},
    }


def plan_table(plan: Plan) -> str:
    rows = [("device", "cap", "predicted", "tensors", "dtypes")]
    for dev, nbytes in plan.predicted_bytes.items():
        ts = [t for t in plan.tensors.values() if t.device == dev]
        dts = sorted({dtype_name(t.dtype) for t in ts})
        cap = plan.max_memory.get(dev)
        rows.append(
            (dev, format_bytes(cap) if cap is not None else "-", format_bytes(nbytes), str(len(ts)), ",".join(dts))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in rows)
