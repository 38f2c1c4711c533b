"""The torch.distributed process group of a tensor-parallel run, its device mesh, and the few collectives we use.

The group is made from torchrun's environment (env:// rendezvous): gloo on the CPU,
NCCL with one GPU per rank. Everything a rank tells another goes through here.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import RankLost
from .spec import ParallelSpec

_mesh = None
_joined: ParallelSpec | None = None  # the spec this process joined the group with (shutdown's error names it)
# How gloo, NCCL and the store say that another rank did not answer in time, or went away.
_TIMED_OUT = ("timed out", "timeout")
_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused")


def ensure_group(spec: ParallelSpec) -> None:
    """Join the process group once per process (a no-op when it exists or for a dry run)."""
    global _joined
    if not spec.distributed or dist.is_initialized():
        return
    _joined = spec
    device_id = None
    if spec.device_type == "cuda":
        torch.cuda.set_device(spec.local_rank)
        device_id = torch.device("cuda", spec.local_rank)
    dist.init_process_group(
        backend=spec.backend,
        timeout=timedelta(seconds=spec.timeout_s),
        device_id=device_id if spec.backend == "nccl" else None,
    )


def mesh(spec: ParallelSpec):
    """The 1-D device mesh over all ranks that transformers' tensor-parallel styles work on."""
    global _mesh
    if _mesh is None:
        ensure_group(spec)
        from torch.distributed.device_mesh import init_device_mesh

        _mesh = init_device_mesh(spec.device_type, (spec.world_size,), mesh_dim_names=("tp",))
    return _mesh


def broadcast(obj, spec: ParallelSpec):
    """Rank 0's `obj` on every rank (the object itself for a dry run)."""
    if not spec.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj, spec: ParallelSpec) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not spec.distributed:
        return [obj]
    out = [None] * spec.world_size
    dist.all_gather_object(out, obj)
    return out


def lost_rank(exc: BaseException, spec: ParallelSpec | None) -> RankLost | None:
    """A collective that failed because another rank stopped answering or ended, as one line; None otherwise."""
    if spec is None or not spec.distributed or not isinstance(exc, RuntimeError):  # DistError is a RuntimeError
        return None
    text = str(exc).lower()
    logs = "rank 0's run.log and run.rank<N>.log in the run directory"
    if any(m in text for m in _TIMED_OUT):
        return RankLost(
            f"parallel: rank {spec.rank} waited {spec.timeout_s:g} s (parallel.timeout_s) for another rank that did "
            f"not answer (hung, stopped or died); see {logs}, or raise parallel.timeout_s if a rank needs longer"
        )
    if any(m in text for m in _GONE):
        return RankLost(f"parallel: rank {spec.rank} lost another rank, which ended or was stopped mid-run; see {logs}")
    return None


def shutdown(finished: bool = True) -> bool:
    """Destroy this process's group, if it made one; True when it did.

    After a finished run every rank waits for the others first: a rank that closes its gloo
    connections while another still uses them made that one abort at exit ("terminate called
    without an active exception", 3 of 16 runs). After an error no barrier: the other ranks may
    be in another collective, and a mismatched barrier would hang them.
    """
    global _mesh
    _mesh = None
    if dist.is_initialized():
        try:
            if finished:
                dist.barrier()
        except RuntimeError as exc:
            raise lost_rank(exc, _joined) or exc from None
        finally:
            dist.destroy_process_group()
        return True
    return False


def end_process(finished: bool, code: int | None) -> None:
    """The CLI's last step: leave the process group, if this process joined one, and end the process with `code`.

    Without C++ teardown (os._exit): gloo's threads, still owned by the model's DTensors, aborted
    the process at exit ("terminate called without an active exception", about 1 run in 10 even
    after the barrier). Everything the run writes is written and flushed by then. Returns when
    there was no group (or no exit code yet: an exception still on its way up).
    """
    try:
        made = shutdown(finished)
    except RankLost as exc:  # the last barrier: a rank stopped answering after this one's run
        print(f"error: {exc}", file=sys.stderr)
        made, code = True, exc.exit_code
    if made and code is not None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
