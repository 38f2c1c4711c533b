"""Which device executes the model, what counts as offloaded, and which offloaded layers stay unquantized.

Pure decisions over planned tensors; loading/offload.py attaches accelerate's hooks
that carry them out.
"""

from __future__ import annotations

from collections.abc import Iterable


def main_device(devices: Iterable[str]) -> str:
    """The execution device: the first GPU in the plan, else the CPU."""
    gpus = sorted((d for d in devices if d.isdigit()), key=int)
    return gpus[0] if gpus else "cpu"


def offloaded_devices(main: str) -> set[str]:
    """Devices whose modules do not live where they execute."""
    return {"disk"} if main == "cpu" else {"cpu", "disk"}


def runs_on_cpu(tensors: dict, quantized_modules: Iterable[str], main: str) -> bool:
    """True when CPU-planned modules execute on the CPU (they hold quantized layers, which accelerate
    cannot stream to the GPU) rather than being streamed to the GPU per forward."""
    if main == "cpu":
        return False
    return any(tensors[f"{m}.weight"].device == "cpu" for m in quantized_modules)


def needs_dispatch(devices: Iterable[str]) -> bool:
    devices = set(devices)
    return "disk" in devices or len(devices) > 1


def demoted_modules(
    tensors: dict, quantized_modules: Iterable[str], *, keep_offloaded: bool, main: str
) -> dict[str, str]:
    """Quantizable layers that stay in their load dtype because of where they are offloaded, with the reason.

    Disk layers are read in place from the checkpoint at forward time, so they are never
    quantized; CPU layers under a GPU are kept when quantization.offloaded=keep.
    """
    offloaded = offloaded_devices(main)
    kept = offloaded if keep_offloaded else offloaded & {"disk"}
    out = {}
    for m in quantized_modules:
        device = tensors[f"{m}.weight"].device
        if device in kept:
            out[m] = (
                "offloaded to disk (read in place from the checkpoint at forward time, so kept in its load dtype)"
                if device == "disk"
                else f"offloaded to {device} with quantization.offloaded=keep"
            )
    return out
