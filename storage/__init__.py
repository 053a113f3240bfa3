"""Storage layer: shard format, manifest, codecs, sources and readers (no Prefect here)."""
