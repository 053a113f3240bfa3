"""prefect.yaml against a real Prefect server: deploy, runs through a worker, schedules, the UI."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest

from storage.dataset import Dataset
from tests.conftest import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def wait_final(flow_run_id, timeout: float = 240):
    deadline = time.monotonic() + timeout
    with _client() as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                return run
            time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout}s")


@pytest.fixture(scope="module")
def deployed(prefect_api, dask_cluster, tmp_path_factory):
    """`python -m deployments.deploy` (pool + `prefect deploy --all`), and one process worker."""
    proc = subprocess.run([sys.executable, "-m", "deployments.deploy"], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logs = tmp_path_factory.mktemp("worker") / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "swarm-process", "--limit", "2"],
        cwd=tmp_path_factory.mktemp("worker-cwd"), env=dict(os.environ), stdout=open(logs, "w"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    yield worker
    os.killpg(worker.pid, signal.SIGTERM)
    worker.wait(timeout=30)


def _deployment(name: str):
    with _client() as client:
        return client.read_deployment_by_name(name)


def test_deploy_all_creates_every_declared_deployment(deployed):
    from deployments.project import declared_deployments, load_flow

    for spec in declared_deployments():
        flow_name = load_flow(spec["entrypoint"]).name
        dep = _deployment(f"{flow_name}/{spec['name']}")
        assert dep.work_pool_name == "swarm-process"
        assert dep.parameters == (spec.get("parameters") or {})


def test_api_created_run_is_picked_up_by_worker(deployed, tmp_path):
    """What the UI's Run button does: a flow run created through the API, run by the worker."""
    dep = _deployment("stage-dataset/stage-digits")
    with _client() as client:
        run = client.create_flow_run_from_deployment(
            dep.id, parameters={"config": {"source": "digits", "dest": str(tmp_path / "ds"), "val_fraction": 0.25}})
    final = wait_final(run.id)
    assert final.state.is_completed(), final.state
    assert Dataset.open(str(tmp_path / "ds")).manifest.rows == 1797


def test_schedule_produces_scheduled_runs(deployed):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    dep = _deployment("train-model/nightly-retrain")
    assert dep.schedules and dep.schedules[0].schedule.cron == "0 2 * * *"
    deadline = time.monotonic() + 120
    runs = []
    with _client() as client:
        while time.monotonic() < deadline and not runs:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
            )
            time.sleep(1)
    assert runs, "the scheduler created no runs for the nightly schedule"
    assert all(r.expected_start_time.hour == 2 and r.expected_start_time.minute == 0 for r in runs)


def test_ui_run_button_starts_a_deployment(deployed, prefect_api, tmp_path):
    """Headless Chromium opens the Prefect UI, presses Run > Quick run, and sees the run complete."""
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        if os.environ.get("SWARM_REQUIRE_UI"):
            pytest.fail("chromium is not installed (CI installs Debian's chromium package)")
        pytest.skip("chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    ui = prefect_api.removesuffix("/api")
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    dep = _deployment("stage-dataset/stage-digits")
    of_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
    with _client() as client:
        before = {r.id for r in client.read_flow_runs(deployment_filter=of_deployment)}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{ui}/deployments/deployment/{dep.id}")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Quick run", exact=True).click()
        dialog = page.get_by_role("dialog")
        dest = dialog.get_by_role("textbox").nth(1)  # the typed form: source, then dest
        assert dest.input_value() == "swarm-data/datasets/digits"
        dest.fill(str(tmp_path / "from-ui"))
        page.screenshot(path=str(tmp_path / "ui-run-form.png"))
        # The UI validates the parameters against the server, then posts the run: wait for that post
        # (a loaded 2-core machine can take many seconds) rather than polling for a fixed time.
        try:
            with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith(
                    f"/deployments/{dep.id}/create_flow_run"), timeout=120_000) as posted:
                dialog.get_by_role("button", name="Run", exact=True).click()
            response = posted.value
        except sync_api.TimeoutError:
            page.screenshot(path=str(tmp_path / "ui-run-no-post.png"))
            pytest.fail(f"pressing Run in the dialog posted no flow run in 120 s; the page shows: "
                        f"{page.inner_text('body')[:800]!r}")
        assert response.ok, f"the UI's create_flow_run got {response.status}: {response.text()[:500]}"
        with _client() as client:
            new = [r for r in client.read_flow_runs(deployment_filter=of_deployment) if r.id not in before]
        assert [r.id for r in new] == [UUID(response.json()["id"])], "pressing Run > Quick run created no flow run"
        final = wait_final(new[0].id)
        assert final.state.is_completed(), final.state
        assert Dataset.open(str(tmp_path / "from-ui")).manifest.rows == 1797
        page.goto(f"{ui}/runs/flow-run/{final.id}")
        page.get_by_text("Completed").first.wait_for(timeout=30_000)
        shot = tmp_path / "ui-run-completed.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
    artifacts = Path(os.environ.get("SWARM_TEST_ARTIFACTS", ROOT / ".swarm" / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    for png in (shot, tmp_path / "ui-run-form.png"):
        shutil.copy(png, artifacts / png.name)


def test_gpu_workers_start_with_expandable_segments_unless_the_user_says_otherwise(monkeypatch):
    from distributed import Client, LocalCluster

    from deployments import cluster

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert cluster.gpu_worker_env() == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert cluster.gpu_worker_env() == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    with cluster.configure_gpu_workers():  # Dask's config changed only inside this block
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as local, \
                Client(local) as client:
            seen = client.run(lambda: __import__("os").environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    assert list(seen.values()) == ["expandable_segments:True"], "set in the worker process where it starts"


def test_serving_endpoint_runs_until_its_run_is_cancelled(deployed, digits_checkpoint):
    """The serve-digits deployment: a long-running flow run serves HTTP; cancelling it stops the endpoint."""
    import httpx
    from prefect.states import Cancelling

    from deployments.runtime import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    dep = _deployment("serve-endpoint/serve-digits")
    with _client() as client:
        run = client.create_flow_run_from_deployment(
            dep.id, parameters={"config": {"model": digits_checkpoint, "replicas": 1, "port": port}})
    deadline = time.monotonic() + 240
    health = None
    while health is None:
        try:
            health = httpx.get(f"{url}/health", timeout=5).json()
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the endpoint never answered"
            with _client() as client:
                state = client.read_flow_run(run.id).state
            assert not state.is_final(), f"the serving run ended before it served: {state}"
            time.sleep(1)
    assert health["status"] == "ok" and health["placement"][0]["state"] == "up"
    answer = httpx.post(f"{url}/predict", json={"inputs": [[0.0] * 64]}, timeout=30)
    assert answer.status_code == 200
    with _client() as client:
        assert client.read_flow_run(run.id).state.is_running()
        client.set_flow_run_state(run.id, Cancelling(), force=True)
    final = wait_final(run.id, timeout=120)
    assert final.state.is_cancelled(), final.state
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=5)
