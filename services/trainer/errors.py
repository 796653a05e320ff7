"""The trainer's refusal, in a module of its own so data, state and the loop can all raise it
without importing one another."""


class TrainingRefused(ValueError):
    """A configuration, device or saved state this trainer cannot train with: the caller's to
    change, not a fault of the trainer (the worker reports it as such, not as a crash)."""
