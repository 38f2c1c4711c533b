"""The tensors bitsandbytes serializes beside a quantized weight, found from checkpoint headers alone.

int8 (Linear8bitLt): `<module>.weight` (int8 codes), `<module>.SCB` (fp32 row scales) and
`<module>.weight_format` (a uint8 scalar, always 0 = row-major today).
4-bit (Linear4bit): `<module>.weight` (packed, two values a byte, shape (n/2, 1)) and
`<module>.weight.absmax`, `.quant_map`, with double quantization `.nested_absmax` and
`.nested_quant_map`, and `.quant_state.bitsandbytes__nf4|fp4` (a JSON blob packed as uint8:
shape, dtype, blocksize, nested offset). These are the names transformers' save_pretrained
writes and its bnb quantizers read (`serialized_names` in quantizers/quantizer_bnb_*.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ...errors import UserError
from ...schema import QuantizationSchema

INT8_STATS = ("SCB", "weight_format")
FOUR_BIT_STATS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
QUANT_STATE = "quant_state.bitsandbytes__"  # + nf4 or fp4
HELD_BY_BNB = ("SCB", *FOUR_BIT_STATS)  # stats bitsandbytes keeps as tensors (the rest is parsed or ignored)


@dataclass(frozen=True)
class SavedQuantization:
    """A checkpoint's quantization as saved: method, settings, and each quantized weight's stats keys."""

    method: str  # int8, nf4 or fp4
    origin: str  # where it was read: "<dir>/config.json quantization_config" or our safetensors metadata
    weights: dict[str, dict[str, str]]  # checkpoint weight key -> {stat name: checkpoint key}
    threshold: float = QuantizationSchema.threshold  # transformers' BitsAndBytesConfig default too
    compute_dtype: str | None = None  # 4-bit: fp32, fp16 or bf16 as saved
    double_quant: bool = False
    blocksize: int = 64
    thresholds: dict[str, float] = field(default_factory=dict)  # checkpoint module name -> its own threshold
    config: dict | None = None  # the raw quantization_config, when there is one
    methods: dict[str, str] = field(default_factory=dict)  # a saved mixed plan: module -> method (mixed_plan.py)

    def with_thresholds(self, thresholds: dict[str, float]) -> SavedQuantization:
        return replace(self, thresholds=dict(thresholds))

    @property
    def kinds(self) -> str:
        """The saved method(s), as messages name them: "int8", or "int8/nf4" for a mixed plan."""
        return "/".join(sorted(set(self.methods.values()))) if self.methods else self.method

    @property
    def stats_keys(self) -> set[str]:
        return {k for stats in self.weights.values() for k in stats.values()}


def int8_weights(keys) -> dict[str, dict[str, str]]:
    """Checkpoint weight key -> its int8 stats keys, for every `<module>.SCB` whose weight is there too."""
    keys = set(keys)
    out: dict[str, dict[str, str]] = {}
    for key in sorted(keys):
        if key.endswith(".SCB") and f"{key[:-4]}.weight" in keys:
            module = key[:-4]
            out[f"{module}.weight"] = {s: f"{module}.{s}" for s in INT8_STATS if f"{module}.{s}" in keys}
    return out


def four_bit_weights(keys) -> dict[str, dict[str, str]]:
    """Checkpoint weight key -> its 4-bit stats keys, for every weight with a packed quant_state."""
    keys = set(keys)
    out: dict[str, dict[str, str]] = {}
    for key in sorted(keys):
        weight, sep, kind = key.partition("." + QUANT_STATE)
        if not sep or weight not in keys:
            continue
        stats = {s: f"{weight}.{s}" for s in FOUR_BIT_STATS if f"{weight}.{s}" in keys}
        stats[QUANT_STATE + kind] = key
        out[weight] = stats
    return out


def four_bit_types(weights: dict[str, dict[str, str]]) -> set[str]:
    """The 4-bit types (nf4, fp4) the quant_state keys name."""
    return {s[len(QUANT_STATE) :] for stats in weights.values() for s in stats if s.startswith(QUANT_STATE)}


def check_saved_shape(info, model_shape, method: str) -> None:
    """A saved quantized weight must stand for the model's weight: same shape (int8), same element count (4-bit)."""
    numel = math.prod(model_shape)
    ok = tuple(info.shape) == tuple(model_shape) if method == "int8" else info.nbytes == math.ceil(numel / 2)
    if not ok:
        want = list(model_shape) if method == "int8" else f"{math.ceil(numel / 2)} packed bytes"
        raise UserError(
            f"{info.file}: {method} tensor {info.name!r} has shape {list(info.shape)} ({info.nbytes} bytes) "
            f"but the model expects {want}; the checkpoint does not match config.json"
        )
