"""Ray Serve side of benchmarks/cluster_serve_bench.py: the same checkpoint behind Ray Serve 2.x.

Runs in its own virtual environment (``ray[serve]``, ``torch==2.13.0``, ``safetensors``; see
BENCHMARKS.md), not the project's. The model is rebuilt as the project's MLP
(``tasks/models/mlp.py``: Linear+ReLU layers and a head) from the checkpoint's ``meta.json``
and ``tensors.safetensors``; one row per request, ``@serve.batch`` at the given max batch size
and wait, one torch thread per replica.

    python ray_serve_app.py CHECKPOINT PORT REPLICAS MAX_BATCH MAX_WAIT_MS

Prints ``READY`` once the application answers, then serves until SIGTERM.
"""

import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_model(checkpoint: str):
    import torch
    from safetensors.torch import load_file

    meta = json.loads((Path(checkpoint) / "meta.json").read_text())
    args = meta["model"]["args"]
    assert meta["model"]["name"] == "mlp", meta["model"]
    layers, width = [], args.get("in_features", 64)
    for h in args.get("hidden", [128, 64]):
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    model = torch.nn.Module()
    model.body = torch.nn.Sequential(*layers)
    model.head = torch.nn.Linear(width, args.get("num_classes", 10))
    state = {k[len("model."):]: v for k, v in load_file(str(Path(checkpoint) / "tensors.safetensors")).items()
             if k.startswith("model.")}
    model.load_state_dict(state)
    return model.eval()


def main() -> None:
    checkpoint, port, replicas, max_batch, max_wait_ms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
        int(sys.argv[4]), float(sys.argv[5])
    import ray
    from ray import serve

    ray.init(address="local", include_dashboard=False, num_cpus=max(2, replicas + 1),
             _temp_dir=tempfile.mkdtemp(prefix="ray-bench-"), log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256)
    class Classifier:
        def __init__(self, path: str):
            import torch

            torch.set_num_threads(1)
            self.torch = torch
            self.model = build_model(path)

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait_ms / 1000)
        async def predict(self, rows: list) -> list:
            x = self.torch.from_numpy(np.stack(rows))
            with self.torch.inference_mode():
                return self.model.head(self.model.body(x)).argmax(-1).tolist()

        async def __call__(self, request) -> dict:
            body = await request.json()
            row = np.asarray(body["inputs"][0], dtype=np.float32).reshape(-1)
            return {"predictions": [await self.predict(row)]}

    serve.run(Classifier.bind(checkpoint), route_prefix="/predict", name="bench")
    print("READY", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.2)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
