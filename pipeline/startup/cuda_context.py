"""Create the CUDA context through the driver, off the GIL, while Python imports.

torch's `torch.cuda.init()` holds the GIL for the driver's cuInit and the primary context; called through
ctypes the same driver calls release it, and torch later takes that primary context instead of making one.
No torch here. Best effort; a machine without libcuda does nothing (docs/design.md, "The CUDA context off
the GIL").
"""

from __future__ import annotations

import ctypes
import threading

CUDA_CONTEXTS: dict[int, object] = {}  # GPU index -> its retained primary context (None until made), for life


def retain_primary_contexts(devices: list[int]) -> threading.Thread | None:
    """Start a daemon thread that initialises the driver and retains the primary context of
    each device index in `devices` not asked for before (indices as torch sees them,
    CUDA_VISIBLE_DEVICES applied)."""
    devices = [d for d in devices if d not in CUDA_CONTEXTS]
    try:
        libcuda = ctypes.CDLL("libcuda.so.1") if devices else None
    except OSError:
        return None
    if libcuda is None:
        return None
    CUDA_CONTEXTS.update(dict.fromkeys(devices))
    thread = threading.Thread(target=_retain, args=(libcuda, devices), name="cuda_context", daemon=True)
    thread.start()
    return thread


def _retain(libcuda, devices: list[int]) -> None:
    try:
        if libcuda.cuInit(0) != 0:
            return
        count = ctypes.c_int(0)
        if libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return
        for index in devices:
            if not 0 <= index < count.value:
                continue
            dev, ctx = ctypes.c_int(0), ctypes.c_void_p()
            if libcuda.cuDeviceGet(ctypes.byref(dev), index) == 0 and (
                libcuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
            ):
                CUDA_CONTEXTS[index] = ctx  # kept for the process's life, as torch keeps its own
    except (AttributeError, OSError):
        pass
