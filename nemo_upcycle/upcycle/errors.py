"""Errors the upcycling raises before any weight is read."""
from nemo_upcycle.errors import UserError


class UpcycleError(UserError):
    pass


class DenseCheckpointMismatch(UpcycleError):
    """The dense checkpoint does not describe the model the configuration asks for."""
