"""Storage credentials from Prefect blocks, referenced by name in storage options.

``storage_options={"credentials_block": "lake-s3"}`` names a Prefect ``Secret`` block whose
value is JSON such as ``{"key": "...", "secret": "...", "token": "..."}`` (s3fs option
names; ``aws_access_key_id`` / ``aws_secret_access_key`` / ``aws_session_token`` are
accepted too). The secret is read where the storage is opened, inside the task, so it
never appears in flow parameters, logs or artifacts.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from storage.urls import register_credentials_resolver

_ALIASES = {"aws_access_key_id": "key", "aws_secret_access_key": "secret", "aws_session_token": "token"}


@lru_cache(maxsize=32)
def _from_prefect_block(name: str) -> tuple[tuple[str, Any], ...] | None:
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(name).get()
    except (ValueError, ImportError):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    return tuple((_ALIASES.get(k, k), v) for k, v in value.items())


def resolve(name: str) -> dict[str, Any] | None:
    found = _from_prefect_block(name)
    return dict(found) if found is not None else None


register_credentials_resolver(resolve)
