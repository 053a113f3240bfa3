"""Storage layer: shard formats, codecs, manifest, sources, the shard cache and the loader."""

import fsspec as _fsspec

# Deferred import: ``shardcache::`` URLs work once any storage module is imported.
_fsspec.register_implementation("shardcache", "storage.cache.ShardCacheFileSystem", clobber=False)
