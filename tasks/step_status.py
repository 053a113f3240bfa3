"""Where a lifecycle step stands: its content key, whether its output is already there, its plan.

Each step answers in one call (a Prefect task), so the lifecycle flow only composes and
reads no manifest or checkpoint itself. Outputs are folders named by the key, so "up to
date" means the keyed folder already holds this step's finished result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel


@dataclass(frozen=True)
class StepStatus:
    key: str  # content hash of the step's inputs and options
    up_to_date: bool
    config: Any  # the step's config, its output in the folder the key names
    plan: Any = None  # what the step planned, where it plans before it runs


def keyed_status(config: BaseModel, output_field: str, prefix: str, identity: Callable[[Any], str],
                 finished: Callable[[Any], bool]) -> StepStatus:
    """Key ``config`` by content, put its output at ``prefix`` + the key's first 12 digits, and
    say whether that output is already finished."""
    key = identity(config)
    config = config.model_copy(update={output_field: f"{prefix}{key[:12]}"})
    return StepStatus(key, finished(config), config)
