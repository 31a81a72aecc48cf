"""Errors the upcycling raises before any weight is read."""


class UpcycleError(ValueError):
    pass


class DenseCheckpointMismatch(UpcycleError):
    """The dense checkpoint does not describe the model the configuration asks for."""
