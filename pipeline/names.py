"""Matching names: module patterns, deepest-prefix device lookup, checkpoint keys to model names."""

from __future__ import annotations

from fnmatch import fnmatchcase


def matches(name: str, pattern: str) -> bool:
    """`pattern` matches a module or tensor name as a glob, or as one of its dotted parts ("lm_head")."""
    pattern = str(pattern)
    return fnmatchcase(name, pattern) or pattern in name.split(".") or name.startswith(pattern + ".")


def owner(name: str, mapping: dict):
    """The value of the deepest key in `mapping` that is `name` or a dotted prefix of it ("" matches all)."""
    probe = name
    while True:
        if probe in mapping:
            return mapping[probe]
        if not probe:
            return None
        probe = probe.rpartition(".")[0]


def map_checkpoint_keys(ckpt_keys, model_names: set[str], prefix: str | None) -> tuple[dict[str, str], list[str]]:
    """{checkpoint key: model name} and the unexpected keys (no model tensor takes them).

    Handles checkpoints saved from the base model (no `model.` prefix) or with it
    when loading into a head model, and legacy LayerNorm gamma/beta names.
    """
    mapping: dict[str, str] = {}
    unexpected: list[str] = []
    for key in ckpt_keys:
        target = _candidate(key, model_names, prefix)
        if target is None:
            unexpected.append(key)
        else:
            mapping[key] = target
    return mapping, unexpected


def _candidate(key: str, names: set[str], prefix: str | None):
    for k in (key, _legacy(key)):
        if k in names:
            return k
        if prefix:
            if f"{prefix}.{k}" in names:
                return f"{prefix}.{k}"
            if k.startswith(prefix + ".") and k[len(prefix) + 1 :] in names:
                return k[len(prefix) + 1 :]
    return None


def _legacy(key: str) -> str:
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key
