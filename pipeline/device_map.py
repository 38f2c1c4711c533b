"""Device-map strategies: cpu, explicit maps, and accelerate's planner for the rest.

accelerate's infer_auto_device_map decides which module goes where (it knows
no-split classes and tied weights); we feed it our exact per-tensor dtypes so
its decisions use the sizes the load will really produce.
"""
from __future__ import annotations

import torch

from .errors import UserError
from .sizes import device_key, format_bytes, normalize_max_memory

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential", "cpu", "explicit")


def resolve_max_memory(max_memory) -> dict[str, int]:
    """Caps in bytes; free memory is read only where a cap says auto or no map is given."""
    caps = normalize_max_memory(max_memory)
    if caps is not None and all(v != "auto" for v in caps.values()):
        return caps
    from accelerate.utils import get_max_memory

    free = {device_key(k): v for k, v in get_max_memory().items() if str(k) != "mps"}
    if caps is None:
        return free
    out = {}
    for k, v in caps.items():
        if v == "auto":
            if k not in free:
                raise UserError(f"memory.max_memory.{k}: auto, but this machine has no device {k}; give a size instead")
            v = free[k]
        out[k] = v
    return out


def compute_device_map(model, *, strategy: str, explicit: dict | None, max_memory: dict[str, int],
                       no_split: list[str], dtypes: dict[str, torch.dtype]) -> dict[str, str]:
    if strategy not in STRATEGIES:
        raise UserError(f"device_map.strategy: unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "cpu":
        return {"": "cpu"}
    if strategy == "explicit":
        return _explicit(model, explicit)
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    caps = {(int(k) if k.isdigit() else k): v for k, v in max_memory.items()}
    gpus = [k for k in caps if isinstance(k, int)]
    if strategy in ("balanced", "balanced_low_0") or (strategy == "auto" and len(gpus) > 1):
        caps = get_balanced_memory(model, max_memory=caps, no_split_module_classes=no_split,
                                   special_dtypes=dtypes, low_zero=strategy == "balanced_low_0")
    dm = infer_auto_device_map(model, max_memory=caps, no_split_module_classes=no_split,
                               special_dtypes=dtypes, verbose=False)
    return {name: str(dev) for name, dev in dm.items()}


def _explicit(model, explicit) -> dict[str, str]:
    if not explicit:
        raise UserError("device_map.map: the explicit strategy needs a map of module prefix -> device; see conf/device_map/explicit.yaml")
    modules = {n for n, _ in model.named_modules()}
    out = {}
    for prefix, dev in explicit.items():
        prefix = "" if prefix in (None, "", "''") else str(prefix)
        if prefix not in modules and prefix != "":
            raise UserError(f"device_map.map: {prefix!r} is not a module of {type(model).__name__}; use names from model.named_modules()")
        out[prefix] = device_key(dev, f"device_map.map.{prefix}")
    return out


def check_caps(predicted: dict[str, int], caps: dict[str, int]) -> None:
    """Exit 2 naming the device and the missing bytes when a cap cannot hold its share."""
    for dev, need in predicted.items():
        cap = caps.get(dev)
        if cap is None:
            if dev in ("cpu", "disk") or not caps:
                continue
            raise UserError(f"memory.max_memory: the plan puts {format_bytes(need)} on device {dev}, which has no cap; add memory.max_memory.{dev}")
        if need > cap:
            raise UserError(
                f"memory.max_memory.{dev}: the plan needs {need} bytes ({format_bytes(need)}) but the cap is "
                f"{cap} ({format_bytes(cap)}): {need - cap} bytes missing; raise the cap or allow offload to cpu/disk"
            )
