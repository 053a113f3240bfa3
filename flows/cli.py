"""``swarm``: the command line, a thin shell over the flows.

User mistakes print one line naming the bad value and what is allowed, and exit 2
without a traceback; ``SWARM_DEBUG=1`` shows tracebacks for everything.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import click
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from deployments.console import QUIET_ENV, quiet_console
from storage.errors import ConfigError, SwarmError

app = typer.Typer(
    name="swarm",
    help="Swarm Pipelines: the AI lifecycle on Prefect and Dask.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

DaskAddress = typer.Option(None, "--dask-address", help="Address of an existing Dask scheduler (default: a local cluster)")


def parse_storage_options(pairs: list[str] | None, option: str = "--storage-option") -> dict[str, Any]:
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


def print_kv(title: str, rows: list[tuple[str, Any]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    out.print(table)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# --------------------------------------------------------------------------- commands


@app.command()
def stage(
    source: str = typer.Argument(..., help="fsspec URL (file, folder, glob, s3://…) or a built-in: digits, synthetic-image, synthetic-tokens"),
    dest: str = typer.Argument(..., help="Destination dataset root (any fsspec URL)"),
    format: str = typer.Option("auto", "--format", help="auto|parquet|csv|jsonl|npy"),
    codec: str = typer.Option("zstd", "--codec", help="zstd|lz4|none"),
    level: Optional[int] = typer.Option(None, "--level", help="Codec level (zstd 1..22, lz4 1..12)"),
    shard_size: str = typer.Option("64MB", "--shard-size", help="Target decoded bytes per shard (e.g. 64MB, 1GiB)"),
    shard_format: str = typer.Option("arrow", "--shard-format", help="arrow|parquet"),
    val_fraction: float = typer.Option(0.0, "--val-fraction", help="Fraction of rows for the 'val' split, in [0, 1)"),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/val split"),
    storage_option: Optional[list[str]] = typer.Option(None, "--storage-option", help="fsspec option KEY=VALUE (repeatable)"),
    dask_address: Optional[str] = DaskAddress,
) -> None:
    """Stage a dataset into compressed shards with a manifest."""
    from tasks.staging import StageConfig

    config = StageConfig(
        source=source, dest=dest, format=format, codec=codec, level=level, shard_size=shard_size,
        shard_format=shard_format, val_fraction=val_fraction, seed=seed,
        storage_options=parse_storage_options(storage_option), dask_address=dask_address,
    )
    _prepare_runtime()
    from flows.stage import stage_dataset

    with progress_bar():
        result = stage_dataset(config)
    print_stage_summary(result)


def print_stage_summary(result) -> None:
    from deployments.runtime import ui_url

    print_kv(
        "staged" if not result.up_to_date else "already staged (nothing to do)",
        [
            ("dataset", result.dest),
            ("rows", f"{result.rows:,}  ({', '.join(f'{k} {v:,}' for k, v in result.splits.items())})"),
            ("shards", f"{result.shards}  ({result.written_shards} written, {result.skipped_shards} unchanged)"),
            ("bytes in", human_bytes(result.bytes_in)),
            ("bytes out", f"{human_bytes(result.bytes_out)}  (x{result.compression_ratio} smaller than decoded)"),
            ("throughput", f"{result.rows_per_second:,.0f} rows/s in {result.seconds:.1f} s"),
            ("Prefect UI", ui_url() or "-"),
        ],
    )


@app.command()
def train(
    dataset: str = typer.Argument(..., help="Staged dataset root (fsspec URL)"),
    model: str = typer.Option("auto", "--model", help="mlp|cnn|transformer|MODULE:FACTORY (auto: by dataset kind)"),
    model_arg: Optional[list[str]] = typer.Option(None, "--model-arg", help="Model argument KEY=VALUE (repeatable)"),
    epochs: int = typer.Option(15, "--epochs"),
    batch_size: int = typer.Option(64, "--batch-size", help="Per-rank batch size"),
    lr: float = typer.Option(3e-3, "--lr"),
    precision: str = typer.Option("fp32", "--precision", help="fp32|bf16-mixed|fp16-mixed"),
    world_size: int = typer.Option(1, "--world-size", help="DDP ranks, one per Dask worker"),
    checkpoint_dir: Optional[str] = typer.Option(None, "--checkpoint-dir", help="Checkpoint root URL"),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Also checkpoint every N steps"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Resume from the latest checkpoint"),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="Start from this checkpoint's weights"),
    seed: int = typer.Option(0, "--seed"),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="Train LoRA adapters of this rank"),
    lora_targets: Optional[str] = typer.Option(None, "--lora-targets", help="Regex of layer names for adapters"),
    grad_compression: str = typer.Option("none", "--grad-compression", help="none|fp16|bf16 (DDP hook)"),
    bucket_cap_mb: float = typer.Option(25.0, "--bucket-cap-mb", help="DDP bucket size"),
    feature_column: Optional[str] = typer.Option(None, "--feature-column"),
    label_column: Optional[str] = typer.Option(None, "--label-column"),
    storage_option: Optional[list[str]] = typer.Option(None, "--storage-option", help="fsspec option KEY=VALUE"),
    dask_address: Optional[str] = DaskAddress,
) -> None:
    """Train a model with DDP across Dask workers (checkpoints, resume, LoRA)."""
    from tasks.training import TrainConfig

    config = TrainConfig(
        dataset=dataset, model=model, model_args=parse_storage_options(model_arg, "--model-arg"), epochs=epochs,
        batch_size=batch_size, lr=lr, precision=precision, world_size=world_size, checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every, resume=resume, init_from=init_from, seed=seed, lora_rank=lora_rank,
        lora_targets=lora_targets, grad_compression=grad_compression, bucket_cap_mb=bucket_cap_mb,
        feature_column=feature_column, label_column=label_column,
        storage_options=parse_storage_options(storage_option), dask_address=dask_address,
    )
    _prepare_runtime()
    from flows.train import train_model

    with progress_bar():
        result = train_model(config)
    print_train_summary(result)


def print_train_summary(result) -> None:
    from deployments.runtime import ui_url

    acc = "-" if result.val_acc is None else f"{100 * result.val_acc:.2f}%"
    print_kv(
        "trained",
        [
            ("model", f"{result.model} ({result.parameters:,} parameters) {result.model_args}"),
            ("ranks", result.world_size),
            ("epochs / steps", f"{result.epochs} / {result.steps:,}"),
            ("validation accuracy", acc),
            ("train loss", result.train_loss),
            ("throughput", f"{result.samples_per_s:,.0f} samples/s (data stall {100 * result.data_stall_share:.1f}%)"),
            ("resumed from", result.resumed_from or "-"),
            ("checkpoint", result.checkpoint),
            ("time", f"{result.seconds:.1f} s"),
            ("Prefect UI", ui_url() or "-"),
        ],
    )


@app.command()
def lifecycle(
    source: str = typer.Option("digits", "--source", help="Built-in dataset or fsspec URL to stage"),
    output: str = typer.Option("swarm-data", "--output", help="Root folder or URL for every output"),
    epochs: int = typer.Option(15, "--epochs"),
    model: str = typer.Option("auto", "--model", help="mlp|cnn|transformer|MODULE:FACTORY"),
    world_size: int = typer.Option(1, "--world-size", help="DDP ranks"),
    storage_option: Optional[list[str]] = typer.Option(None, "--storage-option", help="fsspec option KEY=VALUE"),
    dask_address: Optional[str] = DaskAddress,
) -> None:
    """The whole lifecycle (stage, train, optimize, infer); with no arguments, on the built-in digits."""
    from flows.lifecycle import DataParams
    from tasks.training import TrainOptions

    data = DataParams(source=source)
    training = TrainOptions(epochs=epochs, model=model, world_size=world_size)
    options = parse_storage_options(storage_option)
    _prepare_runtime()
    from flows.lifecycle import lifecycle as lifecycle_flow

    with progress_bar():
        result = lifecycle_flow(data=data, training=training, output=output, storage_options=options,
                                dask_address=dask_address)
    print_lifecycle_summary(result)


def _size_change(optimized) -> str:
    before, after = optimized.before, optimized.after
    steps = " -> ".join(s["step"] for s in optimized.steps)
    return (f"{steps}: {human_bytes(before['size_bytes'])} -> {human_bytes(after['size_bytes'])}, accuracy "
            f"{100 * before['accuracy']:.2f}% -> {100 * after['accuracy']:.2f}%, batch-64 throughput "
            f"{before['throughput']:,.0f} -> {after['throughput']:,.0f} rows/s")


def print_lifecycle_summary(result) -> None:
    from deployments.runtime import ui_url

    trained = result.trained
    acc = "-" if trained.val_acc is None else f"{100 * trained.val_acc:.2f}%"
    print_kv(
        "lifecycle",
        [
            ("dataset", f"{result.dataset}  ({result.staged.rows:,} rows, {result.staged.shards} shards)"),
            ("model", f"{trained.model} ({trained.parameters:,} parameters), validation accuracy {acc}"),
            ("training", f"{trained.samples_per_s:,.0f} samples/s, {trained.epochs} epochs"),
            ("checkpoint", result.checkpoint),
            ("optimized model", f"{result.model}  ({_size_change(result.optimized)})"),
            ("predictions", f"{result.predictions}  ({result.predicted.rows:,} rows, "
                            f"{result.predicted.rows_per_second:,.0f} rows/s)"),
            ("stages run", ", ".join(result.stages_run) or "none"),
            ("stages cached", ", ".join(result.stages_cached) or "none"),
            ("time", f"{result.seconds:.1f} s"),
            ("Prefect UI", ui_url() or "-"),
        ],
    )


@app.command()
def optimize(
    checkpoint: str = typer.Argument(..., help="Training checkpoint folder, or a checkpoint root (its latest)"),
    eval_dataset: str = typer.Option(..., "--eval", help="Staged dataset with labels: accuracy before and after"),
    output: str = typer.Option(..., "--output", help="Folder URL for the optimized model"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8-dynamic|int8-weight-only (Linear layers)"),
    prune: Optional[float] = typer.Option(None, "--prune", help="Fraction of weights (or units) to remove, in (0, 1)"),
    structured: bool = typer.Option(False, "--structured", help="Prune whole units/channels: smaller and faster"),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="Fold the checkpoint's LoRA adapters in"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16|fp16 weights (instead of --quantize)"),
    max_accuracy_drop: float = typer.Option(1.0, "--max-accuracy-drop", help="Quality gate, in accuracy points"),
    eval_split: Optional[str] = typer.Option(None, "--eval-split", help="Split to score (default: val, else all)"),
    feature_column: Optional[str] = typer.Option(None, "--feature-column"),
    label_column: Optional[str] = typer.Option(None, "--label-column"),
    threads: int = typer.Option(1, "--threads", help="torch threads for the latency/throughput figures"),
    storage_option: Optional[list[str]] = typer.Option(None, "--storage-option", help="fsspec option KEY=VALUE"),
    dask_address: Optional[str] = DaskAddress,
) -> None:
    """Optimize a trained model (merge LoRA -> prune -> int8 | bf16/fp16), gated on accuracy."""
    from tasks.optimize.config import OptimizeConfig

    config = OptimizeConfig(
        checkpoint=checkpoint, eval_dataset=eval_dataset, output=output, quantize=quantize, prune=prune,
        structured=structured, merge_lora=merge_lora, dtype=dtype, max_accuracy_drop=max_accuracy_drop,
        eval_split=eval_split, feature_column=feature_column, label_column=label_column, threads=threads,
        storage_options=parse_storage_options(storage_option), dask_address=dask_address,
    )
    _prepare_runtime()
    from flows.optimize import optimize_model

    print_optimize_summary(optimize_model(config))


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def print_optimize_summary(result) -> None:
    from deployments.runtime import ui_url
    from tasks.optimize.report import comparison_rows

    table = Table(title=f"optimized {result.model}: {' -> '.join(s['step'] for s in result.steps)}",
                  title_justify="left")
    for column in ("metric", "before", "after", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in comparison_rows(result.before, result.after):
        table.add_row(row["metric"], _figure(row["before"]), _figure(row["after"]), row["change"])
    out.print(table)
    print_kv(
        "",
        [
            ("model", f"{result.model} {result.model_args}"),
            ("accuracy gate", f"dropped {result.accuracy_drop:.2f} points, allowed {result.max_accuracy_drop:g}: passed"),
            ("evaluated on", f"{result.eval_rows:,} rows of {result.eval_dataset} ({result.eval_split or 'all splits'}), "
                             f"timings with {result.threads} thread(s)"),
            ("output", result.output),
            ("time", f"{result.seconds:.1f} s"),
            ("Prefect UI", ui_url() or "-"),
        ],
    )


@app.command()
def serve(
    model: str = typer.Argument(..., help="Checkpoint URL: a ckpt-* folder, or a checkpoint root (its latest)"),
    replicas: int = typer.Option(1, "--replicas", help="Model replicas, each on its own thread (or GPU)"),
    max_batch_size: int = typer.Option(32, "--max-batch-size", help="Rows per batch at most"),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="How long a batch waits to fill once it has a row"),
    port: int = typer.Option(8000, "--port", help="Port (0: a free one)"),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind"),
    max_queue_rows: int = typer.Option(1024, "--max-queue-rows", help="Rows waiting at most; more get HTTP 429"),
    max_request_rows: int = typer.Option(256, "--max-request-rows", help="Rows per request at most (HTTP 413)"),
    max_body_bytes: int = typer.Option(4 * 2**20, "--max-body-bytes", help="Request body size at most (HTTP 413)"),
    threads_per_replica: Optional[int] = typer.Option(None, "--threads-per-replica", help="torch threads per replica (default: cores / replicas)"),
    adaptive: bool = typer.Option(True, "--adaptive/--no-adaptive", help="Adapt each replica's batch size up to --max-batch-size"),
    latency_target_ms: Optional[float] = typer.Option(None, "--latency-target-ms", help="Adaptive: keep batch compute under this"),
    memory_cap_mb: Optional[float] = typer.Option(None, "--memory-cap-mb", help="CPU: treat batches over this activation memory as OOM"),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda"),
    kernel: str = typer.Option("auto", "--kernel", help="CPU: auto (the faster of oneDNN and eager, tried at start) | eager"),
    storage_option: Optional[list[str]] = typer.Option(None, "--storage-option", help="fsspec option KEY=VALUE"),
    in_process: bool = typer.Option(False, "--in-process", help="Replicas as threads of this process, not on Dask workers"),
    dask_address: Optional[str] = DaskAddress,
    min_replicas: Optional[int] = typer.Option(None, "--min-replicas", help="Autoscaling: replicas at least"),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas", help="Autoscaling: replicas at most"),
    target_ongoing: float = typer.Option(16.0, "--target-ongoing", help="Autoscaling: outstanding requests per replica to aim for"),
    upscale_delay_s: float = typer.Option(2.0, "--upscale-delay-s", help="Autoscaling: seconds over the target before adding"),
    downscale_delay_s: float = typer.Option(10.0, "--downscale-delay-s", help="Autoscaling: seconds under the target before removing"),
    autoscale_window_s: float = typer.Option(1.0, "--autoscale-window-s", help="Autoscaling: outstanding requests averaged over this"),
    replica_batches: int = typer.Option(2, "--replica-batches", help="Batches sent to one replica at once"),
    probe_timeout_s: float = typer.Option(10.0, "--probe-timeout-s", help="A replica silent this long is replaced"),
    replica_start_timeout_s: float = typer.Option(180.0, "--replica-start-timeout-s", help="How long a replica may take to load"),
) -> None:
    """Serve a model over HTTP: batched requests routed to replicas on Dask workers (or threads with
    --in-process), until Ctrl-C or SIGTERM (drains first)."""
    from tasks.inference.config import ServeConfig

    config = ServeConfig(
        model=model, replicas=replicas, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, port=port, host=host,
        max_queue_rows=max_queue_rows, max_request_rows=max_request_rows, max_body_bytes=max_body_bytes,
        threads_per_replica=threads_per_replica, adaptive=adaptive, latency_target_ms=latency_target_ms,
        memory_cap_mb=memory_cap_mb, device=device, kernel=kernel, storage_options=parse_storage_options(storage_option),
        in_process=in_process, dask_address=dask_address, min_replicas=min_replicas, max_replicas=max_replicas,
        target_ongoing=target_ongoing, upscale_delay_s=upscale_delay_s, downscale_delay_s=downscale_delay_s,
        autoscale_window_s=autoscale_window_s, replica_batches=replica_batches, probe_timeout_s=probe_timeout_s,
        replica_start_timeout_s=replica_start_timeout_s,
    )
    from tasks.inference.server import serve as run_server

    def ready(url: str, description: dict) -> None:
        out.print(f"serving {model} at {url} (POST /predict, GET /health, GET /metrics); Ctrl-C to stop",
                  highlight=False, soft_wrap=True)
        for place in description.get("placement", []):
            out.print(f"  replica {place['replica']} on {place['worker']} (pid {place.get('pid')}, "
                      f"{place.get('device')}, kernel {place.get('kernel')})", highlight=False, soft_wrap=True)
        sys.stdout.flush()

    served = run_server(config, on_ready=ready)
    sizes = ", ".join(str(r["size"]) if r else str(max_batch_size) for r in served.batch_sizes)
    out.print(f"stopped after answering {served.answered:,} requests in {served.seconds:.1f} s "
              f"(batch size per replica at the end: {sizes})", highlight=False, soft_wrap=True)


@app.command()
def infer(
    model: str = typer.Argument(..., help="Optimized model folder, checkpoint folder, or checkpoint root"),
    dataset: str = typer.Argument(..., help="Staged dataset to predict"),
    output: str = typer.Argument(..., help="Folder URL for the prediction dataset (re-runs skip finished shards)"),
    max_batch_size: int = typer.Option(1024, "--max-batch-size", help="Rows per model call at most"),
    latency_target_ms: Optional[float] = typer.Option(None, "--latency-target-ms", help="Stop growing batches past this"),
    adaptive: bool = typer.Option(True, "--adaptive/--no-adaptive", help="Adapt the batch size up to --max-batch-size (else always that size)"),
    split: Optional[str] = typer.Option(None, "--split", help="Split to predict (default: all)"),
    probabilities: bool = typer.Option(False, "--probabilities", help="Also write class probabilities"),
    codec: str = typer.Option("zstd", "--codec", help="zstd|lz4|none (prediction shards)"),
    memory_cap_mb: Optional[float] = typer.Option(None, "--memory-cap-mb", help="CPU: batches over this activation memory count as OOM"),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda (auto: a worker's GPU when it has one)"),
    kernel: str = typer.Option("auto", "--kernel", help="CPU: auto (the faster of oneDNN and eager, tried per task) | eager"),
    storage_option: Optional[list[str]] = typer.Option(None, "--storage-option", help="fsspec option KEY=VALUE"),
    dask_address: Optional[str] = DaskAddress,
) -> None:
    """Batched offline inference over a dataset's shards on Dask workers; resumable."""
    from tasks.inference.offline import InferConfig

    config = InferConfig(
        model=model, dataset=dataset, output=output, max_batch_size=max_batch_size,
        latency_target_ms=latency_target_ms, adaptive=adaptive, split=split, probabilities=probabilities, codec=codec,
        memory_cap_mb=memory_cap_mb, device=device, kernel=kernel, storage_options=parse_storage_options(storage_option),
        dask_address=dask_address,
    )
    _prepare_runtime()
    from flows.infer import batch_inference

    with progress_bar():
        result = batch_inference(config)
    print_infer_summary(result)


