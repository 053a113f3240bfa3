"""A serving endpoint as a long-running Prefect flow: managed from the same place as every other run.

The ``serve-digits`` deployment in prefect.yaml runs :func:`serve_endpoint`: the model is
served over HTTP (replicas on Dask workers behind the router, see
:mod:`tasks.inference.cluster_service`) until the run is cancelled from the UI or the API.
Prefect's worker (or ``flow.serve``'s runner) then sends the run's process SIGTERM; the server
stops accepting connections, answers every accepted request, stops its replicas and the flow
returns what it served. Where it listens and where the replicas run is logged and left as a
``serving-endpoint`` artifact.
"""

from __future__ import annotations

from prefect import get_run_logger
from pydantic import BaseModel

from flows.base import swarm_flow
from tasks import artifacts
from tasks.inference.config import ServeConfig


class ServedEndpoint(BaseModel):
    url: str
    answered: int
    seconds: float


@swarm_flow(name="serve-endpoint", description="Serve a model over HTTP until the run is cancelled.")
def serve_endpoint(config: ServeConfig) -> ServedEndpoint:
    """Serve ``config.model`` at ``config.host:config.port`` until this run is cancelled (SIGTERM drains it)."""
    from tasks.inference.server import serve

    logger = get_run_logger()

    def ready(url: str, description: dict) -> None:
        placement = description.get("placement") or []
        logger.info("serving %s at %s with %s replica(s)", config.model, url, description.get("replicas", 1))
        lines = [f"- replica {p['replica']} on `{p['worker']}` (pid {p.get('pid')}, {p.get('device')})" for p in placement]
        artifacts.markdown("serving-endpoint", "\n".join([f"**{url}** serves `{config.model}`", *lines]),
                           description="Where the endpoint listens and where its replicas run")

    from deployments.cluster import with_serving_cluster
    from tasks.generation.loading import is_language_model

    if not is_language_model(config.model, config.storage_options):   # a language model runs in this process
        config = with_serving_cluster(config)
    served = serve(config, on_ready=ready)
    logger.info("stopped after answering %d requests in %.1f s", served.answered, served.seconds)
    return ServedEndpoint(url=served.url, answered=served.answered, seconds=served.seconds)
