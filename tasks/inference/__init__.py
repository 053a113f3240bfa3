"""Inference: batching, model replicas and the adaptive batch size, and the online server.

- :mod:`~tasks.inference.adaptive`: the adaptive batch size (pure; online and offline).
- :mod:`~tasks.inference.batcher`: an asyncio micro-batcher (size and wait limits, bounded queue).
- :mod:`~tasks.inference.replicas`: model replicas on threads, least-loaded routing.
- :mod:`~tasks.inference.predict`, :mod:`~tasks.inference.inputs`, :mod:`~tasks.inference.memory`:
  a model as ``rows -> outputs``, request rows, memory caps.
- :mod:`~tasks.inference.service`, :mod:`~tasks.inference.server`: ``swarm serve``; with
  :mod:`~tasks.inference.model_replica`, one replica's model as the in-process and the
  cluster replicas build it.
- On Dask workers: :mod:`~tasks.inference.cluster_service` (the front),
  :mod:`~tasks.inference.router` (power of two choices, retries),
  :mod:`~tasks.inference.cluster_replicas` (placement, failover, autoscaling),
  :mod:`~tasks.inference.replica_host` (the actor and its server on a worker) and
  :mod:`~tasks.inference.wire` (their frames).
- :mod:`~tasks.inference.offline` (with :mod:`~tasks.inference.offline_checks` and
  :mod:`~tasks.inference.prediction_shards`): offline batch inference, ``swarm infer``.
"""
