"""Content hashes for shards and checkpoints (sha256: ~1.7 GB/s here with SHA-NI)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

ALGORITHM = "sha256"
_CHUNK = 8 << 20


def digest_bytes(data: bytes | memoryview) -> str:
    return f"{ALGORITHM}:{hashlib.sha256(data).hexdigest()}"


def digest_file(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return f"{ALGORITHM}:{h.hexdigest()}"


def digest_json(doc: dict[str, Any]) -> str:
    """A digest of a JSON document's content, whatever its layout (keys sorted, no spaces)."""
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return digest_bytes(body.encode())


def short(digest: str, n: int = 16) -> str:
    """The hex part of a digest, truncated: used in content-addressed file names."""
    return digest.split(":", 1)[-1][:n]


#: The key of a JSON document's own digest (manifests, checkpoint metadata).
CHECKSUM_KEY = "checksum"


def sealed_json(doc: dict[str, Any], default=None) -> bytes:
    """``doc`` as indented JSON carrying the digest of its content, so any damage shows."""
    normal = json.loads(json.dumps(doc, default=default))
    normal.pop(CHECKSUM_KEY, None)
    normal[CHECKSUM_KEY] = digest_json(normal)
    return (json.dumps(normal, indent=1, ensure_ascii=False) + "\n").encode()


def check_sealed(doc: dict[str, Any], where: str, required: bool, fix: str) -> None:
    """Remove ``doc``'s checksum and raise :class:`IntegrityError` if it does not match (or is
    missing where ``required``); ``fix`` says what to do about it."""
    from storage.errors import IntegrityError

    recorded = doc.pop(CHECKSUM_KEY, None)
    if recorded is None and not required:
        return
    if recorded is None:
        raise IntegrityError(f"{where} is damaged: its {CHECKSUM_KEY!r} field is missing; {fix}")
    if recorded != digest_json(doc):
        raise IntegrityError(f"{where} is corrupt: its checksum does not match its content; {fix}")
