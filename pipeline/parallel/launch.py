"""One run directory for all ranks: rank 0's, sent to the others before Hydra makes its own.

Each torchrun process composes the config itself, and `${now:...}` in hydra.run.dir
would give each a different directory. So the CLI and load() join the process group
first and take rank 0's directory; only rank 0 writes report.json, plan.json, run.log
and .hydra/ there (the others add run.rank<N>.log).
"""

from __future__ import annotations

from .group import broadcast, ensure_group, lost_rank
from .spec import ParallelSpec


def agree_run_dir(parallel: ParallelSpec, candidate: str) -> str:
    """Rank 0's `candidate` on every rank (the candidate itself when the run is not distributed)."""
    if not parallel.distributed:
        return candidate
    try:
        ensure_group(parallel)
        return str(broadcast(str(candidate), parallel))
    except RuntimeError as exc:  # a rank that never came, or went: one line on every rank
        raise lost_rank(exc, parallel) or exc from None


def cli_overrides(parallel: ParallelSpec, run_dir: str) -> list[str]:
    """Overrides that put every rank's Hydra job in rank 0's directory; only rank 0 keeps .hydra/."""
    out = [f"hydra.run.dir={run_dir}"]
    if not parallel.is_main:
        out.append("hydra.output_subdir=null")
    return out


def parallel_spec(cfg, *, dry_run: bool = True) -> ParallelSpec:
    """The `parallel` group of a composed config against torchrun's environment. The runner says whether its
    stages read weights (dry_run=False: parallel=tensor then needs torchrun); agreeing on a directory needs not."""
    from omegaconf import OmegaConf

    node = cfg.get("parallel")
    node = OmegaConf.to_container(node, resolve=True) if node is not None else None
    return ParallelSpec.from_config(node, dry_run=dry_run)
