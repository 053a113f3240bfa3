"""Removing what no manifest names: shards of an earlier layout and temporaries of killed writes."""

from __future__ import annotations

from storage import manifest as manifest_mod
from storage.atomic import TMP_PREFIX
from storage.manifest import Manifest
from storage.shard_writer import PART_PREFIX


def remove_unreferenced(fs, root: str, keep: list[Manifest | None]) -> int:
    """Delete shard files (and stale temporaries) that none of ``keep`` names."""
    names = {s.name for m in keep if m is not None for s in m.shards}
    removed = 0
    try:
        found = fs.find(root)
    except (FileNotFoundError, OSError):
        return 0
    prefix = fs._strip_protocol(root).rstrip("/") + "/"
    for path in found:
        rel = path[len(prefix):] if path.startswith(prefix) else path
        base = rel.rsplit("/", 1)[-1]
        if "/" not in rel:
            # Files at the root (index.json, user files) are never touched, except the
            # temporary of a manifest write that was killed before its rename.
            if base.startswith(TMP_PREFIX) and base.endswith(f"-{manifest_mod.MANIFEST_NAME}"):
                removed += _remove_quietly(fs, path)
            continue
        if (base.startswith(PART_PREFIX) or base.startswith(TMP_PREFIX)) and rel not in names:
            removed += _remove_quietly(fs, path)
    return removed


def _remove_quietly(fs, path: str) -> int:
    try:
        fs.rm_file(path)
        return 1
    except (FileNotFoundError, OSError):
        return 0
