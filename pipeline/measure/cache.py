"""A cache for the expensive validation metrics: the unquantized reference, perplexity, greedy text.

They cost most of `validate` and give the same numbers whenever their inputs are the same, so they are kept;
but a kept figure is reported only if this load earned it: the loaded model's entry by the fingerprint of this
load's weights, the reference's by a sha256 of the shards' bytes. Keys, evidence, checks on read and atomic
best-effort writes: docs/design.md, "The metric cache".
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import secrets
import tempfile
import time
from functools import lru_cache
from pathlib import Path

from ..cache_home import metrics_dir
from ..hf.version import package_version
from . import quality
from .fingerprint import content_digest, weights_fingerprint

log = logging.getLogger(__name__)

SCHEMA = 2  # entries written by earlier versions are misses
_SIDE_SUFFIXES = (".json", ".py", ".txt", ".model", ".jinja", ".tiktoken")  # config, tokenizer, code
_SIDE_MAX_BYTES = 64 << 20


def cache_root() -> Path | None:
    """Where metrics are kept (cache_home.metrics_dir); None when the metric cache is off."""
    root = metrics_dir()
    return Path(root) if root else None


def file_identity(paths) -> list[list]:
    """[path, size, mtime_ns, inode] of each existing file: a copy or a plain rewrite is a new key."""
    out = []
    for p in sorted({os.path.abspath(p) for p in paths}):
        try:
            st = os.stat(p)
        except OSError:
            continue
        out.append([p, st.st_size, st.st_mtime_ns, st.st_ino])
    return out


def side_files(directory: str, weights) -> dict[str, str]:
    """sha256 of every small top-level file beside the weights that can shape the model or its tokens."""
    weights = {os.path.abspath(w) for w in weights}
    out = {}
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return out
    for name in names:
        path = os.path.abspath(os.path.join(directory, name))
        if path in weights or not name.endswith(_SIDE_SUFFIXES) or not os.path.isfile(path):
            continue
        if os.path.getsize(path) <= _SIDE_MAX_BYTES:
            out[name] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


@lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of this package's source files: a changed line anywhere is a new cache key."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def library_versions(quantized: bool) -> dict:
    names = ["torch", "transformers", "accelerate"] + (["bitsandbytes"] if quantized else [])
    return {name: package_version(name) for name in names}


def text_hash(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


def digest(doc) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]


PERPLEXITIES = ("perplexity", "heldout_perplexity")  # on the evaluation text; on the held-out text when measured


def positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def model_entry_problem(entry, fingerprint: str) -> str:
    """Why a loaded model's entry cannot be used ('' when it can): wrong schema or measured on other weights."""
    if not isinstance(entry, dict) or entry.get("schema") != SCHEMA:
        return "not a metric entry of this version"
    if set(entry) - {"schema", "fingerprint", *PERPLEXITIES, "continuation"}:
        return f"unknown fields {sorted(set(entry) - {'schema', 'fingerprint', *PERPLEXITIES, 'continuation'})}"
    for name in PERPLEXITIES:
        if name in entry and not positive_number(entry[name]):
            return f"{name} {entry[name]!r} is not a positive finite number"
    if "continuation" in entry and not isinstance(entry["continuation"], str):
        return "continuation is not a string"
    if not fingerprint or entry.get("fingerprint") != fingerprint:
        return "measured on other weights"
    return ""


def reference_entry_problem(entry, shape) -> str:
    """Why a reference entry cannot be used ('' when it can): logits of this forward's shape, all finite."""
    import torch

    if not isinstance(entry, dict) or entry.get("schema") != SCHEMA or set(entry) - {"schema", "logits", *PERPLEXITIES}:
        return "not a reference entry of this version"
    logits = entry.get("logits")
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        return "its logits are not a float tensor"
    if tuple(logits.shape) != tuple(shape):
        return f"its logits have shape {tuple(logits.shape)}, this forward gives {tuple(shape)}"
    if not bool(torch.isfinite(logits).all()):
        return "its logits are not finite"
    for name in PERPLEXITIES:
        if name in entry and not positive_number(entry[name]):
            return f"its {name} {entry[name]!r} is not a positive finite number"
    return ""


