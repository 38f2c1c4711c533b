"""What from_pretrained sets on the model it returns, set on ours where loading finishes.

`hf_device_map` as transformers 5 sets it, and for a quantized model what transformers' bitsandbytes
quantizer leaves (`hf_quantizer` and, through its postprocess_model, `is_loaded_in_8bit`...), so
`save_pretrained` and peft-style code see a bnb model; a mixed int8/4-bit plan's config is our mixed format,
which we read back and transformers refuses (docs/quantization.md, "What the loaded model carries").
"""

from __future__ import annotations

import logging

from ..hf.quantizers import hf_quantizer
from ..quant.formats.hf_config import bnb_quantization_config, unconverted_modules
from ..quant.formats.mixed_plan import mixed_quantization_config
from ..quant.spec import QuantSpec

log = logging.getLogger(__name__)


def hf_device_map(device_map: dict[str, str]) -> dict[str, int | str]:
    """Our plan's map (devices as strings: "0", "cpu", "disk") in accelerate's format (GPUs as ints)."""
    return {name: int(dev) if str(dev).isdigit() else dev for name, dev in device_map.items()}


def set_hf_attributes(model, device_map: dict[str, str], spec: QuantSpec, quantized_modules, thresholds=None) -> None:
    devices = set(device_map.values())
    if len(devices) > 1 or "disk" in devices:
        model.hf_device_map = hf_device_map(device_map)
    elif "hf_device_map" in model.__dict__:
        del model.hf_device_map  # one device: from_pretrained leaves it unset
    if not spec.enabled or not hasattr(model, "config"):
        return
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig.from_dict(bnb_quantization_config(spec, unconverted_modules(model, quantized_modules)))
    quantizer = hf_quantizer(config, pre_quantized=spec.prequantized)
    quantizer.modules_to_not_convert = list(config.llm_int8_skip_modules or [])
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)  # config.quantization_config, is_loaded_in_8bit / _4bit
    methods = {m: spec.method_of(m) for m in quantized_modules}
    if len(set(methods.values())) > 1:  # transformers has no config for a mix: save_pretrained writes ours (refused)
        model.config.quantization_config = mixed_quantization_config(
            spec, methods, thresholds or {}, quantizer.modules_to_not_convert
        )


def set_threshold(model, threshold: float) -> None:
    """A reused int8 model (sweeps over the threshold) says the threshold its layers now use."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "load_in_8bit", False):
        quantizer.quantization_config.llm_int8_threshold = threshold
