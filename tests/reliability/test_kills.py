"""1. Kills: SIGKILL at random moments during staging, training and offline inference (the
command and its own local Dask cluster, as a whole), then a re-run: it completes and the
outputs hold every row exactly once. And a Dask worker process killed mid-task is survived.

Each killed run is ``swarm …`` in a process group of its own, started with a local cluster
of two workers and reporting to the session's Prefect server. The moment comes from the
seeded RNG (``_kill_at_random_moment``): in about one trial in six, a random point of the
start-up; otherwise a progress point p drawn uniformly from [0, 1), the kill coming once p
of the outputs an undisturbed run writes exist (plus up to 0.2 s), so kills spread over
the writing whatever the machine's load. The re-run is the same flow called from Python on
the session's cluster.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import checkpoint as ckpt
from storage.dataset import Dataset
from tests.conftest import stage_plain
from tests.reliability.conftest import TRIALS
from tests.reliability.helpers import kill_after, row_diff, swarm
from tests.reliability.results import scenario

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1200)]
SECTION = "1. Kills"
STARTUP_SHARE = 1 / 6


def _quiet_swarm(*args: str):
    return swarm(*args, own_cluster=True, stdout=open(os.devnull, "w"), stderr=open(os.devnull, "w"))


def _clean_run(out: Path, *args: str) -> float:
    """Run ``swarm ARGS`` undisturbed; return when its first output file appeared (s from the start)."""
    started = time.monotonic()
    proc = _quiet_swarm(*args)
    first = None
    while proc.poll() is None:
        if first is None and out.exists() and any(p.is_file() for p in out.rglob("*")):
            first = time.monotonic() - started
        time.sleep(0.01)
    assert proc.returncode == 0, f"the clean run of swarm {' '.join(args)} failed"
    assert first is not None, "the clean run wrote nothing"
    return first


def _kill_at_random_moment(rng, startup_s: float, progress, *args: str) -> tuple[bool, str]:
    """Start ``swarm ARGS`` and SIGKILL its process group at a random moment (see the module
    docstring); ``progress()`` is the share of an undisturbed run's outputs that exist.
    Returns whether it was killed (it may finish first) and where the moment was drawn."""
    proc = _quiet_swarm(*args)
    if rng.random() < STARTUP_SHARE:
        return kill_after(proc, rng.uniform(0.3, 1.0) * startup_s), "start-up"
    target = rng.random()
    while proc.poll() is None and progress() < target:
        time.sleep(0.005)
    return kill_after(proc, rng.uniform(0.0, 0.2)), f"{int(target * 5) * 20}-{int(target * 5) * 20 + 20}% written"


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def _parts(root: Path) -> set[str]:
    return {f for f in _files(root) if f.rsplit("/", 1)[-1].startswith("part-")}


class KillLog:
    """Kills of one scenario: where each moment was drawn and what the kill left behind."""

    def __init__(self, rng, startup_s: float):
        self.rng, self.startup_s = rng, startup_s
        self.moments: Counter = Counter()
        self.states: Counter = Counter()
        self.killed = 0

    def kill(self, progress, *args: str) -> None:
        was_killed, moment = _kill_at_random_moment(self.rng, self.startup_s, progress, *args)
        self.killed += was_killed
        self.moments[moment] += 1

    def found(self, state: str) -> None:
        self.states[state] += 1

    def note(self, sc) -> None:
        sc.note(f"{self.killed} of {sum(self.moments.values())} runs killed (the rest had finished first); moments: "
                + ", ".join(f"{n} {m}" for m, n in sorted(self.moments.items()))
                + "; found at the kill: " + ", ".join(f"{n} {s}" for s, n in self.states.most_common()))


# --------------------------------------------------------------------------- staging


def _source(path: Path, rows: int, version: int) -> tuple[str, np.ndarray]:
    """A Parquet source of ``rows`` rows with unique ids; versions differ in every payload."""
    ids = np.arange(rows, dtype=np.int64)
    rng = np.random.default_rng(version)
    payload = rng.standard_normal((rows, 48), dtype=np.float32)
    table = pa.table({"id": ids, "payload": pa.FixedSizeListArray.from_arrays(pa.array(payload.ravel()), 48),
                      "version": pa.array(np.full(rows, version, dtype=np.int32))})
    pq.write_table(table, path, row_group_size=1000)
    return str(path), ids


def test_sigkill_during_staging_then_rerun(dask_cluster, tmp_path, rng):
    from flows.stage import stage_dataset
    from tasks.staging import StageConfig

    sc = scenario(SECTION, "SIGKILL during staging (`swarm stage`), then re-run")
    old_src, _ = _source(tmp_path / "v1.parquet", 24_000, 1)
    new_src, new_ids = _source(tmp_path / "v2.parquet", 30_000, 2)
    options = dict(shard_size="64KB", val_fraction=0.1)
    args = ["--shard-size", options["shard_size"], "--val-fraction", str(options["val_fraction"])]
    old_hash = stage_plain(source=old_src, dest=str(tmp_path / "ref-v1"), **options).manifest_hash
    # Shards of the version a commit replaces stay one more version, for readers still on it.
    old_names = _parts(tmp_path / "ref-v1")
    ref = tmp_path / "ref-v2"
    startup_s = _clean_run(ref, "stage", new_src, str(ref), *args)
    new_hash = Dataset.open(str(ref)).manifest.content_hash()
    outputs = len(_parts(ref)) + 1  # the shards, then the manifest
    kills = KillLog(rng, startup_s)
    for trial in range(TRIALS):
        dest = tmp_path / f"trial-{trial}"
        over_old = trial % 2 == 1  # every other trial replaces an older version of the dataset
        with sc.trial(f"trial {trial}{' over an older version' if over_old else ''}"):
            if over_old:
                stage_plain(source=old_src, dest=str(dest), **options)

            def progress() -> float:
                done = len(_parts(dest) - old_names) + (dest / "index.json").exists() * (not over_old)
                return done / outputs

            kills.kill(progress, "stage", new_src, str(dest), *args)
            # Right after the kill: the old dataset or the new one, whole, never a mix.
            if (dest / "index.json").exists():
                found = Dataset.open(str(dest))
                found.verify()
                version = {old_hash: "the old version", new_hash: "the new version"}.get(found.manifest.content_hash())
                assert version, "the manifest after the kill names neither version"
                kills.found(f"{version} whole")
            else:
                kills.found(f"no dataset ({len(_parts(dest))} shards written)")
            result = stage_dataset(StageConfig(source=new_src, dest=str(dest), **options))
            ds = Dataset.open(str(dest))
            assert ds.manifest.content_hash() == new_hash == result.manifest_hash
            got = ds.read_table()
            lost, dup = row_diff(new_ids.tolist(), got.column("id").to_pylist())
            sc.rows(len(new_ids), lost, dup)
            assert (lost, dup) == (0, 0), f"{lost} rows lost, {dup} duplicated"
            assert set(got.column("version").to_pylist()) == {2}
            kept = {"index.json"} | {s.name for s in ds.manifest.shards} | (old_names if over_old else set())
            assert _files(dest) <= kept, f"stray files left: {sorted(_files(dest) - kept)[:5]}"
    kills.note(sc)
    sc.note(f"24,000 rows replaced by 30,000 (each id checked) in {outputs - 1} shards; every other trial stages "
            "over the older version, which must stay whole until the new manifest commits")
    sc.check()


# --------------------------------------------------------------------------- training

TRAIN = dict(epochs=6, batch_size=16, world_size=2, checkpoint_every=10)
TRAIN_ARGS = ["--epochs", "6", "--batch-size", "16", "--world-size", "2", "--checkpoint-every", "10"]


def _last_step(root: Path) -> int:
    steps = [int(p.parent.name.split("-")[1]) for p in root.glob(f"ckpt-*/{ckpt.META}")] if root.exists() else []
    return max(steps, default=0)


def test_sigkill_during_training_then_resume(dask_cluster, digits_dataset, tmp_path, rng):
    from flows.train import train_model
    from tasks.training import TrainConfig

    sc = scenario(SECTION, "SIGKILL during DDP training (`swarm train`, 2 ranks), then resume")
    ref = tmp_path / "ref"
    startup_s = _clean_run(ref, "train", digits_dataset, "--checkpoint-dir", str(ref), *TRAIN_ARGS)
    reference, ref_meta = ckpt.load(str(ref))
    total = ref_meta["step"]
    per_step = TRAIN["batch_size"] * TRAIN["world_size"]
    kills = KillLog(rng, startup_s)
    for trial in range(TRIALS):
        root = tmp_path / f"trial-{trial}"
        with sc.trial(f"trial {trial}"):
            kills.kill(lambda: _last_step(root) / total,
                       "train", digits_dataset, "--checkpoint-dir", str(root), *TRAIN_ARGS)
            step = _last_step(root)
            kills.found("no checkpoint" if not step else "the final checkpoint" if step == total
                        else f"a checkpoint {int(5 * step / total) * 20}-{int(5 * step / total) * 20 + 20}% in")
            result = train_model(TrainConfig(dataset=digits_dataset, checkpoint_dir=str(root), **TRAIN))
            got, _ = ckpt.load(result.checkpoint)
            missing = (total - result.steps) * per_step
            sc.rows(total * per_step, max(0, missing), max(0, -missing))
            assert result.steps == total and result.epochs == TRAIN["epochs"]
            different = [k for k in reference if not got[k].equal(reference[k])]
            assert not different, f"weights or optimizer state differ from an uninterrupted run: {different[:5]}"
    kills.note(sc)
    sc.note(f"digits, {TRAIN['epochs']} epochs, {total} steps of {per_step} samples, a checkpoint every 10 steps; "
            "rows counted as samples per step x steps, and the resumed run's final weights and optimizer state "
            "must equal an uninterrupted run's bit for bit, so no batch was skipped or replayed into the result")
    sc.check()


# --------------------------------------------------------------------------- offline inference


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> str:
    """Digits in ~120 shards: inference writes one prediction shard per input shard."""
    dest = str(tmp_path_factory.mktemp("kills") / "digits")
    stage_plain(source="digits", dest=dest, val_fraction=0.2, shard_size="8KB")
    return dest


def _expected_keys(dataset: str) -> list[tuple[str, int]]:
    return [(e.name, r) for e in Dataset.open(dataset).shards() for r in range(e.rows)]


def _prediction_keys(output: str) -> list[tuple[str, int]]:
    table = Dataset.open(output).read_table()
    return list(zip(table.column("shard").to_pylist(), table.column("row").to_pylist()))


def test_sigkill_during_offline_inference_then_rerun(dask_cluster, digits_checkpoint, many_shards, tmp_path, rng):
    from flows.infer import batch_inference
    from tasks.inference.offline import InferConfig

    sc = scenario(SECTION, "SIGKILL during offline inference (`swarm infer`), then re-run")
    ref = tmp_path / "ref"
    startup_s = _clean_run(ref, "infer", digits_checkpoint, many_shards, str(ref), "--probabilities")
    ref_hash = Dataset.open(str(ref)).manifest.content_hash()
    outputs = len(_parts(ref)) + 1
    expected = _expected_keys(many_shards)
    kills = KillLog(rng, startup_s)
    for trial in range(TRIALS):
        out = tmp_path / f"trial-{trial}"
        with sc.trial(f"trial {trial}"):
            kills.kill(lambda: (len(_parts(out)) + (out / "index.json").exists()) / outputs,
                       "infer", digits_checkpoint, many_shards, str(out), "--probabilities")
            kills.found("committed" if (out / "index.json").exists() else
                        f"no manifest ({len(_parts(out))} prediction shards)")
            batch_inference(InferConfig(model=digits_checkpoint, dataset=many_shards, output=str(out),
                                        probabilities=True))
            ds = Dataset.open(str(out))
            ds.verify()
            assert ds.manifest.content_hash() == ref_hash, "predictions differ from an uninterrupted run's"
            lost, dup = row_diff(expected, _prediction_keys(str(out)))
            sc.rows(len(expected), lost, dup)
            assert (lost, dup) == (0, 0), f"{lost} rows lost, {dup} duplicated"
            assert _files(out) == {"index.json"} | {s.name for s in ds.manifest.shards}, "stray files left"
    kills.note(sc)
    sc.note(f"1,797 digits rows in {outputs - 1} input shards; every prediction keyed (input shard, row) must "
            "appear once and the prediction dataset must equal an uninterrupted run's (manifest content hash)")
    sc.check()


# --------------------------------------------------------------------------- offline generation


def test_sigkill_during_generation_then_rerun(dask_cluster, tmp_path, rng):
    from flows.generate import batch_generate
    from tasks.generation.offline_config import GenerateConfig
    from tests.generation_data import jsonl_prompts, lm_checkpoint, prompts

    sc = scenario(SECTION, "SIGKILL during offline generation (`swarm generate`), then re-run")
    model = lm_checkpoint(tmp_path / "lm")
    source = jsonl_prompts(tmp_path / "prompts.jsonl", prompts(300))
    options = ("--max-new-tokens", "16", "--prompts-per-shard", "10", "--temperature", "0.8", "--seed", "5")
    ref = tmp_path / "ref"
    startup_s = _clean_run(ref, "generate", model, source, str(ref), *options)
    ref_hash = Dataset.open(str(ref)).manifest.content_hash()
    outputs = len(_parts(ref)) + 1
    expected = sorted(f"p{i}" for i in range(300))
    kills = KillLog(rng, startup_s)
    for trial in range(max(1, TRIALS // 3)):
        out = tmp_path / f"trial-{trial}"
        with sc.trial(f"trial {trial}"):
            kills.kill(lambda: (len(_parts(out)) + (out / "index.json").exists()) / outputs,
                       "generate", model, source, str(out), *options)
            kills.found("committed" if (out / "index.json").exists() else
                        f"no manifest ({len(_parts(out))} generation shards)")
            batch_generate(GenerateConfig(model=model, prompts=source, output=str(out), max_new_tokens=16,
                                          prompts_per_shard=10, temperature=0.8, seed=5))
            ds = Dataset.open(str(out))
            ds.verify()
            assert ds.manifest.content_hash() == ref_hash, "generations differ from an uninterrupted run's"
            lost, dup = row_diff(expected, ds.read_table().column("id").to_pylist())
            sc.rows(len(expected), lost, dup)
            assert (lost, dup) == (0, 0), f"{lost} prompts lost, {dup} duplicated"
            assert _files(out) == {"index.json"} | {s.name for s in ds.manifest.shards}, "stray files left"
    kills.note(sc)
    sc.note(f"300 JSON Lines prompts in {outputs - 1} output shards (tiny GPT, 16 new tokens, seeded sampling); "
            "every prompt id must appear once and the generations must equal an uninterrupted run's "
            "(manifest content hash); a third as many trials as the other kill scenarios (each starts a cluster)")
    sc.check()


# --------------------------------------------------------------------------- a Dask worker killed


def _kill_busy_worker(client, rng, ready, timeout: float = 120.0) -> str:
    """Once ``ready()`` holds, SIGKILL the process of a worker that is running a task."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            busy = sorted(w for w, keys in client.processing().items() if keys)
            if busy:
                victim = rng.choice(busy)
                pid = client.run(os.getpid, workers=[victim])[victim]
                os.kill(pid, signal.SIGKILL)
                return victim
        time.sleep(0.005)
    raise AssertionError("no task was running when the work had started")


