"""Errors of stage two that the CLI prints as one clear line."""


class TrainError(RuntimeError):
    """A run that cannot start or resume as asked; the message says why and what to do."""
