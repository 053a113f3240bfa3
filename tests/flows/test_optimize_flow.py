"""Optimization through the flow (Dask worker, Prefect API) and the CLI: report, gate, bad input."""

import pytest

from storage.errors import QualityGateError
from tasks.models.loading import load_model
from tasks.optimize import OptimizeConfig
from tests.conftest import run_cli
from tests.flows.test_train_flow import artifacts_of


def test_flow_quantizes_reports_and_writes_a_loadable_model(dask_cluster, digits_checkpoint, digits_dataset, tmp_path):
    from flows.optimize import optimize_model

    out = tmp_path / "int8"
    state = optimize_model(OptimizeConfig(checkpoint=digits_checkpoint, eval_dataset=digits_dataset, output=str(out),
                                          quantize="int8-dynamic"), return_state=True)
    result = state.result()
    assert result.passed and result.output == str(out) and result.accuracy_drop <= 1.0
    assert load_model(str(out)).name == "mlp"
    table = next(a for a in artifacts_of(state.state_details.flow_run_id) if a.key == "optimize-model")
    for label in ("size on disk", "non-zeros", "latency, batch 1", "throughput, batch 64", "accuracy"):
        assert label in table.data


def test_flow_gate_failure_raises_and_writes_nothing(dask_cluster, digits_checkpoint, digits_dataset, tmp_path):
    from flows.optimize import optimize_model

    with pytest.raises(QualityGateError, match=r"accuracy fell \d+\.\d+ points .* more than the allowed 0.5"):
        optimize_model(OptimizeConfig(checkpoint=digits_checkpoint, eval_dataset=digits_dataset,
                                      output=str(tmp_path / "ruin"), prune=0.99, max_accuracy_drop=0.5))
    assert not (tmp_path / "ruin").exists()


def test_cli_optimize_prints_the_report(dask_cluster, digits_checkpoint, digits_dataset, tmp_path):
    proc = run_cli("optimize", digits_checkpoint, "--eval", digits_dataset, "--output", str(tmp_path / "out"),
                   "--prune", "0.3", "--quantize", "int8-weight-only", "--max-accuracy-drop", "2")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "optimized mlp: prune -> quantize" in text
    assert "throughput, batch 64" in text and "accuracy gate" in text and "passed" in text
    assert (tmp_path / "out" / "meta.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int4"], "invalid quantize (got 'int4')"),
    (["--prune", "1.5"], "invalid prune (got 1.5): Input should be less than 1"),
    (["--distill"], "No such option: --distill"),
])
def test_cli_bad_steps_exit_2_naming_the_value(digits_dataset, tmp_path, args, message):
    proc = run_cli("optimize", str(tmp_path / "ck"), "--eval", digits_dataset, "--output", str(tmp_path / "out"), *args)
    assert proc.returncode == 2, proc.stderr
    assert message in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_unlabelled_eval_dataset_exits_2(dask_cluster, digits_checkpoint, tmp_path):
    from tests.conftest import stage_plain

    (tmp_path / "plain.csv").write_text("x,y\n1,2\n3,4\n")
    stage_plain(source=str(tmp_path / "plain.csv"), dest=str(tmp_path / "plain"))
    proc = run_cli("optimize", digits_checkpoint, "--eval", str(tmp_path / "plain"), "--output",
                   str(tmp_path / "never"), "--quantize", "int8-dynamic")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no label column 'label' (columns: x, y)" in " ".join(proc.stderr.split())
    assert not (tmp_path / "never").exists()
