"""User-facing errors.

Every error a user can cause derives from :class:`SwarmError`. Its message names the bad
value and what is allowed; the CLI prints it without a traceback and exits non-zero.
Anything else escaping is a bug.
"""

from __future__ import annotations


class SwarmError(Exception):
    """An error caused by input, configuration or data, with a message meant for users."""

    exit_code = 2


class ConfigError(SwarmError, ValueError):
    """A bad parameter value: names the parameter, the value and what is allowed."""


class SourceError(SwarmError):
    """Input data that cannot be read as asked (missing, empty, wrong format, ragged...)."""


class DestinationError(SwarmError):
    """A destination that cannot be written (an existing file, a missing bucket...)."""


class ManifestError(SwarmError):
    """A dataset manifest that is missing, malformed, of an unknown version or unsafe."""


class IntegrityError(SwarmError):
    """Stored bytes that do not match their recorded content hash."""


class CacheError(SwarmError):
    """The node's shard cache cannot be used as configured (its disk is full, its folder unwritable)."""


class QualityGateError(SwarmError):
    """A result that failed its quality gate (e.g. an optimized model that lost too much accuracy)."""


class StorageUnreachable(SwarmError):
    """Storage that cannot be reached as given: an endpoint that does not answer, a bucket that does not exist."""
