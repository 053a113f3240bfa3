"""3. Corruption: flipped bytes and cuts in cached shards, origin shards, manifests and
checkpoints are detected; read again where a good copy exists, else a clear error naming
the file (and, from the command line, exit 2 without a traceback)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from storage import checkpoint as ckpt
from storage.dataset import Dataset
from storage.errors import SwarmError
from storage.loader import StreamingDataset
from storage.urls import url_to_fs
from tests.conftest import run_cli, stage_plain
from tests.reliability.helpers import assert_user_error, cache_is_consistent, damage, row_diff
from tests.reliability.results import scenario

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(900)]
SECTION = "3. Corruption"


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """Digits in ~30 shards of 16 KB, and every row as read from it."""
    root = tmp_path_factory.mktemp("corruption") / "digits"
    stage_plain(source="digits", dest=str(root), val_fraction=0.2, shard_size="16KB")
    return root, Dataset.open(str(root)).read_table()


def _copy(staged, tmp_path, name="ds") -> Path:
    dest = tmp_path / name
    shutil.copytree(staged[0], dest)
    return dest


def _cached(root: Path, cache_dir: Path, **more):
    opts = {"cache_dir": str(cache_dir), "cache_bytes": "64MB", "skip_instance_cache": True, **more}
    return Dataset.open(f"shardcache::{root}", opts)


def _loader_rows(url: str, **options) -> list:
    """Every (feature, label) row of the train split as the training loader yields it."""
    ds = StreamingDataset(url, split="train", batch_size=64, shuffle="none", **options)
    rows = []
    for batch in ds:
        rows += [(tuple(x.flatten().tolist()), int(y)) for x, y in zip(batch["image"], batch["label"])]
    return rows


def _random_file(folder: Path, rng, pattern: str, suffix_not: str = ".xxh") -> Path:
    files = sorted(p for p in folder.rglob(pattern) if p.is_file() and not p.name.endswith(suffix_not))
    assert files, f"nothing matches {pattern} under {folder}"
    return rng.choice(files)


def test_damaged_cached_copies_are_fetched_again(staged, tmp_path, rng):
    sc = scenario(SECTION, "Cached shard damaged on disk (flipped byte or cut): detected, fetched again")
    root = staged[0]
    train_rows = _loader_rows(str(root))
    for i in range(10):
        how = "flip" if i % 2 == 0 else "cut"
        tier = "compressed" if i < 6 else "decoded"
        with sc.trial(f"{tier} copy, {how}"):
            cache = tmp_path / f"cache-{i}"
            if tier == "compressed":
                _cached(root, cache).read_table()
                victim = _random_file(cache / "data", rng, "sha256-*")
                what = damage(victim, rng, how)
                ds = _cached(root, cache)
                got = ds.read_table()
                assert ds.fs.stats.corrupt_hits == 1, f"{what} in {victim.name} went unnoticed"
                lost, dup = row_diff(staged[1], got)
                sc.rows(got.num_rows, lost, dup)
            else:
                opts = {"cache_dir": str(cache), "cache_bytes": "64MB"}
                _loader_rows(f"shardcache::{root}", storage_options=opts, cache=True, decoded=True)
                victim = _random_file(cache / "data", rng, "*-ipc")
                what = damage(victim, rng, how)
                got = _loader_rows(f"shardcache::{root}", storage_options=opts, cache=True, decoded=True)
                lost, dup = row_diff(train_rows, got)
                sc.rows(len(got), lost, dup)
            assert (lost, dup) == (0, 0), f"{what} in {victim.name}: {lost} rows lost, {dup} duplicated"
            assert cache_is_consistent(str(cache)) == []
    sc.note("the cache keeps an xxh3 digest per file and checks it on every hit; 6 compressed copies, 4 decoded")
    sc.check()


def test_damaged_origin_with_a_good_cached_copy_is_served_from_the_cache(staged, tmp_path, rng):
    sc = scenario(SECTION, "Origin shard damaged, a good copy in the node cache: served from the cache")
    for i in range(4):
        how = "flip" if i % 2 == 0 else "cut"
        with sc.trial(how):
            root = _copy(staged, tmp_path, f"ds-{i}")
            cache = tmp_path / f"cache-{i}"
            _cached(root, cache).read_table()
            victim = _random_file(root, rng, "part-*")
            damage(victim, rng, how)
            with pytest.raises(SwarmError, match=victim.name):
                Dataset.open(str(root)).verify()  # read directly, the damage shows
            got = _cached(root, cache).read_table()
            lost, dup = row_diff(staged[1], got)
            sc.rows(got.num_rows, lost, dup)
            assert (lost, dup) == (0, 0)
    sc.check()


def _read_direct(root: Path) -> None:
    Dataset.open(str(root)).read_table()


def _read_loader(root: Path) -> None:
    _loader_rows(str(root))


def _read_cache_fill(root: Path) -> None:
    _cached(root, root.parent / "cache").read_table()


def test_damaged_origin_without_a_good_copy_fails_naming_the_shard(staged, dask_cluster, digits_checkpoint,
                                                                    tmp_path, rng):
    sc = scenario(SECTION, "Origin shard damaged, no good copy: clear error naming the shard")
    readers = {"Dataset.read_table": _read_direct, "training loader": _read_loader, "cache fill": _read_cache_fill}
    for i, (label, read) in enumerate(list(readers.items()) * 2):
        how = "flip" if i < 3 else "cut"
        with sc.trial(f"{label}, {how}"):
            root = _copy(staged, tmp_path / f"t{i}", "ds")
            victim = _random_file(root / "train", rng, "part-*")
            damage(victim, rng, how)
            with pytest.raises(SwarmError, match=victim.name):
                read(root)
    for i, how in enumerate(("flip", "cut")):
        with sc.trial(f"swarm train, {how}"):
            root = _copy(staged, tmp_path / f"train-{how}", "ds")
            victim = _random_file(root / "train", rng, "part-*")
            damage(victim, rng, how)
            proc = run_cli("train", str(root), "--epochs", "1", "--checkpoint-dir", str(tmp_path / f"ck-{how}"))
            assert_user_error(proc, victim.name)
        with sc.trial(f"swarm infer, {how}"):
            root = _copy(staged, tmp_path / f"infer-{how}", "ds")
            victim = _random_file(root, rng, "part-*")
            damage(victim, rng, how)
            out = tmp_path / f"pred-{how}"
            proc = run_cli("infer", digits_checkpoint, str(root), str(out))
            assert_user_error(proc, victim.name)
            assert not (out / "index.json").exists()
    sc.check()


def test_damaged_manifests_are_refused_by_name_and_restaging_repairs_them(staged, dask_cluster, tmp_path, rng):
    sc = scenario(SECTION, "Manifest damaged: refused naming index.json; staging again repairs it")
    for i in range(8):
        how = "flip" if i < 5 else "cut"
        with sc.trial(how):
            root = _copy(staged, tmp_path / f"t{i}", "ds")
            what = damage(root / "index.json", rng, how)
            with pytest.raises(SwarmError, match="index.json") as caught:
                Dataset.open(str(root))
            assert str(root) in str(caught.value), f"{what}: {caught.value}"
            if i in (0, 5):
                proc = run_cli("train", str(root), "--epochs", "1", "--checkpoint-dir", str(tmp_path / f"ck{i}"))
                assert_user_error(proc, "index.json")
            stage_plain(source="digits", dest=str(root), val_fraction=0.2, shard_size="16KB")
            got = Dataset.open(str(root)).read_table()
            lost, dup = row_diff(staged[1], got)
            sc.rows(got.num_rows, lost, dup)
            assert (lost, dup) == (0, 0)
    sc.check()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, digits_dataset):
    """A digits MLP run with a checkpoint every 10 steps (several kept)."""
    from tasks.training import TrainConfig, prepare_training
    from tasks.training.rank import RankJob, train_rank

    root = tmp_path_factory.mktemp("ckpts") / "run"
    cfg = TrainConfig(dataset=digits_dataset, epochs=2, batch_size=64, checkpoint_every=10, keep_last=3,
                      checkpoint_dir=str(root))
    plan = prepare_training(cfg)
    train_rank(RankJob(cfg, plan.model_name, plan.model_args, plan.columns))
    return root


def test_damaged_checkpoints_are_refused_by_name(checkpoints, digits_dataset, dask_cluster, tmp_path, rng):
    sc = scenario(SECTION, "Checkpoint damaged (tensors or meta.json): refused naming the file")
    cases = [(f, h) for f in (ckpt.TENSORS, ckpt.META) for h in ("flip", "flip", "cut", "cut")]
    for i, (name, how) in enumerate(cases):
        with sc.trial(f"{name}, {how}"):
            folder = tmp_path / f"t{i}" / "ckpt"
            shutil.copytree(ckpt.latest(str(checkpoints)), folder)
            damage(folder / name, rng, how)
            with pytest.raises(SwarmError, match=name):
                ckpt.load(str(folder))
    for command in ("serve", "infer", "optimize"):
        with sc.trial(f"swarm {command}"):
            folder = tmp_path / command / "ckpt"
            shutil.copytree(ckpt.latest(str(checkpoints)), folder)
            damage(folder / ckpt.TENSORS, rng, "flip")
            out = tmp_path / command / "out"
            args = {"serve": ["serve", str(folder), "--port", "0"],
                    "infer": ["infer", str(folder), digits_dataset, str(out)],
                    "optimize": ["optimize", str(folder), "--eval", digits_dataset, "--output", str(out),
                                 "--quantize", "int8-dynamic"]}[command]
            proc = run_cli(*args, timeout=120)
            assert_user_error(proc, ckpt.TENSORS)
            assert not out.exists()
    sc.check()


def test_resume_skips_a_damaged_latest_checkpoint(checkpoints, digits_dataset, dask_cluster, tmp_path, rng):
    """The good copy of a run's state is its previous checkpoint: resume from it, reach the same weights."""
    from flows.train import train_model
    from tasks.training import TrainConfig

    sc = scenario(SECTION, "Latest checkpoint damaged: training resumes from the previous one, same final weights")
    common = dict(dataset=digits_dataset, epochs=3, batch_size=64, checkpoint_every=10, keep_last=3)
    reference = train_model(TrainConfig(checkpoint_dir=str(tmp_path / "reference"), **common))
    want, _ = ckpt.load(reference.checkpoint)
    for i, (name, how) in enumerate([(ckpt.TENSORS, "flip"), (ckpt.META, "cut"), (ckpt.TENSORS, "cut")]):
        with sc.trial(f"{name}, {how}"):
            root = tmp_path / f"t{i}"
            shutil.copytree(checkpoints, root)
            latest = ckpt.latest(str(root))
            damage(Path(latest) / name, rng, how)
            result = train_model(TrainConfig(checkpoint_dir=str(root), **common))
            assert result.resumed_from and result.resumed_from != latest, result.resumed_from
            got, _ = ckpt.load(result.checkpoint)
            assert result.steps == reference.steps
            assert all(got[k].equal(want[k]) for k in want), "resumed weights differ from an uninterrupted run"
    sc.check()
