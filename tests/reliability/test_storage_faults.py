"""2. Storage faults: transient errors between our code and the S3 server (5xx, SlowDown
throttling, timeouts, dropped connections) at about 10 % of requests, injected by a
reverse proxy (``tests/faults.py``): every flow completes with byte-identical outputs. And
a full disk in the cache folder gives a clear error and leaves the cache consistent.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from storage import checkpoint as ckpt
from storage.cache_index import CacheDir
from storage.dataset import Dataset
from storage.errors import CacheError
from tests.conftest import ROOT, stage_plain
from tests.faults import FaultProxy
from tests.reliability.conftest import SEED
from tests.reliability.helpers import assert_user_error, cache_is_consistent, row_diff
from tests.reliability.results import scenario

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1200)]
SECTION = "2. Storage faults"
RATE = 0.1


def _objects(s3, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` (read straight from the S3 server, not through the proxy)."""
    fs = s3.s3fs()
    return {p[len(prefix):]: fs.cat_file(p) for p in fs.find(prefix)}


def _clear_cache() -> None:
    CacheDir(os.environ["SWARM_CACHE_DIR"], 1 << 40).clear()


def _all_flows(bucket: str, prefix: str, options: dict) -> dict:
    """Stage, train, optimize and infer on S3 with ``options``; the outputs' URLs."""
    from flows.infer import batch_inference
    from flows.optimize import optimize_model
    from flows.stage import stage_dataset
    from flows.train import train_model
    from tasks.inference.offline import InferConfig
    from tasks.optimize import OptimizeConfig
    from tasks.staging import StageConfig
    from tasks.training import TrainConfig

    root = f"s3://{bucket}/{prefix}"
    _clear_cache()  # every read goes to S3 (through the faults), none is served by an earlier run
    staged = stage_dataset(StageConfig(source="digits", dest=f"{root}/digits", shard_size="16KB",
                                       val_fraction=0.2, storage_options=options))
    trained = train_model(TrainConfig(dataset=staged.dest, checkpoint_dir=f"{root}/ck", epochs=2, batch_size=32,
                                      world_size=2, checkpoint_every=20, storage_options=options))
    optimized = optimize_model(OptimizeConfig(checkpoint=trained.checkpoint, eval_dataset=staged.dest,
                                              output=f"{root}/model", quantize="int8-dynamic", storage_options=options))
    predicted = batch_inference(InferConfig(model=optimized.output, dataset=staged.dest, output=f"{root}/pred",
                                            storage_options=options))
    return {"staging": staged.dest, "training": trained.checkpoint, "optimization": optimized.output,
            "inference": predicted.output}


def _compare(s3, clean: str, faulty: str, what: str) -> tuple[int, int, int]:
    """Byte-compare two outputs; ``(rows checked, lost, duplicated)`` for datasets."""
    strip = lambda url: url.removeprefix("s3://")  # noqa: E731
    want, got = _objects(s3, strip(clean)), _objects(s3, strip(faulty))
    if what in ("training", "optimization"):
        # meta.json records timings (throughput, latency); the tensors are the output.
        assert got[f"/{ckpt.TENSORS}"] == want[f"/{ckpt.TENSORS}"], f"{what}: tensors differ"
        return 0, 0, 0
    data = {k: v for k, v in want.items() if not k.endswith("index.json")}
    assert {k: v for k, v in got.items() if not k.endswith("index.json")} == data, f"{what}: shard bytes differ"
    clean_ds = Dataset.open(clean, s3.storage_options)
    faulty_ds = Dataset.open(faulty, s3.storage_options)
    assert faulty_ds.manifest.content_hash() == clean_ds.manifest.content_hash()
    expected = clean_ds.read_table()
    lost, dup = row_diff(expected, faulty_ds.read_table())
    return expected.num_rows, lost, dup


def test_every_flow_completes_byte_identical_under_transient_s3_faults(dask_cluster, s3, bucket):
    sc = scenario(SECTION, f"Transient S3 faults at {RATE:.0%} of requests: every flow completes, byte-identical")
    clean = _all_flows(bucket, "clean", s3.storage_options)
    injected = requests = 0
    totals: dict = {}
    for seed in (SEED, SEED + 1):
        proxy = FaultProxy(s3.endpoint, rate=RATE, seed=seed, timeout_s=2.5)
        try:
            faulty = None
            with sc.trial(f"flows through the faults, seed {seed}"):
                faulty = _all_flows(bucket, f"faulty-{seed}", proxy.storage_options)
            proxy.enabled = False
            for what in clean:
                with sc.trial(f"{what} output, seed {seed}"):
                    assert faulty is not None, "the flows did not complete"
                    checked, lost, dup = _compare(s3, clean[what], faulty[what], what)
                    if checked:
                        sc.rows(checked, lost, dup)
                    assert (lost, dup) == (0, 0)
        finally:
            proxy.stop()
        requests += proxy.forwarded + sum(proxy.injected.values())
        injected += sum(proxy.injected.values())
        for kind, n in proxy.injected.items():
            totals[kind] = totals.get(kind, 0) + n
    sc.note(f"stage (digits to S3, ~30 shards), DDP training (2 ranks, reading through the shard cache, "
            f"checkpoints on S3), int8 optimization and offline inference, all on S3 through a proxy answering "
            f"{injected} of {requests} requests with a fault ({', '.join(f'{n} {k}' for k, n in sorted(totals.items()))}), "
            "twice (two seeds), with the client options of tests/faults.py (botocore standard retries, 10 "
            "attempts, 1.5 s read timeout); each flow's output compared byte for byte with a run without faults (datasets: "
            "every shard; checkpoints and models: the tensors, as meta.json records timings)")
    sc.check()


