"""Progress of validate's long steps: the reference and perplexity counted in layers, greedy text in tokens.

A cold reference of a large model streams every layer from disk and a greedy continuation runs one forward per
token; without these lines a long validate says nothing after "stage validate". The count comes from forward
hooks on the model's repeated blocks (the classes `_no_split_modules` names; else its longest ModuleList), so it
works on any model, offloaded or not, and the lines are loading/progress.py's Progress (rate-limited).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from ..hf.modeling import no_split_modules
from ..loading.progress import Progress

log = logging.getLogger(__name__)


def blocks(model) -> list[torch.nn.Module]:
    """The modules one forward runs once each, in order: the model's layers; [model] when it has none."""
    names = set(no_split_modules(model))
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    longest = max(lists, key=len, default=None)
    return list(longest) if longest is not None and len(longest) > 1 else [model]


@contextmanager
def counted(modules: list[torch.nn.Module], what: str, total: int, unit: str, interval: float):
    """Progress lines for `what` while the block runs: one step each time one of `modules` finishes a forward."""
    progress = Progress(f"validate {what}", total, unit, interval, log)
    hook = lambda *_: progress.advance()  # noqa: E731
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield progress
    finally:
        for h in handles:
            h.remove()
        progress.finish()


def layers(model, what: str, interval: float, forwards: int = 1):
    """Progress of `forwards` full forward passes of `model`, in layers."""
    found = blocks(model)
    return counted(found, what, len(found) * forwards, "layer", interval)


def tokens(model, what: str, interval: float, new_tokens: int):
    """Progress of generate(), in new tokens: one forward of the whole model per token."""
    return counted([model], what, new_tokens, "token", interval)
