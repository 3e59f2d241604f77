"""Exceptions that carry a message naming the bad value and the fix."""


class SepenError(ValueError):
    """Base class for user-facing errors (bad config, bad input, missing model)."""


class ConceptNotFoundError(SepenError):
    """A concept is absent from its prompt, or cut off by the tokenizer."""


class ResolutionError(SepenError):
    """A captured resolution has no cross-attention layer."""


class ModelNotAvailableError(SepenError):
    """A model cannot be loaded (offline, wrong path or revision)."""


class DeltaError(SepenError):
    """A SepEn delta file is corrupt or belongs to another base model."""


class ConfigError(SepenError):
    """A config key has a wrong name, type or value."""
