"""`swarm stage` then `swarm train` on an image folder, as a user runs them (Dask workers, Prefect)."""

from __future__ import annotations

from tests.conftest import run_cli
from tests.images import local_writer, write_image_folder


def test_cli_image_folder_bad_file_skip_bad_and_train(dask_cluster, tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    proc = run_cli("stage", str(tmp_path / "empty"), str(tmp_path / "ds"), "--format", "images")
    assert proc.returncode == 2 and "holds no image files in class folders" in " ".join(proc.stderr.split())
    assert not (tmp_path / "ds").exists()

    write_image_folder(local_writer(tmp_path / "src"))
    args = ("stage", str(tmp_path / "src"), str(tmp_path / "ds"), "--image-size", "16", "--val-fraction", "0.25")
    proc = run_cli(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "'cat/broken.jpg'" in proc.stderr and "--skip-bad" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "ds").exists()

    proc = run_cli(*args, "--skip-bad")
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    assert "2 classes (cat, dog)" in out and "1 image(s) that do not decode" in out

    proc = run_cli("train", str(tmp_path / "ds"), "--epochs", "3", "--batch-size", "8",
                   "--checkpoint-dir", str(tmp_path / "ckpt"))
    assert proc.returncode == 0, proc.stderr
    assert "cnn" in proc.stdout and "%" in proc.stdout
