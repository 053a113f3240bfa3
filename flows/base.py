"""The flow decorator: a Prefect flow that makes sure there is a real Prefect API first.

Called as plain Python (``stage_dataset(...)``) with no ``PREFECT_API_URL`` set, Prefect
would fall back to a temporary in-process server that Dask worker processes cannot
reach; :class:`SwarmFlow` starts (or reuses) the managed local server before the run.
Its parameters, from a Python call or a deployment run (the UI's form), are refused with
a message that names each bad field and the value given. A call from a script's top level
outside an ``if __name__ == "__main__":`` guard is refused at once
(:mod:`deployments.main_guard`). Direct calls run without
flow-run heartbeats (see :meth:`SwarmFlow.__call__`).
"""

from __future__ import annotations

import typing
from typing import Any, Callable

from prefect import Flow
from prefect.exceptions import ParameterTypeError
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from pydantic import TypeAdapter, ValidationError

from deployments.main_guard import check_main_guard
from deployments.runtime import ensure_prefect_api
from flows.validation import describe_validation_error


class SwarmFlow(Flow):
    def __call__(self, *args: Any, **kwargs: Any):
        check_main_guard(self.name)  # before anything starts: an unguarded script would hang on Dask's workers
        ensure_prefect_api()
        # A direct call (Python, the swarm CLI, a parent flow) blocks its caller, who sees the
        # run end or crash; flow-run heartbeats serve runs that workers start from deployments
        # (zombie detection), and those do not come through here. Prefect's heartbeat thread
        # sleeps in whole seconds and is joined when the run ends, so with it every call
        # lasted up to a second longer than its work (BENCHMARKS.md, staging).
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            return super().__call__(*args, **kwargs)

    def validate_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        hints = typing.get_type_hints(self.fn, include_extras=True)
        problems = []
        for name, value in parameters.items():
            if name in hints:
                try:
                    TypeAdapter(hints[name]).validate_python(value)
                except ValidationError as exc:
                    problems += describe_validation_error(exc, prefix=name)
        if problems:
            raise ParameterTypeError(f"flow {self.name!r} received invalid parameters:\n - " + "\n - ".join(problems))
        return super().validate_parameters(parameters)


def swarm_flow(**options: Any) -> Callable[[Callable], SwarmFlow]:
    def decorate(fn: Callable) -> SwarmFlow:
        return SwarmFlow(fn=fn, **options)

    return decorate
