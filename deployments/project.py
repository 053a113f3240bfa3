"""The deployments declared in ``prefect.yaml``: one source for `prefect deploy` and `serve`."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

PROJECT_DIR = Path(__file__).resolve().parents[1]
PREFECT_YAML = PROJECT_DIR / "prefect.yaml"
WORK_POOL = "swarm-process"


def declared_deployments(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    with open(path) as fh:
        return yaml.safe_load(fh)["deployments"]


def load_flow(entrypoint: str):
    """``flows.train:train_model`` -> the flow object.

    Entrypoints are module paths, not file paths: Prefect would load a file as a
    top-level module named after it (``stage``), which Dask workers cannot import when
    they unpickle the run context.
    """
    module, _, attr = entrypoint.partition(":")
    return getattr(importlib.import_module(module), attr)
