"""Parameters of offline generation (``batch_generate`` and ``swarm generate``).

Sampling fields are checked by :class:`~tasks.generation.params.SamplingParams` itself, so
the command line, the Prefect UI's form and the engine refuse the same values with the
same words."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from storage.errors import ConfigError
from tasks.fields import Codec
from tasks.generation.params import SamplingParams
from tasks.storage_access import StorageAccess

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")


class GenerateTarget(BaseModel):
    model: str = Field(description="Language model: an LM checkpoint or optimized model folder, or hf:FOLDER")
    prompts: str = Field(description=(
        "Prompts: a staged text dataset, or JSON Lines files (a file, folder or glob on any fsspec URL)"))
    output: str = Field(description="Where the generations dataset goes (any fsspec URL)")


class GenerateOptions(BaseModel):
    """What to generate and how the engine runs on each worker."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompt_column: str | None = Field(None, description=(
        "Column holding the prompt text (default: 'prompt', else 'text'; an unpacked text dataset without "
        "text: its token ids)"))
    split: str | None = Field(None, description="Staged dataset: the split to generate for (default: every split)")
    prompt_tokens: int | None = Field(None, ge=1, description=(
        "Prompts of token ids (a text dataset without text): the first N tokens of each row; needed for a packed "
        "text dataset, whose rows are blocks"))
    max_new_tokens: int = Field(64, description="New tokens per prompt at most")
    temperature: float = Field(0.0, description="Sampling temperature (0: greedy)")
    top_p: float = Field(1.0, description="Nucleus sampling: keep the smallest set of tokens over this mass, in (0, 1]")
    top_k: int = Field(0, description="Keep the k most likely tokens (0: off)")
    seed: int | None = Field(None, description=(
        "Sampling seed: each prompt's samples then depend only on it and the prompt's row"))
    stop: list[str] = Field(default_factory=list, description="Stop strings (cut from the completion)")
    prompts_per_shard: int = Field(256, ge=1, le=1_000_000, description="JSON Lines: prompts per output shard")
    max_batch: int = Field(128, ge=1, le=4096, description="Sequences decoding at once on a worker, at most")
    max_tokens_per_step: int = Field(512, ge=1, description=(
        "Tokens one engine step runs at most (decodes plus chunks of prefill); at least max_batch"))
    pool_tokens: int | None = Field(None, ge=1, description=(
        "KV-cache pool size in tokens per worker (default: max_batch x the model's context, at most a quarter "
        "of the worker's available memory, half of its GPU's free memory)"))
    block_size: int = Field(16, ge=1, le=1024, description="KV-cache block size in tokens")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the worker's GPU when it has one")
    codec: Codec = Field("zstd", description="Codec of the output shards")

    @field_validator(*SAMPLING_FIELDS)
    @classmethod
    def _sampling(cls, value, info: ValidationInfo):
        try:
            SamplingParams(**{info.field_name: tuple(value) if info.field_name == "stop" else value})
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    def sampling(self, seed: int | None = None) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=seed, stop=tuple(self.stop))

    def output_options(self) -> dict:
        """What a generation's content depends on (output shard names hash it)."""
        return {"prompt_column": self.prompt_column, "prompt_tokens": self.prompt_tokens, "codec": self.codec,
                **{name: getattr(self, name) for name in SAMPLING_FIELDS}}


class GenerateConfig(StorageAccess, GenerateOptions, GenerateTarget):
    """Parameters of ``batch_generate`` and ``swarm generate``."""
