"""A script that calls a flow without an ``if __name__ == "__main__":`` guard fails at once, clearly."""

import os
import subprocess
import sys
import textwrap
import time

from tests.conftest import ROOT


def _run_script(tmp_path, body: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(body))
    env = dict(os.environ, PYTHONPATH=str(ROOT), SWARM_HOME=str(tmp_path / "home"))
    env.pop("PREFECT_API_URL", None)  # nothing may start before the check, not even the Prefect server
    env.pop("SWARM_DASK_ADDRESS", None)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=tmp_path)
    return proc, time.monotonic() - start


def test_unguarded_flow_call_fails_at_once_saying_how_to_fix_it(tmp_path):
    proc, seconds = _run_script(tmp_path, f"""
        from flows.stage import stage_dataset
        from tasks.staging import StageConfig

        stage_dataset(StageConfig(source="digits", dest={str(tmp_path / 'ds')!r}))
    """)
    assert proc.returncode != 0
    assert 'if __name__ == "__main__":' in proc.stderr and "user_script.py, line 5" in proc.stderr, proc.stderr
    assert "stage-dataset" in proc.stderr
    assert seconds < 30, f"took {seconds:.1f} s"  # imports only: no server, no cluster (it hung for minutes)
    assert not (tmp_path / "ds").exists() and not (tmp_path / "home" / "prefect").exists()


def test_guard_check_passes_guarded_calls_and_flags_a_spawned_child_rerunning_the_script(tmp_path):
    """In the parent, a call under the guard (through a function) is fine; a spawned child that re-runs
    the script's top level is told it is doing so (multiprocessing's bootstrapping flag)."""
    proc, _ = _run_script(tmp_path, """
        import multiprocessing
        from deployments.main_guard import unguarded_call_site

        if __name__ == "__mp_main__":
            print("child:", unguarded_call_site() is not None, flush=True)

        def main():
            print("parent:", unguarded_call_site(), flush=True)
            child = multiprocessing.get_context("spawn").Process(target=print, args=("child ran",))
            child.start()
            child.join()

        if __name__ == "__main__":
            main()
    """)
    assert proc.returncode == 0, proc.stderr
    assert "parent: None" in proc.stdout and "child: True" in proc.stdout and "child ran" in proc.stdout, proc.stdout
