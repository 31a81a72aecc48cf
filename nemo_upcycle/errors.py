"""The one base class of every refusal the user can fix.

Each entry point catches :class:`UserError` alone and prints its message without a
traceback, exit status 2; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input (a configuration, a checkpoint, a path): the message names it and the fix."""

    exit_code = 2
    # True: each rank prints it (what that rank alone saw, e.g. a deadline it waited out); else rank 0 does.
    every_rank = False
