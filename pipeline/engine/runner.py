"""Run the configured stages in order over one LoadContext; time them; write report.json.

The report is written whatever happens (ok, failed check, bad input, crash,
Ctrl-C), atomically, so a sweep or a user always finds out what went on.
"""

from __future__ import annotations

import logging
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import OutOfMemory, PipelineError, UserError
from ..hf.version import untested_warning
from ..parallel import strategy_for
from ..parallel.launch import parallel_spec
from ..parallel.spec import env_rank
from ..quant.spec import QuantSpec
from ..stages.context import LoadContext
from ..stages.traits import traits_of
from ..startup import start_cuda, start_reading
from .artifacts import write_json
from .binding import bind_stage, grants_of
from .environment import environment
from .report import new_report
from .result import LoadResult
from .reuse import remember, reuse_key
from .reuse import take as reuse_take
from .signals import describe, interruptible, interruption_in
from .write_guard import check_writes_outside

log = logging.getLogger("pipeline")


def bind_stages(cfg: DictConfig) -> list[tuple[str, object]]:
    stages = cfg.get("stages")
    if not stages:
        raise UserError("stages: no stages selected; use e.g. stages=[instantiate_empty,plan]")
    extra = list(cfg.get("allow_targets") or [])
    try:
        grants = grants_of(cfg)  # checkpoint.trust_remote_code / allow_pickle govern every node's arguments
        return [(name, bind_stage(name, node, extra, grants)) for name, node in stages.items()]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise UserError(f"{key}: {str(exc).splitlines()[0]}; set it on the command line, e.g. {key}=...") from None


