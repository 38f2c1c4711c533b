"""Put loaded tensors into the skeleton: cast or quantize on the target device, tie, finish buffers.

Quantized weights (int8, nf4, fp4) are quantized by bitsandbytes on their planned
device as they arrive; pre-quantized weights come with the stats they were saved with
(int8 row scales, 4-bit quant_state) and are used as is.
"""

from __future__ import annotations

import torch

from ..hf.modeling import initialise_missing
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
        mod_name = t.name.rpartition(".")[0]  # a mixed plan: the module's own method (TensorPlan.quantized)
        value = quantize_four_bit(tensor.to(device), model.get_submodule(mod_name), spec.for_module(mod_name))
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
    """Buffers the skeleton made itself (rotary frequencies...) move to their planned device; tensors the
    checkpoint lacks (planned only with checkpoint.allow_missing) are made there and initialised."""
    missing: dict[str, list[str]] = {}
    for t in tensors.values():
        if t.source or t.tied_to:
            continue
        mod_name, _, leaf = t.name.rpartition(".")
        module = model.get_submodule(mod_name) if mod_name else model
        store = module._parameters if t.kind == "param" else module._buffers
        current = store[leaf]
        if current is None or t.device == "disk":
            continue
        if current.device.type == "meta":  # missing from the checkpoint, allowed by the plan: initialised below
            missing.setdefault(mod_name, []).append(leaf)
            current = torch.empty(t.shape, dtype=t.dtype, device=devices[t.device])
        value = current.to(device=devices[t.device], dtype=t.dtype)
        store[leaf] = torch.nn.Parameter(value, requires_grad=False) if t.kind == "param" else value
    for mod_name, leaves in missing.items():
        init_missing(model, mod_name, leaves)


def init_missing(model, mod_name: str, leaves: list[str]) -> None:
    """Initialise a module's tensors the checkpoint lacks as transformers does (checkpoint.allow_missing):
    the model's `_init_weights`, the module's other tensors left alone; zeros for a model without one."""
    module = model.get_submodule(mod_name) if mod_name else model
    if initialise_missing(model, module, leaves):
        return
    with torch.no_grad():  # not a transformers model: zeros, the one value that needs no scheme
        for leaf in leaves:
            (module._parameters[leaf] if leaf in module._parameters else module._buffers[leaf]).zero_()


def tie(model, tensors: dict[str, TensorPlan]) -> None:
    """Tied members point at their loaded canonical tensor."""
    for t in tensors.values():
        if t.tied_to and t.device != "disk":
            head = tensors[t.tied_to]
            mod_name, _, leaf = head.name.rpartition(".")
            module = model.get_submodule(mod_name) if mod_name else model
            assign(model, t, (module._parameters if head.kind == "param" else module._buffers)[leaf])
