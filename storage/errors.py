"""The root of flashinfer's one exception hierarchy, and the storage layer's errors.

The root lives here, in the lowest package, because imports point one way
(flashinfer -> predictors -> storage): `flashinfer.errors` re-exports everything below
and adds the engine's own errors, so `except flashinfer.errors.FlashinferError` catches
every error the product raises on purpose. Each message names the thing at fault and,
where there is one, the fix.
"""

from __future__ import annotations


class FlashinferError(Exception):
    """Base class of every error flashinfer raises on purpose."""


class StorageError(FlashinferError):
    """Something on disk (a checkpoint, a store) or about reading it is wrong."""


class ReadError(StorageError):
    """Reading a store's data failed mid-generation (an I/O error, a short read): the disk or
    the file is failing, not the request."""


class CheckpointError(StorageError):
    """A weight file is damaged, truncated, lies about its sizes, or lacks a tensor."""


class FormatError(StorageError):
    """A store's manifest or data files do not match the format or each other."""


class QuantError(StorageError):
    """A quantization scheme or group size that cannot apply to a tensor."""


class ConfigValueError(StorageError):
    """A user-given value (a size, a bandwidth, a duration) that cannot be parsed."""
