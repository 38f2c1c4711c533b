"""config.json values checked before a model is built from them: a bad value is one exit-2 line naming the key.

transformers checks some values itself (huggingface_hub's strict dataclasses: `hidden_size: "64"`,
a hidden size heads do not divide) and trips over others while building the model
(`num_attention_heads: 0` divides by zero); either way it raises a multi-line error of its own,
or a ZeroDivisionError, that would read as a bug of ours. Here the sizes and head counts are checked
first, and whatever transformers still raises from the config becomes a `UserError` naming
config.json and, when the message says which, the key.
"""

from __future__ import annotations

import re

from ..errors import UserError

# Integer sizes (>= 0, or null where the architecture allows it) across the common families.
SIZE_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "max_position_embeddings", "head_dim",
    "n_embd", "n_layer", "n_positions", "n_inner", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
)  # fmt: skip
# Head counts divide sizes: > 0.
HEAD_KEYS = ("num_attention_heads", "num_key_value_heads", "n_head", "num_heads")
# Exceptions transformers raises from config values (while reading the config or building the model on meta).
CONFIG_ERRORS = (ValueError, TypeError, ZeroDivisionError, AttributeError, IndexError, KeyError, RuntimeError)


def check_config_values(doc, cfg_file: str) -> None:
    """config.json is a JSON object whose sizes are integers >= 0 and whose head counts are > 0."""
    if not isinstance(doc, dict):
        raise UserError(
            f"{cfg_file}: a JSON {type(doc).__name__}, not an object of settings; re-save the model's config.json"
        )
    for key in SIZE_KEYS + HEAD_KEYS:
        value = doc.get(key)
        if value is None:
            continue
        least = 1 if key in HEAD_KEYS else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise UserError(
                f"{cfg_file}: {key} is {value!r}; it must be an integer >= {least} (a number, not a string)"
            )


def config_error(exc: BaseException, doc, cfg_file: str, when: str) -> UserError:
    """One line naming config.json and the key the error is about (when its message names one)."""
    inner = exc.__cause__ or exc
    text = " ".join(f"{type(inner).__name__}: {inner}".split())
    key = _key_in(text, doc)
    where = f"{cfg_file}: {key}" if key else cfg_file
    return UserError(f"{where}: {text[:200]} (transformers, {when}); fix the value in config.json")


def _key_in(text: str, doc) -> str | None:
    """The first config.json key the message names (quoted field names first, then any key spelled out)."""
    keys = [k for k in doc if isinstance(k, str)] if isinstance(doc, dict) else []
    quoted = re.findall(r"'(\w+)'", text)
    for word in quoted + re.findall(r"\w+", text):
        if word in keys:
            return word
    spelled = " ".join(re.findall(r"[a-z]+", text.lower()))
    named = next((k for k in keys if k.replace("_", " ") in spelled), None)  # "The hidden size (63) ..."
    words = set(re.findall(r"[\w.-]+", text))
    return named or next((k for k in keys if isinstance(doc[k], str) and doc[k] in words), None)  # its value
