"""Optimization as plain functions: check everything first, then optimize, measure, gate, save."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel

from storage import checkpoint as ckpt
from storage.dataset import Dataset
from storage.errors import ConfigError
from tasks.models.loading import LoadedModel, load_model
from tasks.models.sizing import DataSize, check_model
from tasks.optimize.artifact import check_output, model_tensors, save_artifact
from tasks.optimize.config import OptimizeConfig
from tasks.optimize.precision import cast_model
from tasks.optimize.prune import check_structured, prune_structured, prune_unstructured
from tasks.optimize.quantize import quantize_model
from tasks.optimize.report import measure
from tasks.training.data import Columns, feature_tensor, load_split, resolve_columns, to_arrays
from tasks.training.lm import LMSpec


@dataclass(frozen=True)
class OptimizePlan:
    checkpoint: str  # the resolved checkpoint folder
    model_name: str
    model_args: dict[str, Any]
    columns: Columns  # of the eval dataset
    eval_split: str | None  # None: all rows
    eval_rows: int
    steps: tuple[str, ...]
    lm: LMSpec | None = None  # a language model: scored by validation perplexity


class OptimizeResult(BaseModel):
    """What an optimization did, measured before and after on the eval set."""

    output: str | None  # None when the quality gate refused the model
    checkpoint: str
    model: str
    model_args: dict[str, Any]
    steps: list[dict[str, Any]]
    before: dict[str, Any]
    after: dict[str, Any]
    accuracy_drop: float  # points (0 for a language model)
    max_accuracy_drop: float
    passed: bool
    perplexity_increase: float | None = None  # language models: relative (0.05 = 5% higher)
    max_perplexity_increase: float | None = None
    rmse_increase: float | None = None  # regressions: relative
    max_rmse_increase: float | None = None
    eval_dataset: str
    eval_split: str | None
    eval_rows: int
    threads: int
    seconds: float

    def gate_message(self) -> str:
        if self.perplexity_increase is not None:
            return (
                f"quality gate: validation perplexity rose {100 * self.perplexity_increase:.2f}% "
                f"({self.before['perplexity']:.4g} -> {self.after['perplexity']:.4g} on {self.eval_rows} blocks of "
                f"{self.eval_dataset}), more than the allowed {100 * self.max_perplexity_increase:g}% "
                "(--max-perplexity-increase); nothing was written"
            )
        if self.rmse_increase is not None:
            return (
                f"quality gate: RMSE rose {100 * self.rmse_increase:.2f}% ({self.before['rmse']:.4g} -> "
                f"{self.after['rmse']:.4g} on {self.eval_rows} rows of {self.eval_dataset}), more than the allowed "
                f"{100 * self.max_rmse_increase:g}% (--max-rmse-increase); nothing was written"
            )
        return (
            f"quality gate: accuracy fell {self.accuracy_drop:.2f} points "
            f"({100 * self.before['accuracy']:.2f}% -> {100 * self.after['accuracy']:.2f}% on {self.eval_rows} rows of "
            f"{self.eval_dataset}), more than the allowed {self.max_accuracy_drop:g} (--max-accuracy-drop); "
            "nothing was written"
        )


def _eval_split(ds: Dataset, asked: str | None) -> str | None:
    splits = list(ds.manifest.splits)
    if asked is not None:
        if asked not in splits:
            raise ConfigError(f"eval split {asked!r} is not in {ds.url!r} (splits: {', '.join(splits)})")
        return asked
    return "val" if "val" in splits else None


def _check_forward(loaded: LoadedModel, ds: Dataset, cols: Columns, split: str | None) -> None:
    """One batch of the eval split through the model (see tasks.models.sizing)."""
    x, y = to_arrays(ds.read_shard(ds.shards(split)[0]).slice(0, 64), cols)
    classes = len(cols.labels.classes) if cols.labels is not None and cols.task == "classify" else None
    size = DataSize(cols.shape, cols.task, classes)
    where = f"feature columns of {ds.url!r}" if cols.table else f"column {cols.feature!r} of {ds.url!r}"
    check_model(loaded.model, loaded.name, size, feature_tensor(x, cols), y, what=where, origin=f" of {loaded.url!r}")


def _eval_columns(cfg: OptimizeConfig, loaded: LoadedModel, ds: Dataset) -> Columns:
    """The eval dataset's columns, encoded as the model was trained (its recorded encodings)."""
    trained = Columns.from_record(loaded.columns, label=cfg.label_column or loaded.columns.get("label"))
    if trained.table is None:
        cols = resolve_columns(ds, cfg.feature_column or loaded.columns.get("feature"), trained.label)
        return replace(cols, labels=trained.labels or cols.labels)
    lacking = [c for c in [*trained.table.names, trained.label] if c not in ds.schema.names]
    if lacking:
        raise ConfigError(f"eval dataset {ds.url!r} lacks column(s) {', '.join(map(repr, lacking))} the model "
                          f"was trained with (columns: {', '.join(ds.schema.names)})")
    return trained


