"""The two kinds of failure a user sees, each with its exit code (DESIGN.md).

UserError (exit 2): bad input or config; the message is one line that names the
file, tensor or key and says what to do. CheckFailed (exit 1): the load ran but
a validation check did not hold.
"""


class PipelineError(Exception):
    exit_code = 1
    status = "error"


class UserError(PipelineError):
    """Bad input or config: exit 2, one line naming the culprit and the fix."""

    exit_code = 2


class CheckFailed(PipelineError):
    """A validation check failed: exit 1, the failures are listed in the report."""

    status = "failed"


class RankLost(PipelineError):
    """Tensor parallel: another rank stopped answering (parallel.timeout_s) or ended; exit 1, said by every rank."""

    every_rank = True


class OutOfMemory(UserError):
    """The host or a GPU ran out of memory during a stage: exit 2, naming the stage and the fix."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT during a run: report.json says `interrupted`; the CLI exits 128 + the signal (143, 130).

    A KeyboardInterrupt, so code that stops on Ctrl-C stops on SIGTERM (Slurm, torchrun) alike; `.result`
    carries what was loaded so far."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {self.signal_name}")
