"""Memory sizes, and `memory.max_memory` parsed once into typed values.

YAML gives GPU keys as ints (`0:`) while command-line overrides give strings
(`+memory.max_memory.0=`); values come as ints, "20GiB" (binary) or "500MB"
(decimal). `MaxMemory.parse` turns the user's map into a `MaxMemory` (what was asked:
sizes, `auto` devices, or nothing) when the stages are bound; the plan resolves it into
`Caps` (device -> bytes), which everything downstream reads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

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


@dataclass(frozen=True, eq=False)
class FrozenMap(Mapping):
    """A read-only mapping for a parsed config value: no stage can change what the plan was made from."""

    items_: tuple = ()

    def __getitem__(self, key):
        return dict(self.items_)[key]

    def __iter__(self):
        return (k for k, _ in self.items_)

    def __len__(self) -> int:
        return len(self.items_)

    def __hash__(self) -> int:
        return hash(self.items_)


class Caps(FrozenMap):
    """Resolved memory caps: device ("0", "cpu", "disk") -> bytes, in the order devices are filled."""

    @classmethod
    def of(cls, sizes: Mapping) -> Caps:
        """From device keys already normalised (device_key) and sizes in bytes."""
        return cls(tuple(sorted(((str(k), int(v)) for k, v in sizes.items()), key=lambda kv: device_order(kv[0]))))


@dataclass(frozen=True)
class MaxMemory:
    """`memory.max_memory` as the user gave it, parsed once: sizes in bytes, devices capped at their free
    memory (`auto`, read at plan time), and whether a map was given at all (null: every device's free memory)."""

    sizes: Caps = Caps()
    auto: tuple[str, ...] = ()
    given: bool = False

    @classmethod
    def parse(cls, value, key: str = "memory.max_memory") -> MaxMemory:
        """The one parser of caps; UserError (exit 2) naming `key` and the fix on a bad device or size."""
        if value is None:
            return cls()
        if not hasattr(value, "items"):
            raise UserError(f"{key}: expected a mapping of device -> size, got {value!r}")
        parsed: dict[str, int | None] = {}  # None: auto
        for device, size in value.items():
            auto = isinstance(size, str) and size.strip().lower() == "auto"
            parsed[device_key(device, key)] = None if auto else parse_size(size, f"{key}.{device}")
        free = sorted((d for d, v in parsed.items() if v is None), key=device_order)
        return cls(Caps.of({d: v for d, v in parsed.items() if v is not None}), tuple(free), True)

    @property
    def devices(self) -> tuple[str, ...]:
        """Every device the map names, sized or auto, in fill order."""
        return tuple(sorted((*self.sizes, *self.auto), key=device_order))

    def __bool__(self) -> bool:
        return bool(self.devices)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