def run(cfg: DictConfig, run_dir: Path | str, *, reuse: bool = False) -> LoadResult:
    """Run every stage; raise PipelineError (with .result attached) when the run is not ok.

    reuse=True (sweeps): keep the loaded model for the next job if it differs only in
    the int8 threshold (see engine/reuse.py).
    """
    run_dir = Path(run_dir)
    _refuse_writes_into_checkpoint(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start_cuda(cfg)  # the CLI asked already, before torch was imported: once per GPU and process
    start_reading(cfg)  # before the model code is imported: the disk works while Python does
    ctx = LoadContext(cfg=cfg, run_dir=run_dir, report=new_report())
    report = ctx.report
    error: BaseException | None = None
    rank = env_rank(cfg.get("parallel"))  # tensor parallel: only rank 0 writes report.json and artifacts
    with _log_to(run_dir / ("run.log" if rank == 0 else f"run.rank{rank}.log"), rank), interruptible() as guard:
        try:
            if warning := untested_warning():
                log.warning(warning)
            stages = bind_stages(cfg)
            _precheck(stages, cfg, run_dir)
            ctx.quant = _quant_spec(cfg)
            dry_run = not any(traits_of(stage).loads_weights for _, stage in stages)
            ctx.parallel = strategy_for(parallel_spec(cfg, dry_run=dry_run))  # one process, or tensor parallel
            ctx.parallel.join()
            reuse = reuse and ctx.parallel.reusable
            ctx, done, key = _take_reused(ctx, stages) if reuse else (ctx, [], None)
            for i, (name, stage) in enumerate(stages):
                if name in done:
                    continue
                _run_stage(name, stage, ctx)
                if key is not None and traits_of(stage).loads_weights:
                    remember(key, ctx, [n for n, _ in stages[: i + 1]])
            report["status"] = "ok"
        except PipelineError as exc:
            report["status"], report["error"], error = exc.status, str(exc), exc
        except KeyboardInterrupt as exc:
            report["status"], report["error"], error = "interrupted", describe(exc, report["stages"]), exc
        except Exception as exc:
            if (signal := interruption_in(exc)) is not None:  # a signal a library wrapped on its way up
                report["status"], report["error"], error = "interrupted", describe(signal, report["stages"]), signal
            else:
                error = _unexpected_error(exc, ctx, run_dir)
        finally:
            guard.hold()  # a signal now waits until report.json is written
            report["environment"] = environment()
            if rank == 0:
                write_json(run_dir / "report.json", report)
    result = LoadResult(ctx.model, report, run_dir)
    if error is not None:
        error.result = result
        raise error
    return result


def _precheck(stages, cfg: DictConfig, run_dir: Path) -> None:
    """Each stage's own check of its keys (stages/traits.py), before any stage runs: a bad value costs no load."""
    for _, stage in stages:
        precheck = traits_of(stage).precheck
        if precheck is not None:
            precheck(cfg, run_dir, dict(stage.keywords))


def _refuse_writes_into_checkpoint(cfg: DictConfig, run_dir: Path) -> None:
    """Before the run directory exists: never inside the checkpoint (engine/write_guard.py); no report is written."""
    try:
        check_writes_outside(cfg, "hydra.run.dir", run_dir)
    except UserError as exc:
        exc.result = LoadResult(None, {**new_report(), "status": "error", "error": str(exc)}, run_dir)
        raise


def start_context(cfg: DictConfig, run_dir: Path | str) -> LoadContext:
    """A fresh context for `cfg` (what run() starts from): empty report, validated quantization spec."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    parallel = strategy_for(parallel_spec(cfg))
    return LoadContext(cfg=cfg, run_dir=run_dir, report=new_report(), quant=_quant_spec(cfg), parallel=parallel)


def _take_reused(ctx: LoadContext, stages) -> tuple[LoadContext, list[str], str | None]:
    """The context of the previous sweep job when only the threshold changed (and the stages it ran)."""
    key = reuse_key(ctx.cfg, stages)
    taken = reuse_take(key, ctx)
    if taken is None:
        return ctx, [], key
    reused, done = taken
    reused.report["stages"] += [{"name": n, "status": "ok", "seconds": 0.0, "reused": True} for n in done]
    log.info(
        "reusing the model loaded for %s (only the threshold changed)",
        reused.report.get("quantization", {}).get("reused_from"),
    )
    return reused, done, key


def _unexpected_error(exc: Exception, ctx: LoadContext, run_dir: Path) -> BaseException:
    """Out of memory is the user's to fix (exit 2, the model dropped); anything else is a bug of ours."""
    report = ctx.report
    lost = ctx.parallel.lost(exc)
    if lost is not None:  # tensor parallel: another rank stopped answering or ended
        log.error("%s\n%s", lost, traceback.format_exc(), extra={"file_only": True})  # the traceback: run.log
        report["status"], report["error"] = lost.status, str(lost)
        return lost
    if _is_oom(exc):
        stage = report["stages"][-1]["name"] if report["stages"] else "setup"
        error = OutOfMemory(
            f"out of memory in stage {stage} ({_first_line(exc)}); lower memory.max_memory "
            f"for that device or allow offload to cpu/disk"
        )
        report["status"], report["error"] = error.status, str(error)
        ctx.model = None  # free what the load allocated
        _release_memory()
        return error
    log.error("internal error:\n%s", traceback.format_exc())  # the traceback goes to run.log
    report["status"] = "error"
    report["error"] = f"internal error {exc.__class__.__name__}: {exc} (traceback in {run_dir / 'run.log'})"
    return exc


def _quant_spec(cfg: DictConfig) -> QuantSpec:
    """The `quantization` group, validated before any stage runs (a bad value costs no load)."""
    node = cfg.get("quantization")
    return QuantSpec.from_config(OmegaConf.to_container(node, resolve=True) if node is not None else None)


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or any(
        s in text for s in ("out of memory", "can't allocate memory", "can't start new thread")
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_stage(name: str, stage, ctx: LoadContext) -> None:
    entry = {"name": name, "status": "running", "seconds": 0.0}
    ctx.report["stages"].append(entry)
    log.info("stage %s", name)
    start = time.perf_counter()
    try:
        stage(ctx)
        _write_artifacts(ctx)
        entry["status"] = "ok"
    except PipelineError as exc:
        entry["status"] = exc.status
        raise
    except KeyboardInterrupt:
        entry["status"] = "interrupted"
        raise
    except BaseException:
        entry["status"] = "error"
        raise
    finally:
        entry["seconds"] = round(time.perf_counter() - start, 4)


def _write_artifacts(ctx: LoadContext) -> None:
    """Files a stage produced (plan.json...), written atomically into the run directory."""
    while ctx.artifacts:
        name, doc = ctx.artifacts.popitem()
        if ctx.parallel.writes_files:  # tensor parallel: rank 0 writes for all ranks
            write_json(ctx.run_dir / name, doc)


@contextmanager
def _log_to(path: Path, rank: int = 0):
    """The pipeline's log lines go to run.log (and to stderr, once per process; tagged with the rank when not 0)."""
    logger = logging.getLogger("pipeline")
    logger.setLevel(logging.INFO)
    logger.propagate = False  # Hydra's root handler would print every line twice
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.FileHandler(path)
    handler.setFormatter(fmt)
    logger.addHandler(handler)
    if not any(getattr(h, "_pipeline_console", False) for h in logger.handlers):
        console = logging.StreamHandler()
        tag = f" rank {rank}" if rank else ""
        console.setFormatter(logging.Formatter(f"[%(levelname)s{tag}] %(message)s"))
        console._pipeline_console = True
        console.addFilter(lambda record: not getattr(record, "file_only", False))
        logger.addHandler(console)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def save_config(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> None:
    """What the CLI's .hydra/ holds, for runs started from Python."""
    hydra_dir = Path(run_dir) / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (hydra_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
