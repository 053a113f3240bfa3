"""Shard compression codecs: names, level ranges and their pyarrow codec objects.

zstd is the default for the remote tier (best ratio at high decode speed); lz4 decodes
about 3x faster for a larger file; ``none`` is for data that does not compress (float
noise, already-compressed images) and for the decoded local cache tier.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from storage.errors import ConfigError


@dataclass(frozen=True)
class CodecSpec:
    name: str
    arrow_name: str | None
    min_level: int | None
    max_level: int | None
    default_level: int | None


CODECS: dict[str, CodecSpec] = {
    "zstd": CodecSpec("zstd", "zstd", 1, 22, 3),
    "lz4": CodecSpec("lz4", "lz4", 1, 12, 1),
    "none": CodecSpec("none", None, None, None, None),
}


def register(spec: CodecSpec, clobber: bool = False) -> None:
    if spec.name in CODECS and not clobber:
        raise ValueError(f"codec {spec.name!r} is already registered")
    CODECS[spec.name] = spec


def resolve(name: str, level: int | None = None) -> tuple[str, int | None]:
    """Validate a codec name and level; return ``(name, level)`` with the default level."""
    spec = CODECS.get(name)
    if spec is None:
        raise ConfigError(f"unknown codec {name!r}; allowed: {', '.join(CODECS)}")
    if level is None:
        return name, spec.default_level
    if spec.min_level is None:
        raise ConfigError(f"codec {name!r} takes no level (got {level!r})")
    if isinstance(level, bool) or not isinstance(level, int) or not spec.min_level <= level <= spec.max_level:
        raise ConfigError(
            f"level {level!r} is out of range for codec {name!r}; allowed: "
            f"{spec.min_level}..{spec.max_level}"
        )
    return name, level


def arrow_codec(name: str, level: int | None) -> pa.Codec | None:
    spec = CODECS[name]
    if spec.arrow_name is None:
        return None
    return pa.Codec(spec.arrow_name, compression_level=level)
