"""Built-in text that ships with Python itself, so it needs no download.

``python-help``    the interpreter's help topics (``pydoc_data.topics``, ~465 KB of English),
                   one document per topic, in topic order
``python-stdlib``  the standard library's ``.py`` sources, one document per file, in path
                   order (``python-stdlib?max_files=N`` takes the first N); ``site-packages``
                   and caches are left out. The few files that are not UTF-8 (test data)
                   are decoded with U+FFFD replacement characters.

Both are column ``text`` (plus ``name``: the topic, or the path inside the library).
"""

from __future__ import annotations

import os
import sysconfig
from functools import lru_cache

import pyarrow as pa

from tasks.datasets.params import check_params, int_param

TEXT_METADATA = {"kind": "text", "text_column": "text"}
SCHEMA = pa.schema([pa.field("name", pa.string()), pa.field("text", pa.string())])
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class PythonHelp:
    """``python-help``: ``pydoc_data.topics``, one document per help topic."""

    name = "python-help"

    def __init__(self, **params):
        check_params(self.name, params, ())
        from pydoc_data.topics import topics

        self._items = sorted(topics.items())
        self.metadata = dict(TEXT_METADATA, description="Python's help topics (pydoc_data.topics)")

    def schema(self) -> pa.Schema:
        return SCHEMA

    def num_rows(self) -> int:
        return len(self._items)

    def read(self, start: int, stop: int) -> pa.Table:
        items = self._items[start:stop]
        return pa.Table.from_arrays([pa.array([k for k, _ in items], pa.string()),
                                     pa.array([v for _, v in items], pa.string())], schema=SCHEMA)


@lru_cache(maxsize=1)
def stdlib_files() -> tuple[str, ...]:
    """The standard library's ``.py`` files, relative to its folder, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        rel = os.path.relpath(folder, root)
        found.extend(os.path.normpath(os.path.join(rel, f)) for f in files if f.endswith(".py"))
    return tuple(sorted(found))


class PythonStdlib:
    """``python-stdlib?max_files=N``: the standard library's ``.py`` sources, one document per file."""

    name = "python-stdlib"
    PARAMS = ("max_files",)

    def __init__(self, **params):
        check_params(self.name, params, self.PARAMS)
        files = stdlib_files()
        limit = int_param(self.name, "max_files", params.get("max_files", len(files)), 1, 10**7)
        self._root = sysconfig.get_paths()["stdlib"]
        self._files = files[:limit]
        self.metadata = dict(TEXT_METADATA, description=f"Python {sysconfig.get_python_version()} standard library")

    def schema(self) -> pa.Schema:
        return SCHEMA

    def num_rows(self) -> int:
        return len(self._files)

    def read(self, start: int, stop: int) -> pa.Table:
        names = list(self._files[start:stop])
        texts = []
        for name in names:
            with open(os.path.join(self._root, name), "rb") as f:
                texts.append(f.read().decode("utf-8", errors="replace"))
        return pa.Table.from_arrays([pa.array(names, pa.string()), pa.array(texts, pa.string())], schema=SCHEMA)
