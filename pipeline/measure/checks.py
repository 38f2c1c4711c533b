"""The checks that prove a load right, each a named boolean (switchable in pipeline/conf/stages/validate.yaml).

A false check names what failed; the validate stage turns any failure into exit 1.
"""

from __future__ import annotations

import logging
import time

import torch

from ..planning import Plan
from .memory import device_str, local_tensor, measured_bytes, quant_tensors

log = logging.getLogger(__name__)

CHECKS = (
    "no_meta_tensors",
    "all_parameters_loaded",
    "all_checkpoint_tensors_used",
    "devices_as_planned",
    "dtypes_as_planned",
    "shapes_as_planned",
    "tied_weights_tied",
    "within_memory_caps",
    "plan_matches_measured",
    "weights_finite",
    "forward_finite",
)
# Checks of tensor-parallel runs only: the gathered logits equal the single-process model's.
PARALLEL_CHECKS = ("matches_single_process",)


class CheckLog:
    """Results and failure reasons of the enabled checks."""

    def __init__(self, enabled: dict[str, bool]):
        self.enabled = enabled
        self.results: dict[str, bool] = {}
        self.failures: dict[str, str] = {}
        self.skipped: dict[str, str] = {}  # check or metric -> why it could not run on this model

    def __call__(self, name: str, ok: bool, why: str) -> None:
        if self.enabled[name]:
            self.results[name] = bool(ok)
            if not ok:
                self.failures[name] = why
                log.error("check %s failed: %s", name, why)

    def skip(self, name: str, why: str) -> None:
        """A check or metric that cannot run on this model: reported with its reason, not a failure."""
        if self.enabled.get(name, True):
            self.skipped[name] = why
            log.info("%s skipped: %s", name, why)


def check_tensors(model, plan: Plan, tied_groups, offload, check: CheckLog, floating=None) -> list[str]:
    """Everything loaded, as planned, tied; returns the names still on meta. `floating`: the names the skeleton
    held as floating point, which must still be floating unless quantized (an `I32` norm that got past the plan)."""
    offloaded = _offloaded_names(offload)
    tensors = dict(named_tensors(model))
    meta = [n for n, t in tensors.items() if t.device.type == "meta" and n not in offloaded]
    check("no_meta_tensors", not meta, f"still on meta: {names_list(meta)}")
    allowed = plan.missing_allowed  # initialised as transformers does (checkpoint.allow_missing), listed in the report
    check(
        "all_parameters_loaded", allowed or not plan.missing, f"missing from the checkpoint: {names_list(plan.missing)}"
    )
    check(
        "all_checkpoint_tensors_used", not plan.unexpected, f"unused checkpoint tensors: {names_list(plan.unexpected)}"
    )
    placed = {n: offloaded.get(n, t) for n, t in tensors.items()}
    planned = [(n, t) for n, t in plan.tensors.items() if n in placed]
    check("devices_as_planned", *_mismatch(planned, placed, _device_of, lambda t: t.device, "device"))
    ok, why = _mismatch(planned, placed, lambda x: x.dtype, lambda t: t.dtype, "dtype")
    lost = [
        n for n, t in planned if n in (floating or ()) and not t.quantized and not placed[n].dtype.is_floating_point
    ]
    check("dtypes_as_planned", ok and not lost, why if not ok else _not_floating(lost, placed))
    check("shapes_as_planned", *_mismatch(planned, placed, _logical_shape, lambda t: t.shape, "shape"))
    untied = [
        g
        for g in tied_groups
        if not any(n in offloaded for n in g) and len({placed[n].data_ptr() for n in g if n in placed}) > 1
    ]
    check("tied_weights_tied", not untied, f"no longer tied: {', '.join(untied[0]) if untied else ''}")
    return meta


def check_memory(model, plan: Plan, offload, check: CheckLog, tolerance: float) -> tuple[dict, dict]:
    """Measured bytes per device against the plan and the caps; returns (measured, plan_error)."""
    measured = measured_bytes(model, offload)
    predicted = plan.predicted_bytes
    plan_error = {d: round((measured.get(d, 0) - p) / p, 6) if p else 0.0 for d, p in predicted.items()}
    for d in measured:
        plan_error.setdefault(d, 1.0)
    over = [
        f"{d} holds {n} bytes, cap {plan.max_memory[d]}"
        for d, n in measured.items()
        if d in plan.max_memory and n > plan.max_memory[d]
    ]
    check("within_memory_caps", not over, "; ".join(over))
    worst = max((abs(e) for e in plan_error.values()), default=0.0)
    check(
        "plan_matches_measured",
        worst <= tolerance,
        f"measured bytes differ from the plan by up to {worst:.2%} (tolerance {tolerance:.2%})",
    )
    return measured, plan_error


# Default sample on the CPU: every element. A sample misses exactly what this check is for (one NaN row of an
# embedding no input reads); a full scan costs 48 ms of the default job's ~9 s run, and on models whose mapped
# shards the load itself never reads, the scan is the first read of pages validate's forward reads anyway
# (docs/design.md). weights_finite_sample=N reads 1 block in N of large tensors where that matters.
CPU_SAMPLE = 1


