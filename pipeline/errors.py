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
    status = "error"


class CheckFailed(PipelineError):
    """A validation check failed: exit 1, the failures are listed in the report."""

    exit_code = 1
    status = "failed"


class OutOfMemory(UserError):
    """The host or a GPU ran out of memory during a stage: exit 2, naming the stage and the fix."""
