"""Prefect artifacts from flows: tables, markdown and images, all best effort."""

from __future__ import annotations

import base64
import logging
from typing import Any

log = logging.getLogger(__name__)


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return bool(FlowRunContext.get() or TaskRunContext.get())


def table(key: str, rows: list[dict[str, Any]], description: str = "") -> None:
    if not _in_run():
        return
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(table=rows, key=key, description=description)
    except Exception as exc:  # noqa: BLE001 - a failed artifact never fails the work
        log.warning("could not create table artifact %s: %s", key, exc)


def markdown(key: str, text: str, description: str = "") -> None:
    if not _in_run():
        return
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=text, key=key, description=description)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not create markdown artifact %s: %s", key, exc)


def image(key: str, png: bytes, description: str = "") -> None:
    """A PNG plot shown in the UI: an image artifact embedded as a data URL in markdown."""
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    markdown(key, f"![{description or key}]({data_url})", description)
