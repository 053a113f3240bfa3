"""What each ``swarm`` command prints when its flow has finished: a table per result."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from storage.sizes import human_bytes

out = Console()


def print_kv(title: str, rows: list[tuple[str, Any]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    out.print(table)


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
            *_text_rows(result.text),
            *_image_rows(getattr(result, "images", None)),
            ("Prefect UI", ui_url() or "-"),
        ],
    )


def _image_rows(images: dict | None) -> list[tuple[str, str]]:
    if not images:
        return []
    classes = images["classes"]
    shown = ", ".join(classes[:8]) + (", …" if len(classes) > 8 else "")
    kept = "decoded at staging" if images["stored"] == "decoded" else "encoded files, decoded by the loader"
    rows = [("images", f"{len(classes)} classes ({shown}); {kept}; {images['size']}x{images['size']} for the model")]
    if images["skipped_bad"]:
        rows.append(("skipped", f"{images['skipped_bad']:,} image(s) that do not decode (--skip-bad; listed in index.json)"))
    return rows


def _text_rows(text: dict | None) -> list[tuple[str, str]]:
    if not text:
        return []
    layout = f"{text['packing']}" + (f", {text['seq_len']} ids a row" if "seq_len" in text else "")
    return [("text", f"{text['documents']:,} documents, {text['tokens']:,} tokens ({layout}, {text['dtype']})"),
            ("tokenizer", f"{text['tokenizer']}  ({text['vocab_size']:,} ids)")]


def print_tokenizer_summary(result) -> None:
    print_kv("tokenizer trained", [("file", result.path), ("vocabulary", f"{result.vocab_size:,}"),
                                   ("end of text / pad ids", f"{result.eot_id} / {result.pad_id}"),
                                   ("sha256", result.sha256), ("time", f"{result.seconds:.1f} s")])


def print_train_summary(result) -> None:
    from deployments.runtime import ui_url

    acc = "-" if result.val_acc is None else f"{100 * result.val_acc:.2f}%"
    if result.task == "causal-lm":
        ppl = "-" if result.val_perplexity is None else f"{result.val_perplexity:,.2f} (loss {result.val_loss})"
        quality = [("validation perplexity", ppl), ("unigram perplexity", _unigram(result)),
                   ("train perplexity", result.train_perplexity)]
        speed = (f"{result.tokens_per_s:,.0f} tokens/s, MFU {100 * (result.mfu or 0):.2f}% "
                 f"(data stall {100 * result.data_stall_share:.1f}%)")
    elif result.task == "regression":
        quality = [("validation RMSE / MAE", f"{result.val_rmse} / {result.val_mae}"), ("validation R²", result.val_r2)]
        speed = f"{result.samples_per_s:,.0f} samples/s (data stall {100 * result.data_stall_share:.1f}%)"
    else:
        quality, speed = [("validation accuracy", acc)], \
            f"{result.samples_per_s:,.0f} samples/s (data stall {100 * result.data_stall_share:.1f}%)"
    print_kv(
        "trained",
        [
            ("model", f"{result.model} ({result.parameters:,} parameters) {result.model_args}"),
            ("ranks", result.world_size),
            ("epochs / steps", f"{result.epochs} / {result.steps:,}"),
            *quality,
            ("train loss", result.train_loss),
            ("throughput", speed),
            ("resumed from", result.resumed_from or "-"),
            ("checkpoint", result.checkpoint),
            ("time", f"{result.seconds:.1f} s"),
            ("Prefect UI", ui_url() or "-"),
        ],
    )
    if result.samples:
        table = Table(title="greedy continuations of validation prompts", title_justify="left")
        table.add_column("prompt")
        table.add_column("continuation")
        for row in result.samples:
            table.add_row(repr(row["prompt"]), repr(row["continuation"]))
        out.print(table)


def _size_change(optimized) -> str:
    before, after = optimized.before, optimized.after
    steps = " -> ".join(s["step"] for s in optimized.steps)
    if before.get("perplexity") is not None:  # a language model
        quality = f"perplexity {before['perplexity']:,.2f} -> {after['perplexity']:,.2f}"
        speed = f"{before['throughput']:,.0f} -> {after['throughput']:,.0f} tokens/s"
    else:
        quality = (f"RMSE {before['rmse']:.4g} -> {after['rmse']:.4g}" if before.get("rmse") is not None else
                   f"accuracy {100 * before['accuracy']:.2f}% -> {100 * after['accuracy']:.2f}%")
        speed = f"batch-64 throughput {before['throughput']:,.0f} -> {after['throughput']:,.0f} rows/s"
    return f"{steps}: {human_bytes(before['size_bytes'])} -> {human_bytes(after['size_bytes'])}, {quality}, {speed}"


def _unigram(result) -> str:
    """A unigram model's validation perplexity on the same tokens, and the LM's share of it."""
    base = result.unigram_val_perplexity
    if base is None:
        return "- (no validation split)"
    share = "" if result.val_perplexity is None else f"; the model's is {result.val_perplexity / base:.2f}x that"
    return f"{base:,.2f} (same validation tokens{share})"


def print_lifecycle_summary(result) -> None:
    from deployments.runtime import ui_url

    trained = result.trained
    if trained.task == "causal-lm":
        after = result.optimized.after.get("perplexity")
        ppl = "-" if trained.val_perplexity is None else f"{trained.val_perplexity:,.2f}"
        quality = [("model", f"{trained.model} ({trained.parameters:,} parameters)"),
                   ("validation perplexity", ppl), ("unigram perplexity", _unigram(trained)),
                   ("training", f"{trained.tokens_per_s or 0:,.0f} tokens/s, {trained.epochs} epochs")]
        last = [("optimized perplexity", "-" if after is None else f"{after:,.2f}")]
        if result.generated is not None:
            gen = result.generated
            sample = gen.samples[0]["completion"][:60] if gen.samples else ""
            last.append(("generations", f"{result.generations}  ({gen.rows:,} prompts, "
                                        f"{gen.tokens_per_second:,.0f} tokens/s) e.g. {sample!r}"))
    else:
        acc = "-" if trained.val_acc is None else f"{100 * trained.val_acc:.2f}%"
        quality = [("model", f"{trained.model} ({trained.parameters:,} parameters), validation accuracy {acc}"),
                   ("training", f"{trained.samples_per_s:,.0f} samples/s, {trained.epochs} epochs")]
        last = [("predictions", f"{result.predictions}  ({result.predicted.rows:,} rows, "
                                f"{result.predicted.rows_per_second:,.0f} rows/s)")]
    print_kv(
        "lifecycle",
        [
            ("dataset", f"{result.dataset}  ({result.staged.rows:,} rows, {result.staged.shards} shards)"),
            *quality,
            ("checkpoint", result.checkpoint),
            ("optimized model", f"{result.model}  ({_size_change(result.optimized)})"),
            *last,
            ("stages run", ", ".join(result.stages_run) or "none"),
            ("stages cached", ", ".join(result.stages_cached) or "none"),
            ("time", f"{result.seconds:.1f} s"),
            ("Prefect UI", ui_url() or "-"),
        ],
    )


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
            ("perplexity gate", f"rose {100 * result.perplexity_increase:.2f}%, allowed "
                                f"{100 * result.max_perplexity_increase:g}%: passed")
            if result.perplexity_increase is not None else
            ("RMSE gate", f"rose {100 * result.rmse_increase:.2f}%, allowed {100 * result.max_rmse_increase:g}%: passed")
            if result.rmse_increase is not None else
            ("accuracy gate", f"dropped {result.accuracy_drop:.2f} points, allowed {result.max_accuracy_drop:g}: passed"),
            ("evaluated on", f"{result.eval_rows:,} rows of {result.eval_dataset} ({result.eval_split or 'all splits'}), "
                             f"timings with {result.threads} thread(s)"),
            ("output", result.output),
            ("time", f"{result.seconds:.1f} s"),
            ("Prefect UI", ui_url() or "-"),
        ],
    )


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


def print_generate_summary(result) -> None:
    from deployments.runtime import ui_url

    sample = result.samples[0] if result.samples else None
    print_kv(
        "generated",
        [
            ("generations", f"{result.output}  ({result.rows:,} prompts, {result.shards} shards)"),
            ("shards", f"{result.generated_shards} generated, {result.skipped_shards} already done"),
            ("tokens", f"{result.generated_tokens:,} generated for {result.prompt_tokens:,} prompt tokens"),
            ("throughput", f"{result.tokens_per_second:,.0f} tokens/s on {', '.join(result.devices) or '-'} "
                           f"(batch occupancy {100 * result.mean_occupancy:.0f}%)"),
            ("sample", f"{sample['prompt'][:60]!r} -> {sample['completion'][:60]!r}" if sample else "-"),
            ("time", f"{result.seconds:.1f} s"),
            ("Prefect UI", ui_url() or "-"),
        ],
    )


def print_serving(model: str, url: str, description: dict | None = None) -> None:
    endpoints = ", ".join((description or {}).get("endpoints") or ["POST /predict", "GET /health", "GET /metrics"])
    out.print(f"serving {model} at {url} ({endpoints}); Ctrl-C to stop", highlight=False, soft_wrap=True)
    if (description or {}).get("kind") == "language-model":
        pool = description["kv_pool"]
        out.print(f"  generation engine on {description['device']}: context {description['context']}, KV pool "
                  f"{pool['tokens_total']:,} tokens in blocks of {pool['block_size']} "
                  f"({pool['bytes_total'] / 2**20:,.1f} MiB)", highlight=False, soft_wrap=True)
    for place in (description or {}).get("placement", []):
        out.print(f"  replica {place['replica']} on {place['worker']} (pid {place.get('pid')}, "
                  f"{place.get('device')}, kernel {place.get('kernel')})", highlight=False, soft_wrap=True)
    sys.stdout.flush()


def print_served(served, max_batch_size: int) -> None:
    if served.generated_tokens is not None:
        out.print(f"stopped after answering {served.answered:,} requests in {served.seconds:.1f} s "
                  f"({served.generated_tokens:,} tokens generated)", highlight=False, soft_wrap=True)
        return
    sizes = ", ".join(str(r["size"]) if r else str(max_batch_size) for r in served.batch_sizes)
    out.print(f"stopped after answering {served.answered:,} requests in {served.seconds:.1f} s "
              f"(batch size per replica at the end: {sizes})", highlight=False, soft_wrap=True)
