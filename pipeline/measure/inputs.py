"""Fixed inputs for any model kind, built from its `main_input_name` and its config.

What transformers declares, not a list of model names; values are deterministic, so every run and its
reference see the same inputs, and a model whose inputs cannot be built gets a reason (a skipped check),
never an error (docs/design.md, "Inputs for every model kind").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

N_TOKENS = 32
N_DECODER_TOKENS = 8
N_AUDIO_SAMPLES = 16000  # input_values: one second at the 16 kHz that speech encoders use (no config field says it)
N_FEATURE_FRAMES = 100  # input_features when the config gives no required length
SEED = 0


@dataclass(frozen=True)
class Inputs:
    kwargs: dict | None  # forward keyword arguments, or None with `why`
    why: str = ""  # why there are none
    tokens: int = 0  # input token count (throughput in tokens/s), 0 when the main input is not tokens


def build_inputs(model, device: torch.device) -> Inputs:
    config = model.config
    name = getattr(model, "main_input_name", "input_ids")
    builder = _BUILDERS.get(name)
    if builder is None:
        return Inputs(None, f"{type(model).__name__} takes {name!r}: no fixed inputs are built for it")
    main, why = builder(model, config)
    if main is None:
        return Inputs(None, f"{type(model).__name__} takes {name!r} but {why}")
    kwargs = {name: main.to(device)}
    if getattr(config, "is_encoder_decoder", False):
        vocab = _text_attr(config, "vocab_size", decoder=True) or 2
        kwargs["decoder_input_ids"] = _token_ids(N_DECODER_TOKENS, vocab).to(device)
    return Inputs(kwargs, tokens=main.numel() if name == "input_ids" else 0)


def _input_ids(model, config):
    vocab = _text_attr(config, "vocab_size")
    if not vocab:
        return None, "its config has no vocab_size"
    limit = _text_attr(config, "max_position_embeddings") or _text_attr(config, "n_positions") or N_TOKENS
    return _token_ids(min(N_TOKENS, int(limit)), int(vocab)), ""


def _pixel_values(model, config):
    size = _vision_attr(config, "image_size")
    if size is None:
        return None, "its config has no image_size"
    height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
    channels = _vision_attr(config, "num_channels") or 3
    return _noise(1, channels, height, width, dtype=_float_dtype(model)), ""


def _input_features(model, config):
    """(1, num_mel_bins, frames): frames = max_source_positions times the encoder's conv strides, as Whisper checks."""
    mel = _audio_attr(config, "num_mel_bins")
    if not mel:
        return None, "its config has no num_mel_bins"
    positions = _audio_attr(config, "max_source_positions")
    frames = positions * _conv_stride(_encoder(model)) if positions else N_FEATURE_FRAMES
    return _noise(1, mel, frames, dtype=_float_dtype(model)), ""


def _input_values(model, config):
    return _noise(1, N_AUDIO_SAMPLES, dtype=_float_dtype(model)), ""


_BUILDERS = {
    "input_ids": _input_ids,
    "pixel_values": _pixel_values,
    "input_features": _input_features,
    "input_values": _input_values,
}


def _token_ids(n: int, vocab: int) -> torch.Tensor:
    return (torch.arange(n) * 7 % vocab).unsqueeze(0)


def _noise(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED)
    return torch.randn(*shape, generator=gen).to(dtype)


def _sub_configs(config, *names: str):
    yield config
    for name in names:
        sub = getattr(config, name, None)
        if sub is not None:
            yield sub


def _text_attr(config, attr: str, decoder: bool = False):
    text = config.get_text_config(decoder=decoder) if hasattr(config, "get_text_config") else config
    return next((v for c in (text, config) if (v := getattr(c, attr, None)) is not None), None)


def _vision_attr(config, attr: str):
    return next((v for c in _sub_configs(config, "vision_config") if (v := getattr(c, attr, None)) is not None), None)


def _audio_attr(config, attr: str):
    return next(
        (v for c in _sub_configs(config, "audio_config", "encoder") if (v := getattr(c, attr, None)) is not None), None
    )


def submodule_of(model, getter: str):
    """What `model.<getter>()` returns (get_encoder, get_input_embeddings), or None when the model has none."""
    get = getattr(model, getter, None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def _encoder(model):
    encoder = submodule_of(model, "get_encoder")
    return model if encoder is None else encoder


def _conv_stride(module) -> int:
    """Product of the time strides of the encoder's Conv1d layers (Whisper: 1 x 2)."""
    out = 1
    for m in module.modules():
        if isinstance(m, torch.nn.Conv1d):
            out *= m.stride[0]
    return out


def _float_dtype(model) -> torch.dtype:
    """The dtype the first layer computes in: that of the encoder's first floating-point parameter."""
    for p in _encoder(model).parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
