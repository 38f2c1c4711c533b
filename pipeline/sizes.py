"""Memory sizes and max_memory maps, normalised in one place.

YAML gives GPU keys as ints (`0:`) while command-line overrides give strings
(`+memory.max_memory.0=`); values come as ints, "20GiB" (binary) or "500MB"
(decimal). Everything downstream sees {"0": bytes, "cpu": bytes, "disk": bytes}.
"""

from __future__ import annotations

import math
import re

from .errors import UserError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value, key: str = "size") -> int:
    """Bytes from 123, "20GiB", "500MB", "1.5 GB". Raises UserError naming `key`."""
    if isinstance(value, bool):
        raise UserError(f"{key}: {value!r} is not a size; use bytes or a string like 20GiB or 500MB")
    if isinstance(value, int):
        if value < 0:
            raise UserError(f"{key}: {value} is negative; sizes are bytes >= 0")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise UserError(f"{key}: {value} is not a size; use bytes >= 0 or a string like 20GiB (no inf or nan)")
        return int(value)
    m = _SIZE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(
            f"{key}: {value!r} is not a size; use bytes or a number with a unit "
            f"(B, KB, MB, GB, TB decimal; KiB, MiB, GiB, TiB binary), e.g. 20GiB"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def device_key(key, where: str = "memory.max_memory") -> str:
    """Normalise a device key: 0 / "0" / "cuda:0" -> "0"; "cpu"; "disk"."""
    k = str(key).strip().lower()
    if k.startswith("cuda:"):
        k = k[5:]
    if k.isdigit():
        return str(int(k))
    if k in ("cpu", "disk"):
        return k
    raise UserError(f"{where}: unknown device key {key!r}; use a GPU index (0, 1, ...), cpu or disk")


def device_order(key: str) -> tuple:
    """Sort GPUs by index, then cpu, then disk (the order accelerate fills them)."""
    if key.isdigit():
        return (0, int(key))
    return (1, 0) if key == "cpu" else (2, 0)


def normalize_max_memory(max_memory, where: str = "memory.max_memory") -> dict[str, int | str] | None:
    """{"0": bytes, "cpu": bytes}; a value "auto" stays "auto" (read free memory later)."""
    if max_memory is None:
        return None
    if not hasattr(max_memory, "items"):
        raise UserError(f"{where}: expected a mapping of device -> size, got {max_memory!r}")
    out: dict[str, int | str] = {}
    for key, value in max_memory.items():
        dk = device_key(key, where)
        if isinstance(value, str) and value.strip().lower() == "auto":
            out[dk] = "auto"
        else:
            out[dk] = parse_size(value, f"{where}.{key}")
    return dict(sorted(out.items(), key=lambda kv: device_order(kv[0])))


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
