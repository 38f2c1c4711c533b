"""Bytes bitsandbytes holds for one quantized weight, from its shape alone.

int8: one byte per element plus an fp32 scale per output row (SCB); 4-bit: the packed codes, absmax per block
and code books (docs/quantization.md, "nf4 / fp4"), each module's own. The sizes hold on every device: on the
CPU we keep bitsandbytes' canonical layout (quant/bnb.py, quantize_four_bit). A pre-quantized weight is sized
from the headers of what was saved beside it (saved_size).
"""

from __future__ import annotations

import math

import torch

from .formats.bnb_keys import HELD_BY_BNB
from .spec import QuantSpec

NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes absmax values in blocks of 256
NESTED_CODE_ENTRIES = 256  # the dynamic 8-bit map
FOUR_BIT_CODE_ENTRIES = 16  # the nf4/fp4 code book


def quantized_storage_dtype(spec: QuantSpec) -> torch.dtype:
    return torch.int8 if spec.is_int8 else torch.uint8


def quantized_nbytes(shape, spec: QuantSpec) -> int:
    numel = math.prod(shape)
    if spec.is_int8:
        return numel + 4 * shape[0]
    blocks = math.ceil(numel / spec.blocksize)
    packed = math.ceil(numel / 2)
    code = 4 * FOUR_BIT_CODE_ENTRIES
    if spec.double_quant:
        absmax = blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 * NESTED_CODE_ENTRIES + 4
    else:
        absmax = 4 * blocks
    return packed + absmax + code


NESTED_OFFSET_BYTES = 4  # the fp32 offset QuantState.from_dict makes from the packed quant_state


def saved_size(checkpoint, stats: dict[str, str]) -> int:
    """Bytes bitsandbytes holds beside a pre-quantized weight, from the headers of its stats tensors.

    It keeps SCB (int8) and absmax, quant_map, nested_absmax, nested_quant_map (4-bit) as
    tensors, plus an fp32 nested offset; weight_format and the packed quant_state are parsed, not kept.
    """
    held = sum(checkpoint.tensors[key].nbytes for stat, key in stats.items() if stat in HELD_BY_BNB)
    return held + (NESTED_OFFSET_BYTES if "nested_absmax" in stats else 0)
