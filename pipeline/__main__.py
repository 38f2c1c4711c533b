"""`python -m pipeline [overrides]`: the only @hydra.main. Exit 0 ok, 1 a check failed, 2 bad input."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

_task_started = False


@hydra.main(version_base="1.3", config_path="pkg://pipeline.conf", config_name="config")
def _app(cfg: DictConfig) -> str:
    global _task_started
    _task_started = True
    try:
        return _task(cfg)
    except Exception as exc:  # Hydra reports any Exception as a traceback; a signal behind one is a signal
        from .engine.signals import interruption_in

        signal = interruption_in(exc)
        if signal is None or os.environ.get("PIPELINE_DEBUG"):
            raise
        raise signal from None  # a KeyboardInterrupt: main() says it in one line, exit 143/130


def _task(cfg: DictConfig) -> str:
    from .startup import start_cuda

    start_cuda(cfg)  # the driver makes the GPU's context, off the GIL, while torch is imported
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .engine.report import format_summary
    from .engine.runner import run
    from .errors import PipelineError
    from .parallel.spec import env_rank

    hc = HydraConfig.get()
    _check_permissions(cfg, hc)
    run_dir = hc.runtime.output_dir
    main_rank = env_rank(cfg.get("parallel")) == 0  # tensor parallel: rank 0 speaks for all ranks
    try:
        result = run(cfg, run_dir, reuse=hc.mode == RunMode.MULTIRUN and bool(cfg.get("sweep_reuse", True)))
    except BaseException as exc:
        result = getattr(exc, "result", None)
        if result is None or os.environ.get("PIPELINE_DEBUG"):
            raise  # not from the runner (or debugging): Hydra / Python show the traceback
        if result.report["stages"] and main_rank:
            print(format_summary(result.report, run_dir))
        # bad input and checks are alike on every rank (rank 0 says them); a lost rank is each rank's own
        if main_rank or not isinstance(exc, PipelineError) or getattr(exc, "every_rank", False):
            print(f"error: {result.report['error']}", file=sys.stderr)
        code = exc.exit_code if isinstance(exc, PipelineError) else 1
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C 130, SIGTERM 143 (pipeline.errors.Interrupted)
            code = getattr(exc, "exit_code", 130)
        if hc.mode == RunMode.MULTIRUN and isinstance(exc, KeyboardInterrupt):  # a signal stops the whole sweep
            from .sweeps.summary import summarize

            summarize(Path(hc.sweep.dir))  # the jobs so far, the interrupted one last
        elif hc.mode == RunMode.MULTIRUN:  # the sweep goes on; report.json says what happened
            return _sweep_value(cfg, result.report)
        raise SystemExit(code) from None
    if main_rank:
        print(format_summary(result.report, run_dir))
    return _sweep_value(cfg, result.report)


def _check_permissions(cfg: DictConfig, hc) -> None:
    """What Hydra composed itself (-cp, or flags the pre-flight leaves to Hydra): permissions from the command line only."""
    from omegaconf import OmegaConf

    from .engine.compose import check_permissions_given
    from .errors import UserError

    try:
        check_permissions_given(OmegaConf.to_container(cfg, resolve=False), list(hc.overrides.task), hc.job.config_name)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None


def _sweep_value(cfg: DictConfig, report: dict):
    """What a job returns to the sweeper: the objective when one is configured, else the status."""
    spec = cfg.get("sweep_objective")
    if not spec:
        return report["status"]
    from omegaconf import OmegaConf

    from .sweeps.objective import objective

    return objective(report, OmegaConf.to_container(spec, resolve=True))


def main() -> None:
    from .startup.command import begin
    from .startup.usage import command_name

    sys.argv[0] = command_name()  # Hydra's usage and `-sc install=bash` name the command the user ran
    # collector, --help/--version, pre-flight, signals, torchrun's shared run directory: pipeline/startup/__init__.py
    sys.argv[1:] = begin(sys.argv[1:])
    finished, code = False, None
    try:
        _app()
        finished, code = True, 0
    except SystemExit as exc:
        finished = exc.code in (0, None)
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        # Hydra exits 1 on its own config errors (before our task ran): those are bad input.
        if not finished and not _task_started:
            code = 2
            raise SystemExit(2) from None
        raise
    except KeyboardInterrupt as exc:  # a signal the runner's report did not take (e.g. while it was ending)
        if os.environ.get("PIPELINE_DEBUG"):
            raise
        code = getattr(exc, "exit_code", 130)
        print(f"error: {exc or 'interrupted by the user (Ctrl-C)'}", file=sys.stderr)
        raise SystemExit(code) from None
    finally:
        from .parallel.group import end_process

        end_process(finished, code)  # a torchrun rank ends here (its process group's teardown workaround)
        gc.freeze()  # the process ends here: no collector pass over what is still alive
    _end_sweep()  # outside the try: the jobs may have run in other processes (submitit, Ray), not as our task


def _end_sweep() -> None:
    """A sweep whose summary counts jobs that did not end ok exits 1 (the summary is written by then)."""
    from .sweeps.summary import outcome

    if outcome["root"] is not None and outcome["failed"]:
        failed, root = outcome["failed"], outcome["root"]
        print(f"error: {failed} sweep job(s) did not end ok; see {root}/summary.md", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
