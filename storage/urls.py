"""The one way to reach storage: ``fsspec.url_to_fs`` plus path-safety checks."""

from __future__ import annotations

import posixpath
from typing import Any, Callable

import fsspec

from storage.errors import ConfigError, ManifestError


#: A storage option that names stored credentials (e.g. a Prefect block) instead of holding
#: them, so parameters the Prefect UI shows never carry secrets.
CREDENTIALS_OPTION = "credentials_block"
_credential_resolvers: list[Callable[[str], dict[str, Any] | None]] = []


def register_credentials_resolver(resolver: Callable[[str], dict[str, Any] | None]) -> None:
    """Add a function that turns a credentials name into storage options (first answer wins)."""
    if resolver not in _credential_resolvers:
        _credential_resolvers.append(resolver)


def _resolve_credentials(name: str) -> dict[str, Any]:
    for resolver in _credential_resolvers:
        found = resolver(name)
        if found is not None:
            return found
    raise ConfigError(
        f"{CREDENTIALS_OPTION} {name!r} was not found: create a Prefect Secret block of that name holding "
        'JSON like {"key": ..., "secret": ...}, or pass credentials through the environment'
    )


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None):
    """Return ``(filesystem, path)`` for any fsspec URL, with a clear error for bad ones."""
    if not url or not isinstance(url, str):
        raise ConfigError(f"expected a storage URL or path, got {url!r}")
    options = dict(storage_options or {})
    if CREDENTIALS_OPTION in options:
        options.update(_resolve_credentials(options.pop(CREDENTIALS_OPTION)))
    try:
        return fsspec.url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        raise ConfigError(
            f"cannot open {url!r}: {exc}. Known protocols: file, memory, s3 "
            f"(install s3fs), and any other fsspec protocol whose package is installed"
            f" (protocol here: {protocol!r})"
        ) from exc


def join(root: str, *parts: str) -> str:
    """Join path parts with ``/`` (fsspec paths are POSIX-style on every backend)."""
    return posixpath.join(root.rstrip("/"), *parts) if root else posixpath.join(*parts)


def safe_relative(name: str, what: str = "path") -> str:
    """Return ``name`` normalised if it stays inside its root, else raise.

    Refuses absolute paths, drive letters, backslashes, URLs and any ``..`` escape, so a
    manifest entry can never point outside the dataset root.
    """
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{what} {name!r} is not a relative path")
    if "\\" in name or "://" in name or name.startswith("/") or ":" in name.split("/")[0]:
        raise ManifestError(f"{what} {name!r} is not a relative path inside the dataset root")
    norm = posixpath.normpath(name)
    if norm.startswith("..") or norm == "." or "/../" in f"/{norm}/":
        raise ManifestError(f"{what} {name!r} leaves the dataset root")
    return norm


def protocol_of(fs) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def is_local(fs) -> bool:
    return protocol_of(fs) in ("file", "local")