def print_infer_summary(result) -> None:
    from deployments.runtime import ui_url

    sizes = ", ".join(f"{b['size']}{'' if b['settled'] else ' (still trying)'}" for b in result.batch_sizes) or "-"
    oom = sorted({s for b in result.batch_sizes for s in b["out_of_memory_at"]})
    print_kv(
        "predicted",
        [
            ("predictions", f"{result.output}  ({result.rows:,} rows, {result.shards} shards)"),
            ("shards", f"{result.predicted_shards} predicted, {result.skipped_shards} already done"),
            ("throughput", f"{result.rows_per_second:,.0f} rows/s on {', '.join(result.devices) or '-'} "
                           f"(data stall {100 * result.data_stall_share:.1f}%)"),
            ("batch sizes chosen", sizes + (f"; out of memory at {', '.join(map(str, oom))} rows" if oom else "")),
            ("kernels", ", ".join(sorted({b["kernel"] for b in result.batch_sizes if b.get("kernel")})) or "-"),
            ("time", f"{result.seconds:.1f} s"),
            ("Prefect UI", ui_url() or "-"),
        ],
    )


@app.command()
def server(
    port: Optional[int] = typer.Option(None, "--port", help="Port (default: a free one)"),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind"),
) -> None:
    """Run the managed local Prefect server (UI included) until Ctrl-C; other commands reuse it."""
    from deployments.runtime import serve_forever

    serve_forever(port=port, host=host)


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    debug = bool(os.environ.get("SWARM_DEBUG"))
    _quiet_console_env()
    try:
        app(args=argv, prog_name="swarm", standalone_mode=False)
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
