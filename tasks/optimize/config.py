"""Optimization parameters: the Prefect UI form of ``optimize_model`` and ``swarm optimize``.

Steps always run in this order, whichever are asked for:

    merge-lora -> prune (unstructured or structured) -> quantize (int8) | cast (bf16/fp16)

LoRA adapters are folded in first so every later step sees plain ``Linear`` layers;
pruning runs on full-precision weights (magnitudes are exact there, and zeros stay
exact zeros through int8 rounding); quantizing or casting comes last. ``quantize`` and
``dtype`` are alternatives: the int8 kernels take and return fp32 activations.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.storage_access import StorageAccess

Quantize = Literal["int8-dynamic", "int8-weight-only"]
DType = Literal["bf16", "fp16"]
STEP_ORDER = ("merge-lora", "prune", "quantize", "cast")


class OptimizeOptions(BaseModel):
    """Which optimizations, and the quality gate (shared with the lifecycle flow)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    quantize: Quantize | None = Field(None, description="int8-dynamic | int8-weight-only (Linear layers)")
    prune: float | None = Field(None, gt=0, lt=1, description="Fraction of weights (or units, if structured) to remove")
    structured: bool = Field(False, description="Remove whole hidden units / channels / FFN width instead of weights")
    merge_lora: bool = Field(False, description="Fold the checkpoint's LoRA adapters into its weights")
    dtype: DType | None = Field(None, description="Cast weights to bf16 or fp16 (instead of quantizing)")
    max_accuracy_drop: float = Field(1.0, ge=0, le=100, description="Quality gate, in accuracy points")
    max_perplexity_increase: float = Field(
        0.05, ge=0, description="Quality gate of language models: the relative rise of validation perplexity allowed "
                                "(0.05: 5%)")
    max_rmse_increase: float = Field(
        0.05, ge=0, description="Quality gate of regressions: the relative rise of the eval RMSE allowed (0.05: 5%)")
    eval_split: str | None = Field(None, description="Split to score (default: 'val' if present, else all rows)")
    feature_column: str | None = Field(None, description="Input column of the eval dataset (default: the checkpoint's)")
    label_column: str | None = Field(None, description="Label column of the eval dataset (default: the checkpoint's)")
    threads: int = Field(1, ge=1, le=256, description="torch threads for the latency and throughput figures")

    @model_validator(mode="after")
    def _coherent(self) -> "OptimizeOptions":
        if self.structured and self.prune is None:
            raise ValueError("structured pruning needs an amount: give prune (e.g. 0.5)")
        if self.quantize and self.dtype:
            raise ValueError(
                f"quantize {self.quantize!r} and dtype {self.dtype!r} are alternatives "
                "(the int8 kernels take fp32 activations): give one of them"
            )
        if not self.steps:
            raise ValueError("nothing to do: give at least one of quantize, prune, merge_lora, dtype")
        return self

    @property
    def steps(self) -> list[str]:
        """The steps asked for, in the order they run."""
        asked = {"merge-lora": self.merge_lora, "prune": self.prune is not None,
                 "quantize": self.quantize is not None, "cast": self.dtype is not None}
        return [step for step in STEP_ORDER if asked[step]]


class OptimizeTarget(BaseModel):
    checkpoint: str = Field(description="Training checkpoint folder or checkpoint root (its latest checkpoint)")
    eval_dataset: str = Field(description="Staged dataset with labels to score accuracy before and after")
    output: str = Field(description="Folder URL for the optimized model (safetensors + meta.json)")


class OptimizeConfig(StorageAccess, OptimizeOptions, OptimizeTarget):
    """Which checkpoint to optimize, how, where to write it, and the quality gate."""
