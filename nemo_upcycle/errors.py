"""The refusals the user can fix: their one base class, and the upcycling's own.

Each entry point catches :class:`UserError` alone and prints its message without a
traceback, exit status 2; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input (a configuration, a checkpoint, a path): the message names it and the fix."""

    exit_code = 2
    # True: each rank prints it (what that rank alone saw, e.g. a deadline it waited out); else rank 0 does.
    every_rank = False


class UpcycleError(UserError):
    """A refusal of the upcycling, evaluation or training machinery (a checkpoint or a model that
    does not fit what was asked), raised before any weight is read."""


class DenseCheckpointMismatch(UpcycleError):
    """The dense checkpoint does not describe the model the configuration asks for."""