def _in_thread(fn):
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def test_dask_worker_killed_mid_task_is_survived(dask_cluster, digits_dataset, digits_checkpoint, many_shards,
                                                 tmp_path, rng):
    from distributed import Client

    from flows.infer import batch_inference
    from flows.stage import stage_dataset
    from flows.train import train_model
    from tasks.inference.offline import InferConfig
    from tasks.staging import StageConfig
    from tasks.training import TrainConfig

    sc = scenario(SECTION, "A Dask worker process SIGKILLed mid-task (staging, inference, training)")
    source, ids = _source(tmp_path / "source.parquet", 20_000, 3)
    stage_cfg = lambda dest: StageConfig(source=source, dest=str(dest), shard_size="64KB", val_fraction=0.1)  # noqa: E731
    infer_cfg = lambda out: InferConfig(model=digits_checkpoint, dataset=many_shards, output=str(out))  # noqa: E731
    train_cfg = lambda root: TrainConfig(dataset=digits_dataset, checkpoint_dir=str(root), epochs=3,  # noqa: E731
                                         batch_size=32, world_size=2, checkpoint_every=10)
    stage_ref = stage_dataset(stage_cfg(tmp_path / "ref-stage")).manifest_hash
    infer_ref = batch_inference(infer_cfg(tmp_path / "ref-infer")).manifest_hash
    train_ref, _ = ckpt.load(train_model(train_cfg(tmp_path / "ref-train")).checkpoint)
    expected_keys = _expected_keys(many_shards)
    flows = ["staging", "inference", "training"]
    with Client(dask_cluster.scheduler_address) as client:
        for trial in range(TRIALS):
            flow = flows[trial % 3]
            out = tmp_path / f"trial-{trial}-{flow}"
            with sc.trial(f"{flow}, trial {trial}"):
                client.wait_for_workers(2, timeout=120)
                if flow == "staging":
                    thread, box = _in_thread(lambda: stage_dataset(stage_cfg(out)))
                    ready = lambda: out.exists() and any(out.rglob("part-*"))  # noqa: E731
                elif flow == "inference":
                    thread, box = _in_thread(lambda: batch_inference(infer_cfg(out)))
                    ready = lambda: out.exists() and any(out.rglob("part-*"))  # noqa: E731
                else:
                    thread, box = _in_thread(lambda: train_model(train_cfg(out)))
                    ready = lambda: out.exists() and any(out.glob(f"ckpt-*/{ckpt.META}"))  # noqa: E731
                _kill_busy_worker(client, rng, ready)
                thread.join(timeout=600)
                assert not thread.is_alive(), "the flow never finished"
                if "error" in box:
                    raise box["error"]
                if flow == "staging":
                    assert box["result"].manifest_hash == stage_ref
                    lost, dup = row_diff(ids.tolist(), Dataset.open(str(out)).read_table().column("id").to_pylist())
                    sc.rows(len(ids), lost, dup)
                elif flow == "inference":
                    assert box["result"].manifest_hash == infer_ref
                    lost, dup = row_diff(expected_keys, _prediction_keys(str(out)))
                    sc.rows(len(expected_keys), lost, dup)
                else:
                    got, meta = ckpt.load(box["result"].checkpoint)
                    assert box["result"].attempts >= 2, "the group was not retried"
                    assert not [k for k in train_ref if not got[k].equal(train_ref[k])], "weights differ"
                    lost = dup = 0
                assert (lost, dup) == (0, 0), f"{lost} rows lost, {dup} duplicated"
        client.wait_for_workers(2, timeout=120)
    sc.note("the session's cluster (two worker processes under nannies); the flow runs in a thread and the worker "
            "running one of its tasks is SIGKILLed once the task has written its first output; outputs must equal "
            "an undisturbed run's (staging and inference: manifest content hash, ids or keys once; training: the "
            "group is retried, resumes from its checkpoint and ends on the same weights)")
    sc.check()
