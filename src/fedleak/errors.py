"""The errors fedleak raises for bad input.

Every error that comes from what a user passed in (a model, an update, a data file, solver options)
derives from :class:`FedleakError`, itself a :class:`ValueError`, so callers can catch one type.
"""

from __future__ import annotations


class FedleakError(ValueError):
    """Base class of every error fedleak raises for bad input."""


class ModelError(FedleakError):
    """The model has a layer or structure an attack or analysis does not support."""


class UpdateError(FedleakError):
    """A client update does not match the model, or holds non-finite values."""


class DataError(FedleakError):
    """A data set is missing, corrupt, or has the wrong shape."""


class SolverError(FedleakError):
    """A linear program or optimiser was given options it cannot run with."""


class OptionError(FedleakError):
    """An option (of an attack, a defense or a run) has the wrong type or lies outside its range."""


class OutputError(FedleakError):
    """An output file or folder cannot be written (a folder in the way, a missing or read-only parent)."""
