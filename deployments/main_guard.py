"""Refuse a flow called from a script's top level without an ``if __name__ == "__main__":`` guard.

Dask's local worker processes are started with multiprocessing's *spawn* method, which
runs the parent's main script again in every child (as module ``__mp_main__``) before
the child can work. A script that calls a flow at its top level, unguarded, would start
the flow again in each child, whose attempt to start processes of its own fails inside
the nanny: the parent waits for workers that never come (seen: a hang of minutes). So
the flow refuses such a call at once, in the parent, before anything starts — and in a
child that is re-running the script, should the parent's check have been bypassed.

Python has no public way to ask "is this call guarded": the parent reads where the main
script's top-level code is executing (its frame's line) and whether that line lies inside
an ``if __name__ == "__main__":`` block of the script's syntax tree (the standard
library's :mod:`ast`); a child knows it is re-running the script from multiprocessing's
own bootstrapping flag (the one its ``_check_not_importing_main`` reads).
"""

from __future__ import annotations

import ast
import multiprocessing
import sys
from functools import lru_cache
from pathlib import Path
from types import FrameType

from storage.errors import ConfigError


def unguarded_call_site() -> tuple[str, int] | None:
    """``(script, line)`` when this call comes from the main script's top level outside a
    ``__main__`` guard, or from a child process re-running the main script; else None."""
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        frame = _top_level_frame(script) if script else None
        return (script or "the main script", frame.f_lineno if frame else 0)
    if not script or not _rerun_by_spawn(main):
        return None  # python -c, a REPL, a notebook, a package's __main__: not re-run by a spawned child
    frame = _top_level_frame(script)
    if frame is None or _guarded(str(Path(script).resolve()), frame.f_lineno):
        return None
    return script, frame.f_lineno


def check_main_guard(flow_name: str) -> None:
    """Raise a :class:`ConfigError` saying how to fix an unguarded top-level flow call."""
    site = unguarded_call_site()
    if site is None:
        return
    script, line = site
    where = f"{script}, line {line}" if line else script
    raise ConfigError(
        f"flow {flow_name!r} was called at the top level of {where}, outside an "
        "`if __name__ == \"__main__\":` block; Dask starts its worker processes by re-running the main script, "
        "so each would call the flow again (and the run would hang). Put the call under "
        "`if __name__ == \"__main__\":`"
    )


def _rerun_by_spawn(main) -> bool:
    """Whether a spawned child re-runs the main module (as :mod:`multiprocessing.spawn` decides)."""
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        return not (name == "__main__" or name.endswith(".__main__"))
    return Path(main.__file__).stem != "ipython"


def _top_level_frame(script: str) -> FrameType | None:
    """The frame running the main script's module-level code, if it is on this call stack."""
    target = Path(script).resolve()
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "<module>" and not code.co_filename.startswith("<"):
            try:
                if Path(code.co_filename).resolve() == target:
                    return frame
            except OSError:
                pass
        frame = frame.f_back
    return None


@lru_cache(maxsize=8)
def _guarded_ranges(script: str) -> tuple[tuple[int, int], ...]:
    """Line ranges of ``script`` that run only when it is ``__main__``."""
    try:
        tree = ast.parse(Path(script).read_text(encoding="utf-8", errors="replace"))
    except (OSError, SyntaxError, ValueError):
        return ((1, sys.maxsize),)  # cannot tell: never refuse a call we cannot judge
    ranges = []
    for node in tree.body:
        if isinstance(node, ast.If):
            block = _main_block(node)
            if block:
                ranges.append((block[0].lineno, max(n.end_lineno or n.lineno for n in block)))
    return tuple(ranges)


def _main_block(node: ast.If) -> list[ast.stmt]:
    """The statements of ``if __name__ == "__main__":`` (or the else of ``!=``) that run as main."""
    test = node.test
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and len(test.comparators) == 1):
        return []
    sides = {_name_or_str(test.left), _name_or_str(test.comparators[0])}
    if sides != {"name:__name__", "str:__main__"}:
        return []
    if isinstance(test.ops[0], ast.Eq):
        return node.body
    if isinstance(test.ops[0], ast.NotEq):
        return node.orelse
    return []


def _name_or_str(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return f"name:{node.id}"
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return f"str:{node.value}"
    return None


def _guarded(script: str, line: int) -> bool:
    return any(start <= line <= end for start, end in _guarded_ranges(script))
