"""Exceptions that name what went wrong and where it sits in the model."""

from __future__ import annotations


class RelpropError(Exception):
    """Base class of every error relprop raises on purpose."""


class TraceError(RelpropError):
    """The model could not be turned into a graph (neither torch.fx nor torch.export)."""


class UnsupportedOperationError(RelpropError):
    """An operation in the model has no relevance rule."""


class TargetError(RelpropError, ValueError):
    """The requested target does not exist in the model's output."""


class InputError(RelpropError, ValueError):
    """The input tensor cannot be explained (shape, dtype, NaN/Inf)."""


class CompositeError(RelpropError, ValueError):
    """A composite or rule was given impossible settings."""


class NoLedgerError(RelpropError, AttributeError):
    """The explanation was made without record=True, so it has no ledger.

    An AttributeError, so `hasattr(expl, "ledger")` answers False instead of raising.
    """


class MissingDependencyError(RelpropError, ImportError):
    """An optional package (matplotlib and Pillow: the `relprop[viz]` extra; timm,
    transformers, torchvision for those models) is needed and not installed."""
