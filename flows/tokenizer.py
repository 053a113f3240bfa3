"""The tokenizer flow: fit a byte-level BPE on a text source and store its tokenizer.json."""

from __future__ import annotations

from flows.base import swarm_flow
from tasks import artifacts
from tasks.text.train import TokenizerConfig, TokenizerResult, train_tokenizer_task


@swarm_flow(name="train-tokenizer", description="Fit a byte-level BPE tokenizer on a text source.")
def train_tokenizer_flow(config: TokenizerConfig) -> TokenizerResult:
    """Fit a tokenizer on ``config.source`` and write it to ``config.out``."""
    result = train_tokenizer_task(config)
    artifacts.table("train-tokenizer", [result.model_dump()], description=f"Tokenizer of {config.source}")
    return result
