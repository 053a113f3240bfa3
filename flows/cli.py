"""``swarm``: the command line, a thin shell over the flows.

Each command's options are generated from its pydantic config (:mod:`flows.options`), so
an option is declared once, as a config field; what a command prints when done is in
:mod:`flows.summaries`. The commands are built when ``swarm`` runs (:func:`build_app`),
after the console settings that must precede Prefect's import.

User mistakes print one line naming the bad value and what is allowed, and exit 2
without a traceback; ``SWARM_DEBUG=1`` shows tracebacks for everything.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from typing import Any, Callable, Iterator, Optional

import click
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from deployments.console import QUIET_ENV, quiet_console
from flows.options import Section, config_command
from storage.errors import SwarmError

err = Console(stderr=True)

def format_validation_error(exc: ValidationError) -> str:
    from flows.validation import describe_validation_error

    return "\n".join(describe_validation_error(exc, option_style=True))


def _quiet_console_env() -> None:
    """Before Prefect is imported: console logs at WARNING here and in local Dask workers,
    and no run failures there (the CLI prints a user's mistake once, plainly).

    The progress bar and the summary are the CLI's output; every log still reaches the
    Prefect API and its UI.
    """
    if not os.environ.get("SWARM_DEBUG"):
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        os.environ.setdefault(QUIET_ENV, "1")


def _quiet_console() -> None:
    if os.environ.get("SWARM_DEBUG"):
        return
    quiet_console()


@contextmanager
def progress_bar() -> Iterator[None]:
    from deployments.progress import listening

    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=False)
    ids: dict[str, int] = {}

    def update(description: str, done: float, total: float) -> None:
        if description not in ids:
            ids[description] = bars.add_task(description, total=total)
        bars.update(ids[description], completed=done, total=total)

    with bars, listening(update):
        yield


def _prepare_runtime() -> None:
    from deployments.runtime import ensure_prefect_api

    ensure_prefect_api()
    _quiet_console()


def run_flow(flow: str, summary: str, *args: Any, bar: bool = True, **kwargs: Any) -> None:
    """Run flow ``module:name`` (with a progress bar) on the Prefect API, then print its summary
    (a printer of :mod:`flows.summaries`). Configs are validated before this is called, so a
    user's mistake starts nothing."""
    from flows import summaries

    _prepare_runtime()
    module, _, name = flow.partition(":")
    with progress_bar() if bar else nullcontext():
        result = getattr(importlib.import_module(module), name)(*args, **kwargs)
    getattr(summaries, summary)(result)


# --------------------------------------------------------------------------- commands


# Each command registers itself on the app; its config is imported only when the command is
# built, so `swarm stage ...` does not import torch for `optimize` (see build_app).
COMMANDS: dict[str, Callable[[typer.Typer], None]] = {}
OLD_NAMES = {"serve": "serve-model", "server": "prefect-server"}  # still work, hidden from the help


def command(name: str) -> Callable:
    def register(add: Callable[[typer.Typer], None]) -> Callable[[typer.Typer], None]:
        COMMANDS[name] = add
        return add

    return register


@command("stage")
def _stage(app: typer.Typer) -> None:
    from tasks.staging import StageConfig

    @config_command(app, "stage", [Section.of("config", StageConfig)], arguments=("source", "dest"))
    def stage(config: dict) -> None:
        """Stage a dataset into compressed shards with a manifest."""
        run_flow("flows.stage:stage_dataset", "print_stage_summary", StageConfig(**config))


@command("tokenizer")
def _tokenizer(app: typer.Typer) -> None:
    from tasks.text.train import TokenizerConfig

    group = typer.Typer(help="Tokenizers for text datasets.", no_args_is_help=True)
    app.add_typer(group, name="tokenizer")

    @config_command(group, "train", [Section.of("config", TokenizerConfig, exclude=("dask_address",))],
                    arguments=("source", "out"))
    def train(config: dict) -> None:
        """Fit a byte-level BPE (with <|endoftext|> and <|pad|>) on a source and write its tokenizer.json."""
        run_flow("flows.tokenizer:train_tokenizer_flow", "print_tokenizer_summary", TokenizerConfig(**config),
                 bar=False)


@command("train")
def _train(app: typer.Typer) -> None:
    from tasks.training import TrainConfig

    @config_command(app, "train", [Section.of("config", TrainConfig)], arguments=("dataset",))
    def train(config: dict) -> None:
        """Train a model with DDP across Dask workers (checkpoints, resume, LoRA)."""
        run_flow("flows.train:train_model", "print_train_summary", TrainConfig(**config))


@command("lifecycle")
def _lifecycle(app: typer.Typer) -> None:
    from flows.lifecycle import DataParams, lifecycle as lifecycle_flow
    from tasks.training import TrainOptions

    @config_command(app, "lifecycle", [
        Section.of("data", DataParams, include=("source",)),
        Section.of("training", TrainOptions, include=("epochs", "model", "world_size")),
        Section.of("run", lifecycle_flow, include=("preset", "output", "storage_options", "dask_address")),
    ])
    def lifecycle(data: dict, training: dict, run: dict) -> None:
        """The whole lifecycle (stage, train, optimize, infer); with no arguments, on the built-in digits;
        --preset text: a GPT on the interpreter's help text."""
        run_flow("flows.lifecycle:lifecycle", "print_lifecycle_summary",
                 data=DataParams(**data), training=TrainOptions(**training), **run)


@command("optimize")
def _optimize(app: typer.Typer) -> None:
    from tasks.optimize.config import OptimizeConfig

    @config_command(app, "optimize", [Section.of("config", OptimizeConfig)], arguments=("checkpoint",),
                    flags={"eval_dataset": "--eval"})
    def optimize(config: dict) -> None:
        """Optimize a trained model (merge LoRA -> prune -> int8 | bf16/fp16), gated on accuracy."""
        run_flow("flows.optimize:optimize_model", "print_optimize_summary", OptimizeConfig(**config), bar=False)


@command("serve-model")
def _serve_model(app: typer.Typer) -> None:
    from tasks.inference.config import ServeConfig

    @config_command(app, "serve-model", [Section.of("config", ServeConfig)], arguments=("model",),
                    aliases=("serve",))
    def serve_model(config: dict) -> None:
        """Serve a model over HTTP until Ctrl-C or SIGTERM (drains first): a classifier's batched requests
        routed to replicas on Dask workers (or threads with --in-process); a language model's generation
        (OpenAI-compatible /v1/completions, streaming) by one continuous-batching engine."""
        from flows.summaries import print_served, print_serving
        from tasks.generation.loading import is_language_model
        from tasks.inference.server import serve as run_server

        from deployments.cluster import with_serving_cluster

        config = ServeConfig(**config)
        if not is_language_model(config.model, config.storage_options):
            config = with_serving_cluster(config)
        served = run_server(config, on_ready=lambda url, description: print_serving(config.model, url, description))
        print_served(served, config.max_batch_size)


@command("infer")
def _infer(app: typer.Typer) -> None:
    from tasks.inference.config import InferConfig

    @config_command(app, "infer", [Section.of("config", InferConfig)], arguments=("model", "dataset", "output"))
    def infer(config: dict) -> None:
        """Batched offline inference over a dataset's shards on Dask workers; resumable."""
        run_flow("flows.infer:batch_inference", "print_infer_summary", InferConfig(**config))


@command("prefect-server")
def _prefect_server(app: typer.Typer) -> None:
    def prefect_server(
        port: Optional[int] = typer.Option(None, "--port", help="Port (default: a free one)"),
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind"),
    ) -> None:
        """Run the managed local Prefect server (UI included) until Ctrl-C; other commands reuse it."""
        from deployments.runtime import serve_forever

        serve_forever(port=port, host=host)

    app.command("prefect-server")(prefect_server)
    app.command("server", hidden=True, help=f"Old name of `swarm prefect-server`. {prefect_server.__doc__}")(prefect_server)


@lru_cache(maxsize=None)
def build_app(only: str | None = None) -> typer.Typer:
    """The ``swarm`` app with every command, or with command ``only`` (or its old name) alone:
    a run builds just the command it runs; ``--help`` and tests build them all."""
    app = typer.Typer(name="swarm", help="Swarm Pipelines: the AI lifecycle on Prefect and Dask.",
                      no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def swarm() -> None:
        """Swarm Pipelines: the AI lifecycle on Prefect and Dask."""

    only = OLD_NAMES.get(only, only)
    for name, add in COMMANDS.items():
        if only in (None, name):
            add(app)
    return app


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    debug = bool(os.environ.get("SWARM_DEBUG"))
    _quiet_console_env()
    try:
        args = sys.argv[1:] if argv is None else argv
        build_app(args[0] if args and args[0] in {*COMMANDS, *OLD_NAMES} else None)(
            args=args, prog_name="swarm", standalone_mode=False)
    except (click.exceptions.Exit, typer.Exit) as exc:
        return exc.exit_code
    except (click.ClickException, typer.TyperException) as exc:  # typer >= 0.20 raises its own vendored click's
        exc.show()
        return exc.exit_code
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        err.print("interrupted")
        return 130
    except SwarmError as exc:
        if debug:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
        return exc.exit_code
    except ValidationError as exc:
        err.print(f"[bold red]error:[/] {format_validation_error(exc)}", highlight=False, soft_wrap=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug: say so plainly
        if debug:
            traceback.print_exc()
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc}\n(run again with SWARM_DEBUG=1 for the traceback)",
                  highlight=False, soft_wrap=True)
        return 1
    return 0


def entrypoint() -> None:
    sys.exit(main())
