"""Every error a user can fix, under one base class.

``lst`` turns any :class:`LstError` into one line on stderr and exit status 2, with no traceback;
anything else is a bug and keeps its traceback. Each layer raises its own subclass so callers of
the library can still tell a bad dataset from a stale cache, and the standard base classes
(``ValueError``, ``RuntimeError``, ``IOError``) are kept for code that catches those.
"""

from __future__ import annotations


class LstError(Exception):
    """Bad input or a state the user can fix; the message says what is wrong and what to do."""


class UserError(LstError):
    """Bad command-line input (conflicting or missing flags)."""


class BackboneError(LstError, ValueError):
    """A backbone that cannot be found, loaded or matched to a cache."""


class DatasetError(LstError, ValueError):
    """A dataset that cannot be read or turned into labelled examples."""


class CacheError(LstError, RuntimeError):
    """A store that cannot be used as asked (stale, incomplete, missing, corrupt)."""


class ChecksumError(CacheError, IOError):
    """A shard's index or an inner chunk does not match its crc32c."""


class ExtractError(LstError, RuntimeError):
    """Stage one cannot run as configured (device, lock, layers, disk)."""


class FisherError(LstError, RuntimeError):
    """Fisher importance cannot be computed for this cache."""


class TrainError(LstError, RuntimeError):
    """A run that cannot start or resume as asked."""


class ParamsError(LstError, ValueError):
    """A parameter-count request that names an unknown backbone or impossible layers."""
