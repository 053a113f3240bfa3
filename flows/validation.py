"""Pydantic validation errors as messages for users: each bad field, what is allowed, the value given."""

from __future__ import annotations

from pydantic import ValidationError


def describe_validation_error(exc: ValidationError, prefix: str = "", option_style: bool = False) -> list[str]:
    """One line per problem: where, what is allowed and the value given (never a mapping's
    contents: storage options may hold what a user should not have put there)."""
    lines = []
    for e in exc.errors():
        where = ".".join(str(p) for p in (prefix, *e.get("loc", ())) if p != "") or "value"
        if option_style:
            where = where.replace("_", "-")
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        given = e.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"invalid {where}{shown}: {msg}")
    return lines
