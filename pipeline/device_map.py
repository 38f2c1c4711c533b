"""Device-map strategies over exact tensor sizes: sequential, balanced, balanced_low_0, auto, cpu, explicit.

Why our own and not accelerate's infer_auto_device_map: accelerate drops devices
that this machine lacks (a user cannot plan 2x40 GiB GPUs on a laptop), reads
free memory when caps are given, and sizes int8 layers without their scales.
The algorithm is accelerate's, on our sizes: walk the module tree in order,
place each module on the current device if it fits, else split it into its
children (never a no-split class), else move on to the next device.
"""
from __future__ import annotations

import math

from .errors import UserError
from .planning import TensorPlan
from .sizes import device_key, device_order, format_bytes, normalize_max_memory

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential", "cpu", "explicit")


def resolve_max_memory(max_memory) -> dict[str, int]:
    """Caps in bytes; free memory is read only where a cap says auto or no map is given."""
    caps = normalize_max_memory(max_memory)
    if caps is not None and all(v != "auto" for v in caps.values()):
        return caps
    from accelerate.utils import get_max_memory

    free = {device_key(k): v for k, v in get_max_memory().items() if str(k) != "mps"}
    if caps is None:
        return dict(sorted(free.items(), key=lambda kv: device_order(kv[0])))
    out = {}
    for k, v in caps.items():
        if v == "auto":
            if k not in free:
                raise UserError(f"memory.max_memory.{k}: auto, but this machine has no device {k}; give a size instead")
            v = free[k]
        out[k] = v
    return out


