"""The loaded model's generation config, as `from_pretrained` sets it.

transformers builds a model's `generation_config` from config.json at construction;
`from_pretrained` then replaces it with generation_config.json when the checkpoint has
one (eos ids, max_new_tokens, sampling defaults, ...). We call the same transformers
method `from_pretrained` calls (`adjust_generation_fn`, through hf/modeling.py), offline, on the checkpoint
directory, so `generate()` defaults are the ones a transformers user gets.
"""

from __future__ import annotations

import json
import os

from ..errors import UserError
from ..hf.modeling import adjust_generation

FILE_NAME = "generation_config.json"


def apply_generation_config(model, directory: str, trust_remote_code: bool = False) -> None:
    """Set `model.generation_config` from `directory` as from_pretrained does (no-op for models that do not generate)."""
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        return
    gen_file = os.path.join(directory, FILE_NAME)
    if os.path.isfile(gen_file):
        try:
            with open(gen_file) as fh:
                json.load(fh)
        except json.JSONDecodeError as exc:  # transformers would fall back to config.json without a word
            raise UserError(f"{gen_file}: not valid JSON ({exc.msg}, line {exc.lineno}); fix or delete it") from None
    try:
        adjust_generation(model, directory, trust_remote_code)
    except ValueError as exc:  # a field transformers rejects
        raise UserError(f"{gen_file}: transformers rejects it ({str(exc).splitlines()[0][:160]}); fix it") from None