class MetricCache:
    """One load's two entries: the reference's (logits on the fixed inputs, its perplexity) and the loaded model's
    (perplexity, greedy text, and the fingerprint of the weights they were measured on). A missing, unreadable,
    malformed or stale entry is a miss; `report` (report.json `validation.metric_cache`) says what was checked."""

    def __init__(self, root: Path, model_key: str, reference_doc: dict, shards: list[str], fingerprint_with):
        self.root = root
        self.model_key = model_key
        self._reference_doc = reference_doc
        self._shards = shards
        self._fingerprint_with = fingerprint_with  # secret key -> (digest, bytes) of this load's weights
        self._fingerprint: str | None = None
        self._reference_key: str | None = None
        self.report: dict = {"ignored": [], "warnings": []}

    def fingerprint(self) -> str:
        """This load's weights' fingerprint, computed once ('' when no key can be had: nothing can be verified)."""
        if self._fingerprint is None:
            start = time.perf_counter()
            key = self._secret()
            value, nbytes = self._fingerprint_with(key) if key is not None else ("", 0)
            self.report["fingerprint"] = {"digest": value, "bytes": nbytes, "seconds": _since(start)}
            self._fingerprint = value
        return self._fingerprint

    def reference_key(self) -> str | None:
        """The reference's key: the shards' content hash on top of everything else (None when a shard is gone)."""
        if self._reference_key is None:
            start = time.perf_counter()
            try:
                content, nbytes = content_digest(self._shards)
            except OSError:
                return None
            self.report["content"] = {"digest": content, "bytes": nbytes, "seconds": _since(start)}
            self._reference_key = digest({**self._reference_doc, "content": content})
        return self._reference_key

    def get_reference(self, shape) -> dict | None:
        import torch

        key = self.reference_key()
        if key is None or not (path := self.root / "reference" / f"{key}.pt").exists():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, from another torch, not a torch file at all: measure again
            return self._ignore("reference", path, f"unreadable ({type(exc).__name__})")
        problem = reference_entry_problem(entry, shape)
        return self._ignore("reference", path, problem) if problem else entry

    def put_reference(self, entry: dict) -> None:
        import torch

        key = self.reference_key()
        entry = {"schema": SCHEMA, **entry}
        if key is not None and not reference_entry_problem(entry, entry["logits"].shape):
            self._atomic(self.root / "reference" / f"{key}.pt", lambda fh: torch.save(entry, fh))

    def get_model(self) -> dict:
        """The loaded model's cached figures, only if measured on weights with this load's fingerprint."""
        path = self.root / "model" / f"{self.model_key}.json"
        if not path.exists():
            return {}
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):
            return self._ignore("model", path, "unreadable") or {}
        problem = model_entry_problem(entry, self.fingerprint())
        if problem:
            return self._ignore("model", path, problem) or {}
        return {k: entry[k] for k in (*PERPLEXITIES, "continuation") if k in entry}

    def put_model(self, figures: dict) -> None:
        fingerprint = self.fingerprint()
        entry = {"schema": SCHEMA, "fingerprint": fingerprint, **figures}
        if fingerprint and not model_entry_problem(entry, fingerprint):  # a NaN perplexity is never kept
            data = json.dumps(entry, sort_keys=True).encode()
            self._atomic(self.root / "model" / f"{self.model_key}.json", lambda fh: fh.write(data))

    def _ignore(self, which: str, path: Path, why: str) -> None:
        self.report["ignored"].append({"entry": which, "why": why})
        level = logging.INFO if why == "measured on other weights" else logging.WARNING
        log.log(level, "metric cache: %s entry %s not used: %s; measuring it again", which, path.name, why)
        return None

    def _warn(self, message: str) -> None:
        if message not in self.report["warnings"]:
            self.report["warnings"].append(message)
            log.warning(message)

    def _secret(self) -> int | None:
        """The cache directory's own random key for fingerprints, made on first use (0600, like every entry)."""
        path = self.root / "fingerprint.key"
        for _ in range(2):
            try:
                return int(path.read_text().strip(), 16)
            except (OSError, ValueError):
                self._atomic(path, lambda fh: fh.write(secrets.token_hex(8).encode()))
        self._warn(f"metric cache: no fingerprint key in {self.root}: figures are measured, none used from the cache")
        return None

    def _atomic(self, path: Path, write) -> None:
        """Written beside, then renamed: parallel sweep jobs never read half a file. Best effort: a full disk or a
        read-only cache costs the next run time and a warning line, never this load; no temporary file is left."""
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            with os.fdopen(fd, "wb") as fh:
                write(fh)
            os.replace(tmp, path)
            tmp = None
        except Exception as exc:  # OSError (ENOSPC, EROFS, EACCES), torch.save's RuntimeError on a failed write
            why = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            self._warn(f"metric cache: could not write {path} ({why}); the run goes on, measured figures not kept")
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 4)


