"""Put loaded tensors into the skeleton: cast or quantize on the target device, tie, finish buffers.

Quantized weights (int8, nf4, fp4) are quantized by bitsandbytes on their planned
device as they arrive; pre-quantized weights come with the stats they were saved with
(int8 row scales, 4-bit quant_state) and are used as is.
"""

from __future__ import annotations

import torch

from ..planning import TensorPlan
from ..quant.bnb import quantize_four_bit, quantize_int8, saved_params
from ..quant.spec import QuantSpec


def place(
    model: torch.nn.Module,
    t: TensorPlan,
    tensor: torch.Tensor,
    device: torch.device,
    spec: QuantSpec,
    saved: dict[str, torch.Tensor] | None = None,
) -> None:
    """`tensor` (as read from the checkpoint) becomes model tensor `t.name`, in its planned form;
    `saved`: the stats a pre-quantized weight was saved with."""
    if t.quantized and saved is not None:  # pre-quantized: the weight and its stats as they were written
        value = saved_params(tensor.to(device), saved, model.get_submodule(t.name.rpartition(".")[0]), device)
    elif t.quantized == "int8":  # from the load dtype, as transformers casts before Int8Params quantizes
        value = quantize_int8(tensor.to(device=device, dtype=t.load_dtype or tensor.dtype))
    elif t.quantized:
        value = quantize_four_bit(tensor.to(device), model.get_submodule(t.name.rpartition(".")[0]), spec)
    else:
        value = tensor.to(device=device, dtype=t.dtype)
        if t.kind == "param":
            value = torch.nn.Parameter(value, requires_grad=False)
    assign(model, t, value)


def assign(model: torch.nn.Module, t: TensorPlan, value) -> None:
    mod_name, _, leaf = t.name.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    (module._parameters if t.kind == "param" else module._buffers)[leaf] = value


def finish_skeleton_tensors(model, tensors: dict[str, TensorPlan], devices: dict[str, torch.device]) -> None:
    """Buffers the skeleton made itself (rotary frequencies...) move to their planned device."""
    for t in tensors.values():
        if t.source or t.tied_to:
            continue
        mod_name, _, leaf = t.name.rpartition(".")
        module = model.get_submodule(mod_name) if mod_name else model
        store = module._parameters if t.kind == "param" else module._buffers
        current = store[leaf]
        if current is None or current.device.type == "meta" or t.device == "disk":
            continue  # missing from the checkpoint: validate names it
        value = current.to(device=devices[t.device], dtype=t.dtype)
        store[leaf] = torch.nn.Parameter(value, requires_grad=False) if t.kind == "param" else value


def tie(model, tensors: dict[str, TensorPlan]) -> None:
    """Tied members point at their loaded canonical tensor."""
    for t in tensors.values():
        if t.tied_to and t.device != "disk":
            head = tensors[t.tied_to]
            mod_name, _, leaf = head.name.rpartition(".")
            module = model.get_submodule(mod_name) if mod_name else model
            assign(model, t, (module._parameters if head.kind == "param" else module._buffers)[leaf])
