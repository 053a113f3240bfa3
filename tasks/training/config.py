"""Training parameters: the Prefect UI form of ``train_model`` and ``swarm train``."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.fields import NameList
from tasks.storage_access import StorageAccess

Precision = Literal["fp32", "bf16-mixed", "fp16-mixed"]


class TrainOptions(BaseModel):
    """How to train: model, hyperparameters, precision, parallelism (shared with the lifecycle flow)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    task: Literal["auto", "classification", "regression", "classify", "causal-lm"] = Field(
        "auto", description="classification | regression | causal-lm | auto (causal-lm for text datasets and token "
                            "datasets without labels, regression for a float label, else classification)")
    model: str = Field("auto", description="mlp | cnn | transformer | gpt | hf:FOLDER_URL | MODULE:FACTORY | auto (by dataset kind)")
    model_args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the model factory")
    feature_column: str | None = Field(None, description="One input column as it is, e.g. a fixed-size list (default: "
                                                           "from the dataset's metadata)")
    feature_columns: NameList = Field(
        default_factory=list, description="Table columns assembled into the input: names or globs, comma-separated "
                                          "or repeated (default: every numeric or categorical column but the label)")
    normalize: Literal["standard", "none"] = Field(
        "standard", description="Table features: standardise numeric columns with the train split's mean and std")
    label_column: str | None = Field(None, description="Label column (default: from the metadata, else 'label')")
    epochs: int = Field(15, ge=1, le=100_000, description="Passes over the training split")
    batch_size: int = Field(64, ge=1, le=1_000_000, description="Per-rank batch size")
    lr: float = Field(3e-3, gt=0, le=10, description="Learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    precision: Precision = Field("fp32", description="fp32 | bf16-mixed | fp16-mixed (fp16 needs CUDA)")
    world_size: int = Field(1, ge=1, le=4096, description="Ranks, each on its own Dask worker")
    checkpoint_every: int = Field(0, ge=0, description="Also checkpoint every N steps (0: at epoch ends only)")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept")
    seed: int = Field(0, ge=0, description="Seed of the model's initial weights and the data order")
    seq_len: int | None = Field(None, ge=2, le=1_048_576,
                                description="causal-lm: tokens per training block (default: the dataset's packed length)")
    grad_accum: int = Field(1, ge=1, le=4096, description="Micro-batches accumulated per optimizer step")
    grad_clip: float | None = Field(None, ge=0, description="Max global gradient norm (default: 1.0 for causal-lm, "
                                                             "none for classifiers; 0: off)")
    lr_schedule: Literal["auto", "constant", "cosine"] = Field(
        "auto", description="constant | cosine (to min_lr_ratio x lr) | auto (cosine for causal-lm)")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warmup, in optimizer steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine schedule: the final learning rate / lr")
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward (gpt, hf: models)")
    lora_rank: int | None = Field(None, ge=1, le=1024, description="Train LoRA adapters of this rank")
    lora_targets: str | None = Field(None, description="Regex of module names that get adapters")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / rank)")
    grad_compression: Literal["none", "fp16", "bf16"] = Field("none", description="DDP gradient compression hook")
    bucket_cap_mb: float = Field(25.0, gt=0, description="DDP gradient bucket size")
    threads_per_rank: int = Field(1, ge=1, le=256, description="torch threads per rank")
    max_retries: int = Field(2, ge=0, le=20, description="Whole-group retries after a rank fails")
    timeout_s: float = Field(120.0, gt=0, description="Process-group init and collective timeout")
    compile: bool | None = Field(
        None, description="Capture the training step (CUDA graph / torch.compile); default: on for CUDA, off on "
                          "CPU (measured slower there, see BENCHMARKS.md)")
    step_capture: Literal["graph", "compile"] = Field(
        "graph", description="How a compiled step is captured on CUDA: graph (forward, backward and fused AdamW as one "
                             "CUDA graph; one rank, no fp16 scaler, else compile) | compile (torch.compile "
                             "reduce-overhead)")
    sync_every: int = Field(50, ge=1, le=1_000_000,
                            description="Read the device-side training metrics every N steps (and at epoch end)")
    device_batches: Literal["auto", "host", "device"] = Field(
        "auto", description="Where batches are gathered: device (each shuffle window copied to the GPU once, batches "
                            "gathered there) | host | auto (device on CUDA when two windows fit in device memory)")

    @model_validator(mode="after")
    def _lora_pair(self) -> "TrainOptions":
        if (self.lora_rank is None) != (self.lora_targets is None):
            raise ValueError("LoRA needs both lora_rank and lora_targets (a regex of module names)")
        return self


class TrainTarget(BaseModel):
    dataset: str = Field(description="Staged dataset root (fsspec URL)")


class TrainConfig(StorageAccess, TrainOptions, TrainTarget):
    """What to train, on what, and how: the Prefect UI form of ``train_model`` and ``swarm train``."""

    checkpoint_dir: str | None = Field(None, description="Checkpoint root (default: <dataset>/../checkpoints/<name>)")
    resume: bool = Field(True, description="Resume from the latest checkpoint in checkpoint_dir")
    init_from: str | None = Field(None, description="Start from this checkpoint's weights (e.g. for LoRA)")

    @model_validator(mode="after")
    def _coherent(self) -> "TrainConfig":
        if self.init_from and self.init_from.startswith("hf:"):
            if self.model == "auto":
                self.model = self.init_from
            elif self.model != self.init_from:
                raise ValueError(f"init_from {self.init_from!r} is a model folder: give it as model too, or leave model auto")
        if self.lora_rank is not None and not self.init_from and self.model.startswith("hf:"):
            self.init_from = self.model  # an hf: model starts from its own weights
        if self.lora_rank is not None and not self.init_from:
            raise ValueError("LoRA fine-tuning starts from a trained checkpoint or an hf: folder: give init_from")
        if self.checkpoint_dir is None:
            root = self.dataset.rstrip("/")
            parent, _, name = root.rpartition("/")
            model = "hf-" + self.model.rstrip("/").rsplit("/", 1)[-1] if self.model.startswith("hf:") else self.model
            tag = "lora" if self.lora_rank else model.replace(":", "-").replace(".", "-")
            base = f"{parent}/checkpoints/{name}-{tag}" if parent else f"checkpoints/{name}-{tag}"
            if "://" not in base and not base.startswith("/"):
                base = os.path.abspath(base)
            self.checkpoint_dir = base
        return self
