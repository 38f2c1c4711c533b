"""A cache for the expensive validation metrics: the unquantized reference and perplexity.

The reference (the checkpoint streamed unquantized, measure/reference.py) and the
perplexity of a loaded model cost most of `validate` (seconds on a CPU) and give the
same numbers whenever their inputs are the same. So they are kept, under
$MODEL_LOADER_METRICS_CACHE (default $MODEL_LOADER_CACHE/metrics; never the
checkpoint directory), keyed by everything that determines them:

- the checkpoint's identity: every weight, config and tokenizer file's path, size,
  mtime and inode (a rewritten shard is a new key);
- the dtype policy, the device the forward runs on, the evaluation text's hash and
  token limit, torch / transformers / bitsandbytes versions and a hash of this
  package's source (any code change is a new key);
- for the loaded model's own metrics also the plan (every tensor's device, dtype,
  shape, quantization) and the quantization settings.

The checks that prove the load (meta tensors, devices, dtypes, caps, a finite forward
pass) never come from here: they run on every load. The logits error is computed
each time from this load's forward output against the reference's cached logits.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..cache_home import cache_dir
from . import quality

ENV = "MODEL_LOADER_METRICS_CACHE"
_TOKENIZER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "special_tokens_map.json",
    "spiece.model",
)


def cache_root() -> Path | None:
    """Where metrics are kept; None when $MODEL_LOADER_METRICS_CACHE is `off`."""
    value = os.environ.get(ENV)
    if value and value.lower() in ("off", "0", "false", "none"):
        return None
    return Path(value) if value else Path(cache_dir()) / "metrics"


def file_identity(paths) -> list[list]:
    """[path, size, mtime_ns, inode] of each existing file: changes whenever a file is rewritten."""
    out = []
    for p in sorted({os.path.abspath(p) for p in paths}):
        try:
            st = os.stat(p)
        except OSError:
            continue
        out.append([p, st.st_size, st.st_mtime_ns, st.st_ino])
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
    from importlib.metadata import PackageNotFoundError, version

    names = ["torch", "transformers", "accelerate"] + (["bitsandbytes"] if quantized else [])
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def text_hash(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


def digest(doc) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class MetricCache:
    """Two entries per load: the reference's (logits on the fixed inputs, its perplexity) and the loaded
    model's own (perplexity, greedy continuation). A missing or unreadable entry is a miss."""

    root: Path
    reference_key: str
    model_key: str

    def get_reference(self) -> dict | None:
        import torch

        path = self.root / "reference" / f"{self.reference_key}.pt"
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # missing, truncated or from another torch: measure again
            return None

    def put_reference(self, entry: dict) -> None:
        import torch

        self._atomic(self.root / "reference" / f"{self.reference_key}.pt", lambda fh: torch.save(entry, fh))

    def get_model(self) -> dict:
        try:
            return json.loads((self.root / "model" / f"{self.model_key}.json").read_text())
        except (OSError, ValueError):
            return {}

    def put_model(self, entry: dict) -> None:
        data = json.dumps(entry, sort_keys=True).encode()
        self._atomic(self.root / "model" / f"{self.model_key}.json", lambda fh: fh.write(data))

    @staticmethod
    def _atomic(path: Path, write) -> None:
        """Written beside, then renamed: parallel sweep jobs never read half a file. Best effort:
        a cache that cannot be written (read-only home) costs the next run time, nothing else."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            with os.fdopen(fd, "wb") as fh:
                write(fh)
            os.replace(tmp, path)
        except OSError:
            pass


def metric_cache(checkpoint, plan, policy, spec, settings, device: str) -> MetricCache | None:
    """The cache entries for this load and these metric settings; None when the cache is off."""
    root = cache_root()
    if root is None or checkpoint.format != "safetensors":
        return None
    directory = checkpoint.directory
    try:
        text = quality.eval_text(settings.eval_text)
    except OSError:
        return None  # measuring reports the unreadable file as it always did
    base = {
        "files": file_identity(list(checkpoint.files) + [os.path.join(directory, f) for f in _TOKENIZER_FILES]),
        "policy": {"name": policy.name, "overrides": dict(policy.overrides)},
        "device": device,
        "eval_text": text_hash(text),
        "max_eval_tokens": settings.max_eval_tokens,
        "versions": library_versions(spec.enabled),
        "code": code_version(),
    }
    tensors = {name: t.to_json() for name, t in sorted(plan.tensors.items())}
    model = {
        **base,
        "plan": digest([tensors, plan.device_map, plan.int8_thresholds]),
        "quantization": spec.to_json(),
        "prompt": settings.prompt,
        "max_new_tokens": settings.max_new_tokens,
    }
    return MetricCache(root, digest(base), digest(model))