def check_weights_finite(model, check: CheckLog, sample: int | None = None) -> dict | None:
    """NaN/Inf in any loaded floating tensor or quantized layer's state (int8 SCB, 4-bit absmax, nested absmax,
    offset, code maps): the forward pass on fixed tokens never sees an embedding row they do not use.

    `sample` 1 reads every element; N reads every N-th block of 4096 elements of each tensor over 1 MiB
    (smaller tensors and quantization state always whole); None: every element on GPUs, 1 in CPU_SAMPLE on
    the CPU. Returns what was read, for the report.
    """
    if not check.enabled["weights_finite"]:
        return None
    start, bad, scanned, total, sampled = time.perf_counter(), [], 0, 0, 0
    for name, t in finite_targets(model):
        every = sample or (CPU_SAMPLE if t.device.type == "cpu" else 1)
        seen, ok = _finite(t, every)
        scanned, total, sampled = scanned + seen, total + t.numel(), sampled + (seen < t.numel())
        if not ok:
            bad.append(name)
    check("weights_finite", not bad, f"NaN/Inf in: {names_list(bad)}")
    rule = f"1 in {sample}" if sample else f"every element on GPUs, 1 in {CPU_SAMPLE} on the CPU"
    every_element = (sample or CPU_SAMPLE) == 1
    return {
        "sample": "every element" if every_element else f"{rule} blocks of {_BLOCK} elements (tensors over 1 MiB)",
        "elements": scanned,
        "of": total,
        "sampled_tensors": sampled,
        "seconds": round(time.perf_counter() - start, 4),
    }


def finite_targets(model):
    """(name, tensor) for every floating tensor on a device, and the floating state of bitsandbytes weights
    under the names transformers saves it as (`<module>.SCB`, `<weight>.absmax`, `<weight>.nested_absmax`)."""
    seen = set()
    for name, t in named_tensors(model):
        if t.device.type == "meta" or id(t) in seen:  # a tied weight is read once
            continue
        seen.add(id(t))
        if t.is_floating_point():
            yield name, t
        yield from ((n, x) for n, x in quant_tensors(name, t) if x.is_floating_point() and x.device.type != "meta")


_BLOCK = 4096


def _finite(t: torch.Tensor, sample: int) -> tuple[int, bool]:
    """(elements read, all finite). A finite sum proves every summand finite; only a non-finite sum (NaN, Inf,
    or finite values overflowing, as fp16 can) pays for the exact elementwise test. A sample is a strided view
    of whole blocks, summed in place (a copy of it would cost more than reading every element)."""
    x = t.detach().reshape(-1)
    if x.element_size() == 1:  # float8: no sum kernel of its own
        x = x.float()
    parts = [x]
    if sample > 1 and x.numel() * x.element_size() > 2**20:
        whole = x.numel() - x.numel() % _BLOCK
        parts = [x[:whole].view(-1, _BLOCK)[::sample], x[whole:]]
    ok = all(p.numel() == 0 or bool(torch.isfinite(p.sum())) or bool(torch.isfinite(p).all()) for p in parts)
    return sum(p.numel() for p in parts), ok


def names_list(names) -> str:
    names = list(names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def named_tensors(model):
    """Parameters (a tensor-parallel rank's own shards), then buffers, each name once."""
    seen = set()
    for n, p in model.named_parameters(remove_duplicate=False):
        seen.add(n)
        yield n, local_tensor(p)
    for n, b in model.named_buffers(remove_duplicate=False):
        if n not in seen:
            yield n, b


def _logical_shape(x) -> tuple:
    """A 4-bit weight is stored packed; its quant_state keeps the shape it stands for."""
    state = getattr(x, "quant_state", None)
    return tuple(state.shape) if state is not None and getattr(state, "shape", None) is not None else tuple(x.shape)


def _mismatch(planned, placed, actual, expected, what) -> tuple[bool, str]:
    wrong = [n for n, t in planned if actual(placed[n]) != expected(t)]
    detail = ", ".join(f"{n} ({what} {actual(placed[n])}, planned {expected(t)})" for n, t in planned if n in wrong[:3])
    return not wrong, f"{len(wrong)} tensors differ from the plan: {detail}"


def _not_floating(names, placed) -> str:
    shown = ", ".join(f"{n} ({placed[n].dtype})" for n in names[:3])
    return f"{len(names)} tensors the model holds as floating point are not: {shown}"


class _OnDisk:
    """Stands for a tensor accelerate reads from the checkpoint at forward time."""

    def __init__(self, info):
        self.dtype = getattr(torch, info["dtype"])
        self.shape = tuple(info["shape"])


def _offloaded_names(loader) -> dict:
    """name -> the offloaded tensor (CPU copy) or an _OnDisk stand-in."""
    if loader is None:
        return {}
    out = {n: _OnDisk(info) for n, info in loader.index.items()}
    out.update(loader.state_dict)
    return out


def _device_of(t) -> str:
    return "disk" if isinstance(t, _OnDisk) else device_str(t.device)
