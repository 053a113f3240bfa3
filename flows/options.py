"""``swarm`` command options generated from the pydantic configs: each option is declared once, as a field.

A command names the config models (or flow functions) it takes its values from, its
*sections*; every field of a section becomes the option ``--field-name``, with the
field's default and description, except those the command takes as positional
arguments. So adding an option to a command is adding a field to its config.

How a field's type becomes an option:

* ``str``, ``int``, ``float`` (optional or not): an option of that type;
* a ``Literal`` or a registry choice (:func:`tasks.fields.one_of`): a string option whose
  metavar lists the allowed values; the value goes to pydantic unchanged, whose error names
  the bad value and the allowed ones (one line, exit 2), as for every other field;
* a type carrying ``cli_type`` in its metadata (a byte size: ``64MB``): that type;
* ``bool``: a ``--x/--no-x`` flag;
* ``list[T]``: a repeatable option;
* ``dict``: a repeatable ``KEY=VALUE`` option named in the singular (``model_args`` ->
  ``--model-arg``); values are JSON where they parse (``true``, ``3``, ``{"a": 1}``), else strings.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import typer
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from storage.errors import ConfigError

Kind = Literal["value", "flag", "list", "pairs"]


@dataclass(frozen=True)
class Section:
    """Fields one part of a command's values comes from; the command's body gets them as ``name=dict``."""

    name: str
    fields: dict[str, FieldInfo]

    @classmethod
    def of(cls, name: str, source: type[BaseModel] | Callable, include: tuple[str, ...] | None = None,
           exclude: tuple[str, ...] = ()) -> "Section":
        """The fields of a pydantic model, or the parameters of a (flow) function."""
        if isinstance(source, type) and issubclass(source, BaseModel):
            fields = dict(source.model_fields)
        else:
            fn = getattr(source, "fn", source)  # a Prefect flow wraps its function
            hints = typing.get_type_hints(fn, include_extras=True)
            fields = {p.name: FieldInfo.from_annotated_attribute(
                hints[p.name], PydanticUndefined if p.default is inspect.Parameter.empty else p.default)
                for p in inspect.signature(fn).parameters.values()}
        names = [n for n in (include or fields) if n not in exclude]
        return cls(name, {n: fields[n] for n in names})


@dataclass(frozen=True)
class OptionSpec:
    """One field as a command-line parameter."""

    section: str
    field: str
    flag: str  # '--max-batch-size'; '' for a positional argument
    kind: Kind
    type: Any  # what the option parses its text into
    default: Any
    required: bool
    choices: tuple[str, ...] | None
    help: str
    info: FieldInfo

    @property
    def argument(self) -> bool:
        return not self.flag


def _unwrap_optional(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _choices(info: FieldInfo, annotation: Any) -> tuple[str, ...] | None:
    for meta in info.metadata:
        if callable(getattr(meta, "choices", None)):
            return tuple(meta.choices())
    if typing.get_origin(annotation) is Literal:
        return tuple(str(a) for a in typing.get_args(annotation))
    return None


def option_spec(section: str, name: str, info: FieldInfo, argument: bool = False, flag: str | None = None) -> OptionSpec:
    """How field ``name`` of ``section`` appears on the command line."""
    annotation = _unwrap_optional(info.annotation)
    origin = typing.get_origin(annotation)
    cli_type = next((m.cli_type for m in info.metadata if hasattr(m, "cli_type")), None)
    choices = _choices(info, annotation)
    if annotation is bool:
        kind, option_type = "flag", bool
    elif origin in (dict, typing.Mapping) or annotation is dict:
        kind, option_type = "pairs", list[str]
    elif origin in (list, tuple, set):
        kind, option_type = "list", list[(typing.get_args(annotation) or (str,))[0]]
    else:
        kind = "value"
        literal = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()
        option_type = cli_type or (type(literal[0]) if literal else str if choices else annotation)
    if flag is None:
        stem = name.replace("_", "-")
        flag = f"--{stem[:-1] if kind == 'pairs' and stem.endswith('s') else stem}"
    required = info.is_required()
    default = None if kind in ("pairs", "list") and info.default_factory else info.default
    return OptionSpec(section, name, "" if argument else flag, kind, option_type,
                      ... if required else default, required, choices, info.description or "", info)


def command_options(sections: list[Section], arguments: tuple[str, ...] = (),
                    flags: dict[str, str] | None = None) -> list[OptionSpec]:
    """Every field of every section as a parameter: ``arguments`` (field names) positional, in
    that order, the rest options named after the field unless ``flags`` names them."""
    flags = flags or {}
    specs = [option_spec(s.name, n, s.fields[n], argument=True) for n in arguments for s in sections if n in s.fields]
    specs += [option_spec(s.name, n, i, flag=flags.get(n)) for s in sections for n, i in s.fields.items()
              if n not in arguments]
    seen = [s.field for s in specs]
    doubled = sorted({n for n in seen if seen.count(n) > 1})
    if doubled:
        raise ValueError(f"fields {doubled} appear in more than one section of one command; leave them out of one")
    return specs


def parse_pairs(pairs: list[str] | None, option: str = "--storage-option") -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are JSON where they parse (true, 3, {"a": 1}), else strings."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option} {pair!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def cli_default_matches(spec: OptionSpec) -> bool:
    """Whether the option's default, read as the field reads it, is the field's default."""
    if spec.required:
        return spec.info.is_required()
    field_default = spec.info.get_default(call_default_factory=True)
    given = spec.default
    if spec.kind in ("pairs", "list") and not given:
        given = field_default  # not given: left out, so the field's default applies
    elif spec.kind == "pairs":
        given = parse_pairs(given)
    meta = spec.info.metadata
    adapter = TypeAdapter(typing.Annotated[(spec.info.annotation, *meta)] if meta else spec.info.annotation)
    return adapter.validate_python(given) == adapter.validate_python(field_default)


def _parameter(spec: OptionSpec) -> inspect.Parameter:
    help_text = spec.help
    metavar = f"[{'|'.join(spec.choices)}]" if spec.choices else None
    if spec.argument:
        default = typer.Argument(spec.default, help=help_text, show_default=False)
    elif spec.kind == "flag":
        stem = spec.flag[2:]
        default = typer.Option(spec.default, f"--{stem}/--no-{stem}", help=help_text)
    else:
        suffix = {"value": "", "list": " (repeatable)", "pairs": " (KEY=VALUE, repeatable)"}[spec.kind]
        default = typer.Option(spec.default, spec.flag, help=help_text + suffix, metavar=metavar,
                               show_default=spec.kind == "value")
    annotation = spec.type if spec.required or spec.kind == "flag" else Optional[spec.type]
    return inspect.Parameter(spec.field, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def config_command(app: typer.Typer, name: str, sections: list[Section], arguments: tuple[str, ...] = (),
                   flags: dict[str, str] | None = None, aliases: tuple[str, ...] = (),
                   extra: list[inspect.Parameter] = ()) -> Callable[[Callable], Callable]:
    """Register ``body`` as command ``name`` (and hidden ``aliases``) with options generated from
    ``sections``; it is called with one dict of values per section (a list or ``KEY=VALUE`` option
    not given is left out, so the field's default applies), plus any ``extra`` parameters."""
    specs = command_options(sections, arguments, flags)

    def decorate(body: Callable) -> Callable:
        def command(**given: Any) -> Any:
            values: dict[str, dict[str, Any]] = {s.name: {} for s in sections}
            for spec in specs:
                value = given.pop(spec.field)
                if spec.kind == "pairs":
                    value = parse_pairs(value, spec.flag)
                if spec.kind in ("pairs", "list") and not value:
                    continue
                values[spec.section][spec.field] = value
            return body(**values, **given)

        command.__signature__ = inspect.Signature([*map(_parameter, specs), *extra])
        command.__doc__ = body.__doc__
        command.__name__ = body.__name__
        command.options = specs
        app.command(name)(command)
        for alias in aliases:
            app.command(alias, hidden=True, help=f"Old name of `swarm {name}`. {body.__doc__ or ''}")(command)
        return command

    return decorate