def model_identity(model, node) -> dict:
    """What builds the model besides its weights: class, `checkpoint.model` node, config and generation config as built."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True)
    config = getattr(model, "config", None)
    generation = getattr(model, "generation_config", None)
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "node": node,
        "config": config.to_dict() if hasattr(config, "to_dict") else None,
        "generation": generation.to_dict() if hasattr(generation, "to_dict") else None,
    }


def numerics(spec, device: str) -> dict:
    """What the float results depend on besides the inputs: the CPU numerics setting (portable int8 or torch's own
    kernels; whether validate measures portably is a metric setting, in the key with the others), the CPU code path
    torch picked, its threads, the GPU."""
    import torch

    out = {
        "cpu_numerics": getattr(spec, "cpu_numerics", None) if spec.enabled else None,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
    if device not in ("cpu", "disk", "meta") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(int(device) if device.isdigit() else torch.device(device))
    return out


def _settings(settings) -> dict:
    """Every metric setting but the switches, the greedy prompt (the loaded model's key adds those) and how often
    progress is logged (it changes no figure)."""
    skip = {"wanted", "eval_text", "heldout_text", "prompt", "max_new_tokens", "progress_interval"}
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name not in skip}


def metric_cache(checkpoint, plan, policy, spec, settings, device: str, *, model, node=None, offload=None):
    """The cache entries for this load and these metric settings; None when the cache is off."""
    root = cache_root()
    if root is None or checkpoint.format != "safetensors":
        return None
    try:
        text = quality.eval_text(settings.eval_text)
        heldout = quality.eval_text(settings.heldout_text, "heldout.txt") if settings.wanted.get("heldout") else None
    except OSError:
        return None  # measuring reports the unreadable file as it always did
    base = {
        "schema": SCHEMA,
        "files": file_identity(checkpoint.files),
        "side_files": side_files(checkpoint.directory, checkpoint.files),
        "model": model_identity(model, node),
        "policy": {"name": policy.name, "overrides": dict(policy.overrides)},
        "device": device,
        "numerics": numerics(spec, device),
        "eval_text": text_hash(text),
        **({"heldout_text": text_hash(heldout)} if heldout is not None else {}),  # keys without it stay as they were
        "settings": _settings(settings),
        "versions": library_versions(spec.enabled),
        "code": code_version(),
    }
    tensors = {name: t.to_json() for name, t in sorted(plan.tensors.items())}
    loaded = {
        **base,
        "plan": digest([tensors, plan.device_map, plan.int8_thresholds]),
        "quantization": spec.to_json(),
        "prompt": settings.prompt,
        "max_new_tokens": settings.max_new_tokens,
    }
    fingerprint_with = lambda key: weights_fingerprint(model, offload, key)  # noqa: E731
    return MetricCache(root, digest(loaded), base, list(checkpoint.files), fingerprint_with)
