"""Matching names: module patterns and deepest-prefix device lookup (checkpoint keys: hf/conversions.py)."""

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
