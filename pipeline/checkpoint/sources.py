"""Where `checkpoint.path` points: a local directory or .safetensors file, a Hub repo id already in the local
Hugging Face cache (resolved offline by huggingface_hub's own cache API), or a .gguf file (converted once into
$MODEL_LOADER_CACHE/gguf/<sha256 of the file>, never beside the source). docs/design.md, "Where
checkpoint.path points".
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile

from ..cache_home import cache_dir
from ..errors import UserError

log = logging.getLogger(__name__)

# owner/name as the Hub spells repo ids (a single legacy name such as `gpt2` has no owner)
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def resolve_checkpoint(path: str, revision: str | None = None) -> str:
    """The local directory or file `path` names: itself, its Hub-cache snapshot, or its GGUF conversion."""
    local = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(local):
        if revision:
            raise UserError(f"checkpoint.revision: {revision!r} applies to Hub repo ids; {local} is a local path")
        return convert_gguf(local) if local.endswith(".gguf") else local
    if REPO_ID.match(path) and not path.startswith((".", "~")) and not path.endswith((".gguf", ".safetensors")):
        return hub_snapshot(path, revision)
    raise UserError(
        f"checkpoint.path: {local} does not exist; point checkpoint.path at a model directory, a .safetensors or "
        ".gguf file, or a Hub repo id (owner/name) in your Hugging Face cache"
    )


def hub_snapshot(repo_id: str, revision: str | None) -> str:
    """The cached snapshot of `repo_id` at `revision` (default: the cache's main ref); never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError:
        at = f" --revision {revision}" if revision else ""
        raise UserError(
            f"checkpoint.path: {repo_id}{'@' + revision if revision else ''} is not in the Hugging Face cache "
            f"({_hub_cache()}); fetch it first: hf download {repo_id}{at}"
        ) from None
    log.info("checkpoint %s: the Hugging Face cache's snapshot %s", repo_id, snapshot)
    return snapshot


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def convert_gguf(gguf_file: str) -> str:
    """The bf16 safetensors conversion of `gguf_file`, made once under the cache (safe against parallel jobs)."""
    digest = _sha256(gguf_file)
    dest = os.path.join(cache_dir(), "gguf", digest[:32])
    if os.path.isdir(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(dest):
            write_gguf_conversion(gguf_file, dest)
    return dest


def write_gguf_conversion(gguf_file: str, dest: str) -> None:
    """Read `gguf_file` with transformers (dequantized), write it to `dest` as 100 MB bf16 shards + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(gguf_file)
    log.info("converting %s once into %s", gguf_file, dest)
    try:  # a GGUF never carries code: trust_remote_code is always passed, so transformers never asks
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=torch.float32, trust_remote_code=False
        )
    except (ValueError, KeyError, OSError) as exc:
        raise UserError(
            f"checkpoint.path: {gguf_file} cannot be converted ({_gguf_architecture(gguf_file)}: "
            f"{str(exc).splitlines()[0][:160]}); convert it to safetensors with a tool that knows it"
        ) from None
    model.hf_quantizer = None  # transformers refuses to save a model read from GGUF: it carries a GGUF quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(dest))
    try:
        model.save_pretrained(tmp, max_shard_size="100MB")
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _gguf_architecture(gguf_file: str) -> str:
    """`general.architecture` from the file's metadata, for the error message."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(gguf_file).fields["general.architecture"]
        return f"architecture {bytes(field.parts[field.data[0]]).decode()}"
    except Exception:  # the message names what it can; the conversion error follows it
        return "architecture unknown"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()
