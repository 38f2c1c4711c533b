"""transformers' bitsandbytes integration: the quantizer object a loaded model carries, and which
modules its replace_with_bnb_linear leaves alone. Checked on 4.56.0, 5.24.0 and 5.25.0."""

from __future__ import annotations

from .version import unsupported


def hf_quantizer(config, pre_quantized: bool):
    """The Bnb8Bit/Bnb4BitHfQuantizer from_pretrained attaches as `model.hf_quantizer`
    (`quantizers.auto.AutoHfQuantizer.from_config`, same signature 4.56 to 5.25)."""
    try:
        from transformers.quantizers.auto import AutoHfQuantizer
    except ImportError:
        raise unsupported("transformers.quantizers.auto.AutoHfQuantizer") from None
    return AutoHfQuantizer.from_config(config, pre_quantized=pre_quantized)


def leaves_unconverted(name: str, pattern: str) -> bool | None:
    """Whether transformers' module selection keeps `name` unquantized for a skip `pattern`
    (`quantizers_utils.should_convert_module`, 5.x); None on releases without it (4.x matched by suffix)."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        return None
    return not should_convert_module(name, [pattern])
