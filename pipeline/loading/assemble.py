"""Converted tensors (fused MoE experts, split projections, transposed Conv1D weights) built in place.

The plan says, for each converted model tensor, where every checkpoint source lands
in it (checkpoint/pieces.py). The target is allocated once on its planned device,
in its planned dtype, when its first source arrives; each source is copied (and cast)
into its region as it is read, then dropped; when the last one has landed the tensor
is placed like any other (quantized there if the plan says so). No source is kept
beyond its copy, and nothing is concatenated on the host.
"""

from __future__ import annotations

import torch

from ..checkpoint.pieces import view
from ..planning import Plan, TensorPlan
from ..planning.slices import source_slice
from ..quant.spec import QuantSpec
from .assign import place


class Assembler:
    def __init__(self, model, plan: Plan, devices: dict[str, torch.device], spec: QuantSpec):
        self.model, self.devices, self.spec = model, devices, spec
        self.uses: dict[str, list] = {}  # checkpoint key -> [(target plan, piece)]
        self.left: dict[str, int] = {}
        self.building: dict[str, torch.Tensor] = {}
        for t in plan.tensors.values():
            if t.conversion is None or t.tied_to or t.device == "disk" or t.slice is not None:
                continue  # a sharded one (tensor parallel) is read piece by piece: assemble_slices
            for piece in t.conversion.pieces:
                self.uses.setdefault(piece.source, []).append((t, piece))
            self.left[t.name] = len(t.conversion.pieces)

    def device_of(self, key: str) -> str:
        """The planned device of the (first) tensor a source goes into."""
        return self.uses[key][0][0].device

    def feed(self, key: str, tensor: torch.Tensor) -> None:
        for t, piece in self.uses[key]:
            target = self.building.get(t.name)
            if target is None:
                target = self.building[t.name] = allocate(t, self.devices[t.device])
            view(target, piece.into).copy_(view(tensor, piece.take))
            self.left[t.name] -= 1
            if not self.left[t.name]:
                place(self.model, t, self.building.pop(t.name), target.device, self.spec)


def allocate(t: TensorPlan, device: torch.device) -> torch.Tensor:
    """The empty target; a quantized one is assembled in its checkpoint dtype and quantized from there."""
    dtype = (t.load_dtype or t.conversion.dtype) if t.quantized else t.dtype
    return torch.empty(t.conversion.shape, dtype=dtype, device=device)


def assemble_slices(model, t: TensorPlan, checkpoint, reader, device: torch.device, spec: QuantSpec) -> None:
    """Tensor parallel: this rank's shard of a converted tensor, each piece read as its source range only."""
    target = allocate(t, device)
    for piece in t.conversion.pieces:
        info = checkpoint.tensors[piece.source]
        part = reader.read(info, source_slice(piece, info))
        view(target, piece.into).copy_(view(part, piece.take))
    place(model, t, target, device, spec)
