"""Field types the task configs share: a name from a registry, and a byte size.

Each carries what the ``swarm`` command line needs to declare its option (see
:mod:`flows.options`): ``cli_type``, the type the option takes, and for a registry the
allowed names, read from the registry when asked, so that a codec or format registered
later is allowed everywhere at once.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Collection

from pydantic import AfterValidator, BeforeValidator

from storage import codecs, formats, sources
from storage.sizes import parse_bytes


class RegistryChoice:
    """The names of a registry (a dict or a tuple of names) as a field's allowed values."""

    cli_type = str

    def __init__(self, what: str, registry: Collection[str] | Callable[[], Collection[str]]):
        self.what = what
        self.registry = registry

    def choices(self) -> tuple[str, ...]:
        return tuple(self.registry() if callable(self.registry) else self.registry)

    def __get_pydantic_json_schema__(self, core_schema, handler) -> dict:
        return {**handler(core_schema), "enum": list(self.choices())}  # a drop-down in the Prefect UI

    def __call__(self, value: str) -> str:
        if value not in self.choices():
            raise ValueError(f"unknown {self.what} {value!r}; allowed: {', '.join(self.choices())}")
        return value


class ByteText:
    """A byte size given as text (``64MB``, ``1GiB``) or a number; validated to an int."""

    cli_type = str

    def __init__(self, what: str):
        self.what = what

    def __get_pydantic_json_schema__(self, core_schema, handler) -> dict:
        schema = handler(core_schema)
        schema.pop("type", None)
        return {**schema, "anyOf": [{"type": "integer"}, {"type": "string"}]}

    def __call__(self, value: Any) -> int:
        return parse_bytes(value, self.what)


def one_of(what: str, registry: Collection[str] | Callable[[], Collection[str]]) -> Any:
    """A ``str`` field whose allowed values are a registry's names."""
    choice = RegistryChoice(what, registry)
    return Annotated[str, AfterValidator(choice), choice]


def byte_size(what: str) -> Any:
    """An ``int`` field of bytes that also takes ``64MB``, ``512MiB``, ``1e9``."""
    text = ByteText(what)
    return Annotated[int, BeforeValidator(text), text]


Codec = one_of("codec", codecs.CODECS)
ShardFormat = one_of("shard format", formats.FORMATS)
SourceFormat = one_of("source format", sources.SOURCE_FORMATS)


def _split_names(value: Any) -> Any:
    """Names given comma-separated, repeated, or both (``a,b`` ``c``) as one list."""
    items = [value] if isinstance(value, str) else value
    if isinstance(items, (list, tuple)):
        return [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    return value


#: Column names (or globs) from a repeatable option that also takes comma-separated lists.
NameList = Annotated[list[str], BeforeValidator(_split_names)]
