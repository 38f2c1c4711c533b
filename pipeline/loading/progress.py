"""The load's progress bar: bytes and tensors with their rate, on a terminal (or when forced)."""

from __future__ import annotations

import sys


def progress_bar(total: int, tensors: int, progress: bool | None):
    """A tqdm bar, or None when stderr is not a terminal (and progress is not forced) or progress=false."""
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="load_shards", file=sys.stderr)
    bar.tensors_total, bar.tensors_done = tensors, 0
    return bar


def tick(bar) -> None:
    """One more tensor done."""
    if bar is not None:
        bar.tensors_done += 1
        bar.set_postfix_str(f"{bar.tensors_done}/{bar.tensors_total} tensors", refresh=False)
