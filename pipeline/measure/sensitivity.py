"""Each quantizable module's sensitivity, measured on the evaluation text's own activations.

The relative output error ||W x - Q(W) x|| / ||W x|| of the real bitsandbytes module the load would build, on
the module's real inputs. Forward hooks build one module's quantized copy at a time (memory one module above
the model's, plus up to 1 GiB of copies kept between the search's forwards: QuantizedCopies; a streamed weight
is read back from the offload hook's weights map); the same hooks can replace
outputs by the quantized ones (`methods`): the perplexity of a mixed plan before it is loaded
(docs/quantization.md, "Per-module methods and `quantization=auto`").
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from accelerate import init_empty_weights

from ..quant.bnb import empty_module, quantize_four_bit, quantize_int8
from ..quant.spec import KEEP, QuantSpec
from ..quant.targets import candidate_kind

MEASURED = ("int8", "nf4")


def quantized_copy(module: torch.nn.Module, weight: torch.Tensor, bias, spec: QuantSpec) -> torch.nn.Module:
    """The bitsandbytes module the load builds for `module` under `spec`, with `weight` quantized now."""
    with init_empty_weights():
        new = empty_module(module, spec)
    if candidate_kind(module) == "conv1d":
        weight = weight.t()  # Conv1D keeps (in, out); bitsandbytes holds (out, in), as transformers converts it
    if spec.is_int8:
        new._parameters["weight"] = quantize_int8(weight)
    else:
        new._parameters["weight"] = quantize_four_bit(weight, new, spec)
    if bias is not None:
        new._parameters["bias"] = torch.nn.Parameter(bias.detach(), requires_grad=False)
    return new.eval()  # a module in training mode skips LLM.int8 on the CPU


class QuantizedCopies:
    """Quantized copies kept between the search's forwards, up to `limit` bytes of weights: a probe then quantizes
    only what an earlier forward has not (quantizing was about half of a probe's time on SmolLM2). Past the
    limit modules are quantized per forward as before, so memory stays bounded on any model."""

    def __init__(self, limit: int = 1 << 30):
        self.limit, self.used, self._copies = limit, 0, {}

    def get(self, name: str, method: str, build) -> torch.nn.Module:
        copy = self._copies.get((name, method))
        if copy is None:
            copy = build()
            size = copy.weight.numel() * copy.weight.element_size()
            if self.used + size <= self.limit:
                self._copies[(name, method)], self.used = copy, self.used + size
        return copy


def _loaded(module: torch.nn.Module):
    """(weight, bias) as the forward saw them: in memory, or read back through accelerate's offload hook."""
    if module.weight.device.type != "meta":
        return module.weight, module.bias
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or [hook]
    weights = next(h.weights_map for h in hooks if getattr(h, "weights_map", None) is not None)
    return weights["weight"], (weights["bias"] if module.bias is not None else None)


class QuantizedOutputs:
    """Forward hooks on `modules`: each module's output error under every method of `measured`, and, for the
    modules `methods` assigns one, its output replaced by that method's (a mixed plan, simulated). A simulation
    alone (nothing measured) runs only the quantized forward: the module's own would be thrown away (it was
    about a third of a probe)."""

    def __init__(self, model, modules, spec: QuantSpec, measured=(), methods: dict[str, str] | None = None,
                 copies: QuantizedCopies | None = None):  # fmt: skip
        self.model, self.modules, self.spec = model, list(modules), spec
        self.measured, self.methods = tuple(measured), dict(methods or {})
        self.copies = copies if copies is not None else QuantizedCopies(limit=0)
        self.sums = {m: {k: [0.0, 0.0] for k in self.measured} for m in self.modules}
        self._handles, self._forwards = [], []

    def __enter__(self):
        for name in self.modules:
            module = self.model.get_submodule(name)
            if self.measured:  # errors need the module's own output too: hooks after its forward
                hook = module.register_forward_hook(lambda mod, args, out, n=name: self._hook(n, mod, args, out))
                self._handles.append(hook)
            elif self.methods.get(name, KEEP) != KEEP:  # a simulation only: the quantized forward instead of its own
                self._forwards.append((module, module.__dict__.get("forward")))
                module.forward = lambda x, *a, n=name, m=module, **k: self._quantized(n, m, self.methods[n], x)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for module, forward in self._forwards:  # accelerate's offload hook, when there was one, is put back
            if forward is None:
                del module.forward
            else:
                module.forward = forward

    def _quantized(self, name, module, method: str, x):
        def build():
            weight, bias = _loaded(module)
            return quantized_copy(module, weight.to(x.device), bias, replace(self.spec, method=method, methods=()))

        return self.copies.get(name, method, build)(x).to(x.dtype)

    def _hook(self, name, module, args, output):
        assigned = self.methods.get(name, KEEP)
        wanted = [*self.measured, *([assigned] if assigned != KEEP else [])]
        x, ref = args[0], output.float()
        outs = {method: self._quantized(name, module, method, x).to(output.dtype) for method in dict.fromkeys(wanted)}
        for method in self.measured:
            acc = self.sums[name][method]
            acc[0] += float((outs[method].float() - ref).pow(2).sum())
            acc[1] += float(ref.pow(2).sum())
        return outs.get(self.methods.get(name))

    def errors(self) -> dict[str, dict[str, float]]:
        """module -> {method: relative output error} over everything the hooks saw."""
        return {n: {m: math.sqrt(e / r) if r > 0 else 0.0 for m, (e, r) in by.items()} for n, by in self.sums.items()}


def text_perplexity(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        return math.exp(model(input_ids=ids, labels=ids).loss.float().item())


def measure_sensitivity(model, modules, spec: QuantSpec, ids: torch.Tensor, copies=None) -> tuple[dict, float]:
    """({module: {int8: error, nf4: error}}, the unquantized perplexity) from one forward on `ids`."""
    with QuantizedOutputs(model, modules, spec, measured=MEASURED, copies=copies) as hooks:
        ppl = text_perplexity(model, ids)
    return hooks.errors(), ppl


def simulated_perplexity(model, methods: dict[str, str], spec: QuantSpec, ids: torch.Tensor, copies=None) -> float:
    """The perplexity of the model with each module of `methods` quantized by its method (keep: as is)."""
    with QuantizedOutputs(model, list(methods), spec, methods=methods, copies=copies):
        return text_perplexity(model, ids)