def compute_device_map(model, tensors: dict[str, TensorPlan], *, strategy: str, explicit: dict | None,
                       max_memory: dict[str, int], no_split: list[str]) -> dict[str, str]:
    if strategy not in STRATEGIES:
        raise UserError(f"device_map.strategy: unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "cpu":
        return {"": "cpu"}
    if strategy == "explicit":
        return _explicit(model, explicit)
    sizes = _subtree_sizes(tensors)
    units = _Units(model, tensors, sizes, set(no_split))
    caps = dict(max_memory)
    gpus = [d for d in caps if d.isdigit()]
    if strategy in ("balanced", "balanced_low_0") or (strategy == "auto" and len(gpus) > 1):
        caps = _balanced_caps(caps, gpus, sizes.get("", 0), units.largest(), low_zero=strategy == "balanced_low_0")
    return _fill(units, caps)


def _subtree_sizes(tensors: dict[str, TensorPlan]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for t in tensors.values():
        probe = t.name
        while True:
            sizes[probe] = sizes.get(probe, 0) + t.nbytes
            if not probe:
                break
            probe = probe.rpartition(".")[0]
    return sizes


class _Units:
    """The module tree as placeable units: a module, or a tensor held directly by a split module."""

    def __init__(self, model, tensors, sizes, no_split: set[str]):
        self.model, self.tensors, self.sizes, self.no_split = model, tensors, sizes, no_split
        self.tied_group = {}
        for t in tensors.values():
            if t.tied_to:
                self.tied_group[t.name] = t.tied_to
                self.tied_group[t.tied_to] = t.tied_to

    def children(self, name: str) -> list[str] | None:
        """Sub-units of `name`, or None when it must stay whole."""
        if name in self.tensors:
            return None
        module = self.model.get_submodule(name) if name else self.model
        if type(module).__name__ in self.no_split:
            return None
        prefix = f"{name}." if name else ""
        out = [prefix + leaf for leaf, v in list(module._parameters.items()) + list(module._buffers.items())
               if v is not None and prefix + leaf in self.tensors]
        out += [prefix + child for child, _ in module.named_children() if prefix + child in self.sizes]
        return out or None

    def groups_in(self, name: str) -> set[str]:
        prefix = f"{name}." if name else ""
        return {g for n, g in self.tied_group.items() if n == name or n.startswith(prefix)}

    def largest(self) -> int:
        """Bytes of the biggest unit that cannot be split (a decoder layer, say)."""
        best, stack = 0, [""]
        while stack:
            name = stack.pop()
            kids = self.children(name)
            if kids is None:
                best = max(best, self.sizes.get(name, 0))
            else:
                stack += kids
        return best


def _balanced_caps(caps, gpus, total, largest, low_zero) -> dict[str, int]:
    """accelerate's get_balanced_memory on exact sizes: an even share per GPU plus room for one block."""
    if len(gpus) < 2:
        return caps
    share = math.ceil(total / (len(gpus) - 1 if low_zero else len(gpus))) + largest
    out = dict(caps)
    for g in gpus:
        out[g] = min(caps[g], share)
    if low_zero:
        rest = sum(out[g] for g in gpus[1:])
        out[gpus[0]] = min(caps[gpus[0]], max(0, total - rest))
    return out


def _fill(units: _Units, caps: dict[str, int]) -> dict[str, str]:
    devices = sorted(caps, key=device_order)
    if not devices:
        raise UserError("memory.max_memory: no device to place the model on; give at least cpu: <size>")
    left = dict(caps)
    dmap: dict[str, str] = {}
    group_device: dict[str, str] = {}
    queue = [""]
    i = 0
    while queue:
        name = queue.pop(0)
        size = units.sizes.get(name, 0)
        kids = units.children(name)
        groups = units.groups_in(name)
        pinned = {group_device[g] for g in groups if g in group_device}
        if len(pinned) == 1 and (kids is None or size <= left[next(iter(pinned))]):
            dev = pinned.pop()  # tied weights share one device, whatever the fill order
        elif i < len(devices) and size <= left[devices[i]]:
            dev = devices[i]
        elif kids is not None:
            queue[:0] = kids
            continue
        else:
            i += 1
            if i >= len(devices):
                need = size + sum(units.sizes.get(q, 0) for q in queue)
                raise UserError(
                    f"memory.max_memory.{devices[-1]}: {need} bytes ({format_bytes(need)}) missing: the caps "
                    f"{', '.join(f'{d}: {format_bytes(c)}' for d, c in caps.items())} cannot hold the model; "
                    f"raise a cap or allow offload (add cpu or disk)"
                )
            queue.insert(0, name)
            continue
        dmap[name] = dev
        left[dev] -= size
        for g in groups:
            group_device.setdefault(g, dev)
    return _merge(dmap)


def _merge(dmap: dict[str, str]) -> dict[str, str]:
    """One entry for the whole model when everything landed on one device (as accelerate does)."""
    if len(set(dmap.values())) == 1:
        return {"": next(iter(dmap.values()))}
    return dmap


def _explicit(model, explicit) -> dict[str, str]:
    if not explicit:
        raise UserError("device_map.map: the explicit strategy needs a map of module prefix -> device; see conf/device_map/explicit.yaml")
    modules = {n for n, _ in model.named_modules()}
    out = {}
    for prefix, dev in explicit.items():
        prefix = "" if prefix in (None, "") else str(prefix)
        if prefix not in modules:
            raise UserError(f"device_map.map: {prefix!r} is not a module of {type(model).__name__}; use names from model.named_modules()")
        out[prefix] = device_key(dev, f"device_map.map.{prefix}")
    return out


def check_caps(predicted: dict[str, int], caps: dict[str, int]) -> None:
    """Exit 2 naming the device and the missing bytes when a cap cannot hold its share."""
    for dev, need in predicted.items():
        cap = caps.get(dev)
        if cap is None:
            if not caps:
                continue
            raise UserError(f"memory.max_memory: the plan puts {format_bytes(need)} on {dev}, which has no cap; add memory.max_memory.{dev}")
        if need > cap:
            raise UserError(
                f"memory.max_memory.{dev}: the plan needs {need} bytes ({format_bytes(need)}) but the cap is "
                f"{cap} ({format_bytes(cap)}): {need - cap} bytes missing; raise the cap or allow offload to cpu/disk"
            )
