"""User-facing errors, typed.

Everything the user can cause (bad files, shapes, flags, masks the fold cannot honour) is a
`UserError`; the CLI prints its message on one line and exits with its `exit_code` (2; 3
where a target's runtime or hardware is missing). Python callers of gate2deploy.compile()
catch the subclass they care about. Anything else escaping is a bug in gate2deploy and keeps
its traceback.

This module is the bottom layer: it imports nothing.
"""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name where the message is
    empty: what a one-line error report quotes of an underlying failure."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class UserError(Exception):
    """A problem with the user's input, reported as one line, exit code 2."""

    exit_code = 2


class OptionError(UserError):
    """An option or flag value that is out of range or contradicts another."""


class CheckpointError(UserError):
    """A checkpoint or model file that cannot be read, is not trusted, or does not fit --model."""


class VerificationError(UserError):
    """The compiled model does not reproduce the PyTorch model; nothing was written."""


class UnfoldableError(UserError):
    """A mask touches channels the fold cannot remove exactly (names the node and reason)."""


class TargetUnavailableError(UserError):
    """The target's runtime or hardware is missing here (TensorRT, a GPU): exit code 3."""

    exit_code = 3
