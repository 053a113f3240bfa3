"""Byte sizes: ``10GB``, ``512MiB``, ``1e9`` or an integer, as bytes; and back, for people.

The one parser of sizes a user types (shard sizes, cache budgets)."""

from __future__ import annotations

import re

from storage.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)b?\s*$", re.IGNORECASE)


def parse_bytes(value: int | str, what: str = "size") -> int:
    """``10GB``, ``512MiB``, ``1e9`` or an integer, as bytes (more than 0)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a number of bytes like 10GB or 512MiB, got {value!r}")
    if isinstance(value, (int, float)):
        number = int(value)
    elif str(value).strip().startswith("-"):
        number = -1
    else:
        match = _SIZE.match(str(value))
        if not match:
            try:
                number = int(float(str(value)))
            except ValueError:
                raise ConfigError(f"{what} must be a number of bytes like 10GB or 512MiB, got {value!r} "
                                  "(could not parse a number and unit)") from None
        else:
            digits, unit, binary = match.groups()
            power = "kmgtp".find(unit.lower()) + 1 if unit else 0
            number = int(float(digits) * (1024 if binary else 1000) ** power)
    if number <= 0:
        raise ConfigError(f"{what} must be greater than 0 bytes, like 64MB or 1GiB (got {value!r})")
    return number


def human_bytes(n: float) -> str:
    """``1234567`` as ``1.2 MB`` (decimal units)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
