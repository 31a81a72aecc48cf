"""The one base class of every refusal the user can fix.

Each entry point catches :class:`UserError` alone and prints its message without a
traceback, exit status 2; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input (a configuration, a checkpoint, a path): the message names it and the fix."""

    exit_code = 2
