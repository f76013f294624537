"""Errors a user can cause. Each message says what went wrong and what to do instead.

The CLI prints `str(error)` as one line and exits non-zero; nothing here should surface as a
traceback from deep inside torch.
"""


class RapError(Exception):
    """Base class for every error rap raises because of user input."""


class ModelNotFoundError(RapError):
    """MODEL is neither a known short name, a local HF folder, nor a GGUF file."""


class UnsupportedModelError(RapError):
    """The model loads, but its architecture is not one rap can split into blocks."""


class MaskError(RapError):
    """A block mask spec that does not parse or does not fit the model."""


class RequestError(RapError):
    """A request with impossible sizes (non-positive batch, empty prompt, ...)."""


class BudgetError(RapError):
    """Even the smallest runnable configuration does not fit in the memory budget."""
