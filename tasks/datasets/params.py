"""Checks of a built-in dataset's ``name?key=value`` parameters, for the built-ins to share."""

from __future__ import annotations

from storage.errors import ConfigError


def int_param(dataset: str, key: str, value, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{dataset}: {key}={value!r} is not an integer") from None
    if not low <= number <= high:
        raise ConfigError(f"{dataset}: {key}={number} is out of range; allowed: {low}..{high}")
    return number


def check_params(dataset: str, given: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{dataset}: unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(allowed) or 'none'}"
        )