def prepare_optimization(cfg: OptimizeConfig) -> OptimizePlan:
    """Check the checkpoint, the steps, the eval dataset and the output; writes nothing."""
    loaded = load_model(cfg.checkpoint, cfg.storage_options)
    if loaded.meta.get("format") != ckpt.FORMAT_ID:
        raise ConfigError(
            f"{loaded.url!r} is already an optimized model; optimize its training checkpoint "
            f"({(loaded.meta.get('source') or {}).get('checkpoint', '?')}) with all the steps at once"
        )
    lora = loaded.meta.get("lora")
    if lora and not cfg.merge_lora:
        raise ConfigError(f"checkpoint {loaded.url!r} has LoRA adapters on {', '.join(lora['layers'])}: "
                          "add --merge-lora to fold them in first")
    if cfg.merge_lora and not lora:
        raise ConfigError(f"--merge-lora: checkpoint {loaded.url!r} has no LoRA adapters")
    if cfg.structured:
        check_structured(loaded.name)
    ds = Dataset.open(cfg.eval_dataset, cfg.storage_options)
    if loaded.meta.get("task") == "causal-lm":
        from tasks.optimize.lm import prepare_lm

        split = _eval_split(ds, cfg.eval_split)
        spec, rows = prepare_lm(cfg, loaded, ds, split)
        check_output(cfg.output, cfg.storage_options)
        return OptimizePlan(loaded.url, loaded.name, loaded.args, Columns(spec.column, None, None, None), split, rows,
                            tuple(cfg.steps), spec)
    cols = _eval_columns(cfg, loaded, ds)
    split = _eval_split(ds, cfg.eval_split)
    rows = sum(e.rows for e in ds.shards(split))
    if rows == 0:
        raise ConfigError(f"eval dataset {cfg.eval_dataset!r} has no rows in split {split or '(all)'!r}")
    _check_forward(loaded, ds, cols, split)
    check_output(cfg.output, cfg.storage_options)
    return OptimizePlan(loaded.url, loaded.name, loaded.args, cols, split, rows, tuple(cfg.steps))


def apply_steps(cfg: OptimizeConfig, loaded: LoadedModel):
    """Run the asked-for steps in their fixed order; returns (model, its arguments, step records)."""
    model, args, records = loaded.model, dict(loaded.args), []
    if cfg.merge_lora:
        from tasks.training.lora import merge_lora

        records.append({"step": "merge-lora", "layers": merge_lora(model)})
    if cfg.prune is not None and cfg.structured:
        model, args = prune_structured(loaded.name, args, model, cfg.prune)
        records.append({"step": "prune", "structured": True, "amount": cfg.prune, "args_before": loaded.args})
    elif cfg.prune is not None:
        zeroed = prune_unstructured(model, cfg.prune)
        records.append({"step": "prune", "structured": False, "amount": cfg.prune, "zeroed": zeroed})
    if cfg.quantize:
        records.append({"step": "quantize", "mode": cfg.quantize, "layers": quantize_model(model, cfg.quantize)})
    if cfg.dtype:
        model = cast_model(model, cfg.dtype)
        records.append({"step": "cast", "dtype": cfg.dtype})
    return model.eval(), args, records


def optimize(cfg: OptimizeConfig, plan: OptimizePlan) -> OptimizeResult:
    """Optimize, measure before and after, and write the artifact only if the gate passes."""
    import torch

    started = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    loaded = load_model(plan.checkpoint, cfg.storage_options)
    if plan.lm is not None:
        from tasks.optimize.lm import eval_blocks

        x, y = eval_blocks(cfg, plan), None
    else:
        x, y = load_split(cfg.eval_dataset, plan.eval_split, plan.columns, cfg.storage_options)
    original = copy.deepcopy(loaded.model)  # the steps change the model in place
    model, args, records = apply_steps(cfg, loaded)
    tensors = model_tensors(model)
    before, after = measure([(original, model_tensors(original)), (model, tensors)], x, y, plan.columns, lm=plan.lm)
    increase = rmse_increase = None
    if plan.lm is not None:
        drop, increase = 0.0, round(after.perplexity / before.perplexity - 1, 6)
        passed = increase <= cfg.max_perplexity_increase
    elif plan.columns.task == "regression":
        drop, rmse_increase = 0.0, round(after.rmse / before.rmse - 1, 6) if before.rmse else 0.0
        passed = rmse_increase <= cfg.max_rmse_increase
    else:
        drop = round(100 * (before.accuracy - after.accuracy), 4)
        passed = drop <= cfg.max_accuracy_drop
    result = OptimizeResult(
        output=cfg.output if passed else None, checkpoint=plan.checkpoint, model=plan.model_name, model_args=args,
        steps=records, before=before.as_dict(), after=after.as_dict(), accuracy_drop=drop,
        max_accuracy_drop=cfg.max_accuracy_drop, passed=passed, eval_dataset=cfg.eval_dataset,
        eval_split=plan.eval_split, eval_rows=len(x), threads=cfg.threads, seconds=0.0,
        perplexity_increase=increase, max_perplexity_increase=cfg.max_perplexity_increase if plan.lm else None,
        rmse_increase=rmse_increase,
        max_rmse_increase=cfg.max_rmse_increase if rmse_increase is not None else None,
    )
    if passed:
        meta = {
            "model": {"name": plan.model_name, "args": args},
            "columns": loaded.columns,
            "optimizations": records,
            "source": {"checkpoint": plan.checkpoint, "step": loaded.meta.get("step"), "model_args": plan.model_args},
            "eval": {"dataset": cfg.eval_dataset, "split": plan.eval_split, "rows": len(x), "threads": cfg.threads},
            "report": {"before": result.before, "after": result.after, "accuracy_drop": drop,
                       "max_accuracy_drop": cfg.max_accuracy_drop, "perplexity_increase": increase,
                       "rmse_increase": rmse_increase},
        }
        files = None
        if plan.lm is not None:
            from tasks.optimize.lm import lm_record

            extra, files = lm_record(cfg, loaded, model)
            meta.update(extra)
        save_artifact(cfg.output, tensors, meta, cfg.storage_options, files)
    result.seconds = round(time.perf_counter() - started, 3)
    return result