# --------------------------------------------------------------------------- a full disk


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    root = tmp_path_factory.mktemp("full-disk") / "digits"
    stage_plain(source="digits", dest=str(root), val_fraction=0.2, shard_size="16KB")
    return root


_LIMITED_READ = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from storage.dataset import Dataset
from storage.errors import SwarmError
try:
    Dataset.open("shardcache::{root}", {{"cache_dir": "{cache}"}}).read_table()
except SwarmError as exc:
    print(exc, file=sys.stderr)
    sys.exit(2)
"""


def _limit_file_size(limit: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_cache_disk_gives_a_clear_error_and_a_consistent_cache(staged, dask_cluster, s3, bucket,
                                                                     digits_checkpoint, tmp_path, rng, monkeypatch):
    import storage.cache_index as cache_index

    sc = scenario(SECTION, "Full disk in the cache folder: a clear error, the cache left consistent")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    with sc.trial("file size limit (RLIMIT_FSIZE) on a reading process"):
        cache = tmp_path / "limited"
        proc = subprocess.run([sys.executable, "-c", _LIMITED_READ.format(limit=2048, root=staged, cache=cache)],
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        assert_user_error(proc, f"the shard cache folder '{cache}' has no room for", "File too large")
        assert cache_is_consistent(str(cache)) == [] and not list((cache / "data").iterdir())
        Dataset.open(f"shardcache::{staged}", {"cache_dir": str(cache)}).read_table()  # room again: it fills
        assert cache_is_consistent(str(cache)) == [] and list((cache / "data").iterdir())

    real_pwrite = os.pwrite
    for i, decoded in enumerate((False, False, True, True)):
        with sc.trial(f"ENOSPC part-way through a fill ({'decoded' if decoded else 'compressed'} tier)"):
            cache = tmp_path / f"enospc-{i}"
            fraction = rng.uniform(0.05, 0.95)

            def pwrite(fd, data, offset):
                cut = int(len(data) * fraction)
                if cut:
                    real_pwrite(fd, bytes(data[:cut]), offset)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            opts = {"cache_dir": str(cache), "skip_instance_cache": True, "decoded": decoded}
            monkeypatch.setattr(cache_index.os, "pwrite", pwrite)
            try:
                with pytest.raises(CacheError, match=f"the shard cache folder '{cache}' has no room for .*No space"):
                    if decoded:
                        from storage.loader import StreamingDataset

                        list(StreamingDataset(f"shardcache::{staged}", batch_size=64, cache=True,
                                              storage_options=opts))
                    else:
                        Dataset.open(f"shardcache::{staged}", opts).read_table()
            finally:
                monkeypatch.setattr(cache_index.os, "pwrite", real_pwrite)
            assert cache_is_consistent(str(cache)) == []
            got = Dataset.open(f"shardcache::{staged}", opts).read_table()
            lost, dup = row_diff(Dataset.open(str(staged)).read_table(), got)
            sc.rows(got.num_rows, lost, dup)
            assert (lost, dup) == (0, 0) and cache_is_consistent(str(cache)) == []

    with sc.trial("swarm infer on S3 with a file size limit on it and its local cluster"):
        stage_plain(source="digits", dest=f"s3://{bucket}/digits", shard_size="16KB", storage_options=s3.storage_options)
        cache, out = tmp_path / "cli-cache", tmp_path / "predictions"
        proc = subprocess.run(
            [sys.executable, "-c", "from flows.cli import entrypoint; entrypoint()", "infer", digits_checkpoint,
             f"s3://{bucket}/digits", str(out), "--storage-option", f"endpoint_url={s3.endpoint}"],
            capture_output=True, text=True, cwd=ROOT, timeout=240, preexec_fn=_limit_file_size(1024),
            env={**{k: v for k, v in env.items() if k != "SWARM_DASK_ADDRESS"}, "SWARM_WORKERS": "1",
                 "SWARM_CACHE_DIR": str(cache)})
        assert_user_error(proc, f"the shard cache folder '{cache}' has no room for")
        assert cache_is_consistent(str(cache)) == []
        assert not (out / "index.json").exists()
    sc.note("a process whose file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) is below the shard size; os.pwrite "
            "failing with ENOSPC part-way through a fill (at a random share of the bytes), in the compressed and "
            "the decoded tiers; `swarm infer` of an S3 dataset with the limit on it and its local cluster. Each "
            "time: a CacheError naming the folder, no temporary or unverifiable file left in the cache, and, once "
            "there is room again, a full read")
    sc.check()
