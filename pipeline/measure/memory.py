"""Measure memory: peak host anonymous memory during a load, and bytes a model holds per device."""

from __future__ import annotations

import threading

import torch

from ..sizes import device_order


def host_anon_bytes() -> int:
    """RssAnon of this process (heap, not the page cache or mapped checkpoint files); 0 where unknown."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakAnonSampler:
    """Samples RssAnon in a thread every `interval` seconds; `peak` is the highest seen."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.baseline = host_anon_bytes()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, host_anon_bytes())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, host_anon_bytes())


def device_str(device: torch.device) -> str:
    return str(device.index or 0) if device.type == "cuda" else device.type


def quant_tensors(name: str, weight) -> list[tuple[str, torch.Tensor]]:
    """The tensors bitsandbytes keeps beside a quantized weight (int8 SCB; 4-bit absmax, code books, offset,
    nested state), under the names transformers saves them as (`<module>.SCB`, `<weight>.absmax`...)."""
    state = getattr(weight, "quant_state", None)
    nested = getattr(state, "state2", None)
    parts = (
        (f"{name.removesuffix('.weight')}.SCB", getattr(weight, "SCB", None)),
        (f"{name}.absmax", getattr(state, "absmax", None)),
        (f"{name}.quant_map", getattr(state, "code", None)),
        (f"{name}.offset", getattr(state, "offset", None)),
        (f"{name}.nested_absmax", getattr(nested, "absmax", None)),
        (f"{name}.nested_quant_map", getattr(nested, "code", None)),
    )
    return [(n, t) for n, t in parts if isinstance(t, torch.Tensor)]


def local_tensor(t):
    """A tensor-parallel parameter's own shard (a DTensor's local tensor); any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def measured_bytes(model: torch.nn.Module, offload=None) -> dict[str, int]:
    """Bytes held per device by parameters, buffers and quantization state, each storage counted once,
    plus what accelerate holds for offloaded modules (CPU copies, tensors referenced on disk)."""
    seen: set[tuple] = set()
    out: dict[str, int] = {}

    def add(t):
        if t is None or t.device.type == "meta":
            return
        t = local_tensor(t)  # tensor parallel: the bytes this rank holds
        key = (str(t.device), t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            return
        seen.add(key)
        dev = device_str(t.device)
        out[dev] = out.get(dev, 0) + t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
        for _, t in quant_tensors("", p):  # Int8Params' row scales, Params4bit's absmax and code books
            add(t)
    for b in model.buffers():
        add(b)
    for m in model.modules():  # after a first forward, Linear8bitLt moves the scales into its state
        add(getattr(getattr(m, "state", None), "SCB", None))
    if offload is not None:
        from ..loading.offload import offloaded_bytes

        for dev, n in offloaded_bytes(offload).items():
            out[dev] = out.get(dev, 0) + n
    return dict(sorted(out.items(), key=lambda kv: device_order(kv[0])))
