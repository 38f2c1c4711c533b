"""Pre-quantized checkpoint formats: how a directory says it is already quantized, and where its stats lie.

- bnb_keys.py: the tensor names bitsandbytes (and transformers' save_pretrained) write
  beside a quantized weight (int8 `SCB`/`weight_format`, 4-bit `absmax`/`quant_map`/`nested_*`
  and the packed `quant_state.bitsandbytes__nf4|fp4`), found from headers alone.
- hf_config.py: config.json's `quantization_config`, read and written as transformers does.
- ours.py: the metadata our save stage wrote before it wrote `quantization_config`.
- mixed_plan.py: our own `quantization_config` for a saved plan with several methods.

`read_saved_quantization` is the one entry point: config.json first, then our metadata.
"""

from __future__ import annotations

from .bnb_keys import SavedQuantization
from .hf_config import from_quantization_config
from .mixed_plan import from_mixed_config
from .ours import from_our_metadata


def read_saved_quantization(checkpoint, config) -> SavedQuantization | None:
    """What `checkpoint` holds already quantized (config.json's quantization_config, else our metadata), or None."""
    mixed = from_mixed_config(checkpoint, config)
    if mixed is not None:  # several methods: everything is in config.json (per-module thresholds too)
        return mixed
    saved = from_quantization_config(checkpoint, config)
    ours = from_our_metadata(checkpoint)
    if saved is None:
        return ours
    if ours is not None and ours.method == saved.method:
        saved = saved.with_thresholds(ours.thresholds)  # per-module thresholds only we record
    return saved


__all__ = ["SavedQuantization", "read_saved_quantization"]
