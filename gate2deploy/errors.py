"""User-facing errors.

Everything the user can cause (bad files, shapes, flags, masks the fold cannot honour) is
raised as `UserError`; the CLI prints its message on one line and exits with code 2.
Anything else escaping is a bug in gate2deploy and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line, exit code 2."""

    exit_code = 2


class UnfoldableError(UserError):
    """A mask touches channels the fold cannot remove exactly (names the node and reason)."""
