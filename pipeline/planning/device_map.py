"""Where the device map is made: strategies over exact tensor sizes, caps, and tensors placed by it.

Strategies: sequential, balanced, balanced_low_0, auto, cpu, explicit. accelerate's algorithm on our exact
sizes and on declared devices (its infer_auto_device_map drops devices this machine lacks and sizes int8
layers without their scales): docs/design.md, "The planner is ours".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

from ..errors import UserError
from ..names import owner
from ..sizes import Caps, FrozenMap, MaxMemory, device_key, device_order, format_bytes
from .tensors import TensorPlan

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential", "cpu", "explicit")


class ExplicitMap(FrozenMap):
    """`device_map.map` parsed once, when the stages are bound: module prefix ("" is the whole model) -> device
    key. Whether each prefix is a module of the model is checked at plan time (`_explicit`)."""

    @classmethod
    def parse(cls, value, key: str = "device_map.map") -> ExplicitMap:
        if value is None:
            return cls()
        if not hasattr(value, "items"):
            raise UserError(f"{key}: expected a mapping of module prefix -> device, got {value!r}")
        out = {}
        for prefix, device in value.items():
            prefix = "" if prefix in (None, "") else str(prefix)
            out[prefix] = device_key(device, f"{key}.{prefix}")
        return cls(tuple(out.items()))


class CapsTooSmall(UserError):
    """The caps cannot hold the model: the plan stage adds which keys would make it fit (planning/fits.py)."""


def resolve_caps(max_memory: MaxMemory) -> Caps:
    """The caps in bytes; free memory is read only where a cap says auto or no map is given."""
    if max_memory.given and not max_memory.auto:
        return max_memory.sizes
    from accelerate.utils import get_max_memory

    free = {device_key(k): v for k, v in get_max_memory().items() if str(k) != "mps"}
    if not max_memory.given:
        return Caps.of(free)
    missing = [d for d in max_memory.auto if d not in free]
    if missing:
        raise UserError(
            f"memory.max_memory.{missing[0]}: auto, but this machine has no device {missing[0]}; give a size instead"
        )
    return Caps.of({**max_memory.sizes, **{d: free[d] for d in max_memory.auto}})


def compute_device_map(
    model,
    tensors: dict[str, TensorPlan],
    *,
    strategy: str,
    explicit_map: Mapping[str, str] | None,
    caps: Mapping[str, int],
    no_split: list[str],
) -> dict[str, str]:
    """The device map: the user's explicit map (checked against the model), or a strategy filling the caps."""
    if strategy not in STRATEGIES:
        raise UserError(f"device_map.strategy: unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "cpu":
        return {"": "cpu"}
    if strategy == "explicit":
        return _flatten(model, _explicit(model, explicit_map))
    sizes = _subtree_sizes(tensors)
    units = _Units(model, tensors, sizes, set(no_split))
    caps = dict(caps)
    gpus = [d for d in caps if d.isdigit()]
    targets = caps
    if strategy in ("balanced", "balanced_low_0") or (strategy == "auto" and len(gpus) > 1):
        targets = _balanced_targets(caps, gpus, sizes.get("", 0), low_zero=strategy == "balanced_low_0")
    return _fill(units, caps, targets)


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
    """The module tree as placeable units: a module, or a tensor held directly by a split module.

    A module without child modules (a Linear head, an Embedding) is never split into its tensors:
    accelerate's hooks attach to modules, so a tensor entry on disk would never be loaded (issue 29).
    """

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
        if type(module).__name__ in self.no_split or not any(True for _ in module.children()):
            return None  # a leaf module stays whole, as accelerate's planner keeps it: hooks attach to modules
        prefix = f"{name}." if name else ""
        out = [
            prefix + leaf
            for leaf, v in list(module._parameters.items()) + list(module._buffers.items())
            if v is not None and prefix + leaf in self.tensors
        ]
        out += [prefix + child for child, _ in module.named_children() if prefix + child in self.sizes]
        return out or None

    def groups_in(self, name: str) -> set[str]:
        prefix = f"{name}." if name else ""
        return {g for n, g in self.tied_group.items() if n == name or n.startswith(prefix)}


def _balanced_targets(caps, gpus, total, low_zero) -> dict[str, int]:
    """An even share of the model per GPU (GPU 0 none with low_zero); the last GPU takes what is left.

    accelerate pads each share by the largest layer, which on small or few-layer
    models piles most of the model on the first GPU; we aim at the even share
    and let a block overshoot it only when that lands closer to the share.
    """
    if len(gpus) < 2:
        return caps
    used = gpus[1:] if low_zero else gpus
    share = math.ceil(total / len(used))
    out = dict(caps)
    for g in gpus[:-1]:
        out[g] = 0 if (low_zero and g == gpus[0]) else min(caps[g], share)
    return out


def _fill(units: _Units, caps: dict[str, int], targets: dict[str, int]) -> dict[str, str]:
    """Place units in order; `caps` are hard limits, `targets` the share each device aims at."""
    devices = sorted(caps, key=device_order)
    if not devices:
        raise UserError("memory.max_memory: no device to place the model on; give at least cpu: <size>")
    left = dict(caps)
    aim = dict(targets)
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
        elif i < len(devices) and size <= left[devices[i]] and _closer(size, aim[devices[i]]):
            dev = devices[i]
        elif kids is not None:
            queue[:0] = kids
            continue
        else:
            i += 1
            if i >= len(devices):
                need = size + sum(units.sizes.get(q, 0) for q in queue)
                raise CapsTooSmall(
                    f"memory.max_memory.{devices[-1]}: {need} bytes ({format_bytes(need)}) missing: the caps "
                    f"{', '.join(f'{d}: {format_bytes(c)}' for d, c in caps.items())} cannot hold the model; "
                    f"raise a cap or allow offload (add cpu or disk)"
                )
            queue.insert(0, name)
            continue
        dmap[name] = dev
        left[dev] -= size
        aim[dev] -= size
        for g in groups:
            group_device.setdefault(g, dev)
    return _merge(dmap)


def _closer(size: int, aim_left: int) -> bool:
    """Placing `size` leaves the device nearer its target than stopping here (always, within target)."""
    return size <= aim_left or size - aim_left < aim_left


def _merge(dmap: dict[str, str]) -> dict[str, str]:
    """One entry for the whole model when everything landed on one device (as accelerate does)."""
    if len(set(dmap.values())) == 1:
        return {"": next(iter(dmap.values()))}
    return dmap


def _explicit(model, explicit_map: Mapping[str, str] | None) -> dict[str, str]:
    """The parsed map (ExplicitMap; internal callers pass a plain {prefix: device}) checked against the model."""
    if not explicit_map:
        raise UserError(
            "device_map.map: the explicit strategy needs a map of module prefix -> device; see pipeline/conf/device_map/explicit.yaml"
        )
    modules = {n for n, _ in model.named_modules()}
    out = {}
    for prefix, dev in explicit_map.items():
        if prefix not in modules:
            raise UserError(
                f"device_map.map: {prefix!r} is not a module of {type(model).__name__}; use names from model.named_modules()"
            )
        out[prefix] = dev
    return out


def _flatten(model, dmap: dict[str, str]) -> dict[str, str]:
    """The explicit map as accelerate's hooks need it: no entry inside another (issue 29).

    An entry with deeper entries under it ({model: cpu, model.layers.0: disk}) is replaced by its
    child modules and direct tensors, each on the device of its deepest prefix; otherwise the outer
    module's hook would move the inner, offloaded (still meta) tensors at dispatch.
    """
    out = dict(dmap)
    while True:
        outer = next((p for p in out if any(q != p and (not p or q.startswith(f"{p}.")) for q in out)), None)
        if outer is None:
            return out
        dev = out.pop(outer)
        module = model.get_submodule(outer) if outer else model
        prefix = f"{outer}." if outer else ""
        for leaf, v in list(module._parameters.items()) + list(module._buffers.items()):
            if v is not None:
                out.setdefault(prefix + leaf, dev)
        for child, _ in module.named_children():
            out.setdefault(prefix + child, dev)


def check_caps(predicted: dict[str, int], caps: Mapping[str, int]) -> None:
    """Exit 2 naming the device and the missing bytes when a cap cannot hold its share."""
    for dev, need in predicted.items():
        cap = caps.get(dev)
        if cap is None:
            if not caps:
                continue
            raise UserError(
                f"memory.max_memory: the plan puts {format_bytes(need)} on {dev}, which has no cap; add memory.max_memory.{dev}"
            )
        if need > cap:
            raise CapsTooSmall(
                f"memory.max_memory.{dev}: the plan needs {need} bytes ({format_bytes(need)}) but the cap is "
                f"{cap} ({format_bytes(cap)}): {need - cap} bytes missing; raise the cap or allow offload to cpu/disk"
            )


def assign_devices(tensors: dict[str, TensorPlan], device_map: dict[str, str]) -> dict[str, TensorPlan]:
    """Every tensor on the device of its deepest device_map prefix; tied members must share their canonical's."""
    placed: dict[str, TensorPlan] = {}
    uncovered = []
    for name, t in tensors.items():
        dev = owner(name, device_map)
        if dev is None:
            uncovered.append(name)
        else:
            placed[name] = replace(t, device=dev)
    if uncovered:
        more = f" (and {len(uncovered) - 1} more)" if len(uncovered) > 1 else ""
        raise UserError(
            f"device_map.map: no entry covers {uncovered[0]!r}{more}; add a prefix for it or an entry for '' as the default"
        )
    for t in placed.values():
        if t.tied_to and placed[t.tied_to].device != t.device:
            raise UserError(
                f"device_map.map: tied weights {t.tied_to!r} and {t.name!r} are mapped to different devices "
                f"({placed[t.tied_to].device} and {t.device}); map them to one device"
            )
    return placed
