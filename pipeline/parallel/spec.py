"""ParallelSpec: the `parallel` config group, checked against the torchrun environment before any stage runs.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in every process it starts; that is how
a rank knows who it is. A dry run needs none of it: parallel.world_size=4 plans four
ranks in one process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import UserError
from ..schema import ParallelSchema

MODES = ("none", "tensor")
BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("auto", "cpu", "cuda")
LAUNCH = "torchrun --nproc_per_node N -m pipeline parallel=tensor ..."
_DEFAULT = ParallelSchema()  # the `parallel` group's one default per key


@dataclass(frozen=True)
class ParallelSpec:
    mode: str = _DEFAULT.mode
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1  # ranks per node (torchrun's LOCAL_WORLD_SIZE): rank r uses GPU r % this
    launched: bool = False  # started by torchrun: RANK and WORLD_SIZE are in the environment
    backend: str = "gloo"
    device_type: str = "cpu"  # where every rank's shards live: "cpu" or "cuda" (its local GPU)
    timeout_s: float = (
        _DEFAULT.timeout_s
    )  # a rank that stops answering ends every rank after this long (parallel.timeout_s)
    save_logits: bool = _DEFAULT.save_logits

    @property
    def enabled(self) -> bool:
        return self.mode == "tensor"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A real multi-process run (a process group), as opposed to a dry run planning all ranks here."""
        return self.enabled and self.launched

    def device_of(self, rank: int) -> str:
        """The plan's device key of `rank`: "cpu", or its GPU index on its node (its local rank)."""
        if self.device_type == "cpu":
            return "cpu"
        return str(self.local_rank if rank == self.rank else rank % self.local_world_size)

    @classmethod
    def from_config(cls, node: Mapping | None, *, dry_run: bool, env: Mapping[str, str] | None = None) -> ParallelSpec:
        env = os.environ if env is None else env
        node = dict(node or {})
        mode = str(node.get("mode", _DEFAULT.mode))
        if mode not in MODES:
            raise UserError(f"parallel.mode: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        launched = "RANK" in env and "WORLD_SIZE" in env
        if mode == "none":
            if launched and int(env["WORLD_SIZE"]) > 1:
                raise UserError(
                    f"parallel: started by torchrun with WORLD_SIZE={env['WORLD_SIZE']} but parallel=none (every "
                    "process would load the whole model); add parallel=tensor"
                )
            return cls()
        world = _world_size(node.get("world_size"), env, launched, dry_run)
        device = _device_type(str(node.get("device", _DEFAULT.device)))
        backend = _backend(str(node.get("backend", _DEFAULT.backend)), device)
        rank = int(env["RANK"]) if launched else 0
        local = int(env.get("LOCAL_RANK", rank)) if launched else 0
        per_node = int(env.get("LOCAL_WORLD_SIZE", world)) if launched else world
        if launched and device == "cuda":
            _check_gpu(local)
        return cls(
            mode=mode,
            world_size=world,
            rank=rank,
            local_rank=local,
            local_world_size=max(per_node, 1),
            launched=launched,
            backend=backend,
            device_type=device,
            timeout_s=_timeout(node.get("timeout_s", _DEFAULT.timeout_s)),
            save_logits=bool(node.get("save_logits", _DEFAULT.save_logits)),
        )


def _world_size(given, env, launched: bool, dry_run: bool) -> int:
    if given is not None:
        try:
            given = int(given)
        except (TypeError, ValueError):
            raise UserError(f"parallel.world_size: {given!r} is not a whole number; give e.g. 2") from None
        if given < 1:
            raise UserError(f"parallel.world_size: {given} must be at least 1")
    if launched:
        actual = int(env["WORLD_SIZE"])
        if given is not None and given != actual:
            raise UserError(
                f"parallel.world_size={given} but torchrun started {actual} processes; drop parallel.world_size "
                f"or use torchrun --nproc_per_node {given}"
            )
        return actual
    if not dry_run:
        what = f"parallel.world_size={given}: " if given is not None else "parallel=tensor: "
        raise UserError(
            f"{what}this process was not started by torchrun (no RANK/WORLD_SIZE in the environment); "
            f"launch it with {LAUNCH}, or plan only: stages=[instantiate_empty,plan]"
        )
    return given or 1


def _timeout(value) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        shown = f"{seconds:g}" if seconds == seconds else repr(value)  # as typed: the schema makes 0 a float
        raise UserError(f"parallel.timeout_s: {shown} is not a positive number of seconds; give e.g. 60")
    return seconds


def _device_type(device: str) -> str:
    if device not in DEVICES:
        raise UserError(f"parallel.device: unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _backend(backend: str, device: str) -> str:
    if backend not in BACKENDS:
        raise UserError(f"parallel.backend: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if device == "cuda" else "gloo"
    if backend == "nccl" and device == "cpu":
        raise UserError("parallel.backend=nccl needs GPUs but the ranks run on the CPU; use parallel.backend=gloo")
    return backend


def _check_gpu(local_rank: int) -> None:
    import torch

    n = torch.cuda.device_count()
    if local_rank >= n:
        raise UserError(
            f"parallel: local rank {local_rank} has no GPU (this machine has {n}); start at most {n} processes "
            "per node (torchrun --nproc_per_node) or use parallel.device=cpu"
        )


def env_rank(node: Mapping | None) -> int:
    """This process's rank when the run is tensor parallel under torchrun, else 0 (decides who writes run files)."""
    if str(dict(node or {}).get("mode", _DEFAULT.mode)) != "tensor" or "RANK" not in os.environ:
        return 0
    try:
        return int(os.environ["RANK"])
    except ValueError:
        return 0
