"""The ``swarm`` options are generated from the config models: every field of every command's
config is an option with the field's default and allowed values, and a new field is a new option."""

from __future__ import annotations

import typing
from typing import Any, Literal

import pytest
import typer
from pydantic import BaseModel, Field
from typer.main import get_command
from typer.testing import CliRunner

from flows.cli import build_app, main
from flows.options import Section, cli_default_matches, config_command
from tasks.fields import byte_size, one_of


def _commands():
    from flows.lifecycle import DataParams, lifecycle
    from tasks.inference.config import InferConfig, ServeConfig
    from tasks.optimize.config import OptimizeConfig
    from tasks.staging import StageConfig
    from tasks.training import TrainConfig, TrainOptions

    everything = lambda model: set(model.model_fields)  # noqa: E731
    return {
        "stage": everything(StageConfig),
        "train": everything(TrainConfig),
        "optimize": everything(OptimizeConfig),
        "infer": everything(InferConfig),
        "serve-model": everything(ServeConfig),
        "serve": everything(ServeConfig),
        "lifecycle": {"source", "epochs", "model", "world_size", "preset", "output", "storage_options", "dask_address"}
        & (everything(DataParams) | everything(TrainOptions) | set(lifecycle.parameters.properties)),
    }


def _allowed(info) -> tuple[str, ...] | None:
    """The field's allowed values, read from the model itself (a Literal or a registry)."""
    for meta in info.metadata:
        if hasattr(meta, "registry"):
            return tuple(meta.registry)
    annotation = info.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is not Literal and len(args) == 1:
        annotation = args[0]
    return tuple(typing.get_args(annotation)) if typing.get_origin(annotation) is Literal else None


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_config_field_is_an_option(name):
    fields = _commands()[name]
    click_command = get_command(build_app()).commands[name]
    specs = {s.field: s for s in click_command.callback.options}
    assert set(specs) == fields, f"swarm {name}: fields without an option: {fields - set(specs)}"
    params = {p.name: p for p in click_command.params}
    for field, spec in specs.items():
        param = params[field]
        if spec.argument:
            assert param.param_type_name == "argument" and param.required
            continue
        stem = field.replace("_", "-")
        assert param.opts[0] in (f"--{stem}", f"--{stem[:-1]}", "--eval"), (name, field, param.opts)
        if spec.required:
            assert param.required, (name, field)
        else:
            assert cli_default_matches(spec), (name, field, param.default, spec.info.default)
            assert param.default == spec.default
        allowed = _allowed(spec.info)
        if allowed:
            assert spec.choices == allowed, (name, field)
            assert param.metavar == f"[{'|'.join(allowed)}]", (name, field, param.metavar)
        if spec.kind == "flag":
            assert param.secondary_opts == [f"--no-{stem}"]


def test_every_generated_command_is_checked():
    generated = {name for name, c in get_command(build_app()).commands.items() if hasattr(c.callback, "options")}
    assert generated == set(_commands()), "add the new command and its config's fields to _commands()"


def test_old_command_names_still_work():
    group = get_command(build_app())
    for old, new in (("serve", "serve-model"), ("server", "prefect-server")):
        assert [p.opts for p in group.commands[old].params] == [p.opts for p in group.commands[new].params]
        assert group.commands[old].callback.__wrapped__ is group.commands[new].callback.__wrapped__
        assert main([old, "--help"]) == 0 and main([new, "--help"]) == 0
    assert group.commands["serve"].hidden and group.commands["server"].hidden


class Toy(BaseModel):
    """Every kind of field a config may add."""

    target: str = Field(description="What to work on")
    sizes: list[int] = Field(default_factory=list, description="Sizes to try")
    model_args: dict[str, Any] = Field(default_factory=dict, description="Model arguments")
    fast: bool = Field(True, description="Go fast")
    mode: Literal["a", "b"] = Field("a", description="The mode")
    codec: one_of("codec", ("zstd", "none")) = Field("zstd", description="The codec")
    budget: byte_size("budget") = Field("1MB", validate_default=True, description="How much")
    limit: float | None = Field(None, gt=0, description="A limit")


def test_a_new_field_is_a_new_option():
    app, seen = typer.Typer(), []

    @config_command(app, "toy", [Section.of("config", Toy)], arguments=("target",), aliases=("old-toy",))
    def toy(config: dict) -> None:
        """Play."""
        seen.append(Toy(**config))

    @app.callback()
    def root() -> None:
        """Two commands, so each is named."""

    runner = CliRunner()
    result = runner.invoke(app, ["toy", "x", "--sizes", "1", "--sizes", "2", "--model-arg", "depth=3",
                                 "--model-arg", "name=deep", "--no-fast", "--mode", "b", "--codec", "none",
                                 "--budget", "2KiB", "--limit", "0.5"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == Toy(target="x", sizes=[1, 2], model_args={"depth": 3, "name": "deep"}, fast=False,
                           mode="b", codec="none", budget=2048, limit=0.5)
    result = runner.invoke(app, ["old-toy", "y"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == Toy(target="y")
    specs = {s.field: s for s in toy.options}
    assert all(cli_default_matches(s) for s in specs.values() if not s.required)
    assert specs["codec"].choices == ("zstd", "none") and specs["mode"].choices == ("a", "b")
    assert specs["model_args"].flag == "--model-arg" and specs["fast"].kind == "flag"
