"""The lifecycle flow: a plain Python call, content-keyed caching of every stage, resume after a failure."""

import pytest

from tasks.optimize.config import OptimizeOptions
from tasks.training import TrainOptions
from tests.services import settled_task_runs


def _task_states(flow_run_id, expect=("stage", "train", "optimize", "infer")) -> dict[str, str]:
    """The lifecycle's stage tasks (stage, train, optimize, infer or generate) and the names of
    their states, once a run of each ``expect``-ed stage is there."""
    runs = settled_task_runs(flow_run_id, expect=expect)
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs if r.name.rsplit("-", 1)[0] in
            ("stage", "train", "optimize", "infer", "generate")}


def test_python_call_caching_and_changed_parameter(dask_cluster, tmp_path):
    from flows.lifecycle import LifecycleResult, lifecycle

    out = str(tmp_path / "out")
    first = lifecycle(output=out)
    assert isinstance(first, LifecycleResult)
    assert first.stages_run == ["stage", "train", "optimize", "infer"]
    assert first.trained.val_acc >= 0.95
    assert first.optimized.after["size_bytes"] < first.optimized.before["size_bytes"]
    assert first.predicted.rows == first.staged.rows == 1797

    state = lifecycle(output=out, return_state=True)
    second = state.result()
    assert second.stages_cached == ["stage", "train", "optimize", "infer"] and second.stages_run == []
    assert _task_states(state.state_details.flow_run_id) == {
        "stage": "Cached", "train": "Cached", "optimize": "Cached", "infer": "Cached"}
    assert second.predictions == first.predictions

    state = lifecycle(output=out, training=TrainOptions(epochs=5), return_state=True)
    third = state.result()
    assert _task_states(state.state_details.flow_run_id) == {
        "stage": "Cached", "train": "Completed", "optimize": "Completed", "infer": "Completed"}
    assert third.checkpoint != first.checkpoint and third.predictions != first.predictions
    assert third.trained.epochs == 5


def test_failed_run_resumes_from_the_failed_stage(dask_cluster, tmp_path):
    from flows.lifecycle import lifecycle
    from storage.errors import QualityGateError

    out = str(tmp_path / "out")
    ruin = OptimizeOptions(prune=0.97, structured=True, max_accuracy_drop=1.0)
    with pytest.raises(QualityGateError, match="quality gate"):
        lifecycle(output=out, optimization=ruin)
    state = lifecycle(output=out, return_state=True)
    assert _task_states(state.state_details.flow_run_id) == {
        "stage": "Cached", "train": "Cached", "optimize": "Completed", "infer": "Completed"}



def test_a_preset_fills_only_the_options_left_at_their_defaults():
    """``--preset text`` gives the GPT recipe; what the caller sets wins (the full text
    lifecycle, its time and its perplexity against a unigram model's:
    tests/acceptance/test_text_lifecycle.py, run by ``make reliability``)."""
    from flows.lifecycle import DataParams
    from flows.presets import apply_preset

    training = apply_preset("text", "training", TrainOptions(epochs=2), TrainOptions())
    assert (training.model, training.task, training.epochs, training.batch_size) == ("gpt", "causal-lm", 2, 16)
    data = apply_preset("text", "data", DataParams(), DataParams())
    assert (data.source, data.vocab_size, data.seq_len) == ("python-help", 2048, 128)
    assert apply_preset("digits", "training", TrainOptions(epochs=2), TrainOptions()) == TrainOptions(epochs=2)
def test_language_model_lifecycle_ends_with_generations(dask_cluster, tmp_path):
    """A causal LM's lifecycle ends with the optimized model generating continuations of the
    validation prompts (each validation block's first tokens); a second call finds it cached."""
    from flows.lifecycle import DataParams, lifecycle
    from storage.dataset import Dataset
    from tasks.generation.offline_config import GenerateOptions
    from tests.lm_data import documents

    src = tmp_path / "docs"
    src.mkdir()
    for i, doc in enumerate(documents(60)):
        (src / f"{i:03d}.txt").write_text(doc)
    out = str(tmp_path / "out")
    kwargs = dict(output=out, preset="text",
                  data=DataParams(source=str(src), vocab_size=300, seq_len=32, val_fraction=0.25),
                  training=TrainOptions(epochs=1, model_args={"d_model": 32, "n_heads": 2, "n_layers": 1}),
                  generation=GenerateOptions(split="val", prompt_tokens=8, max_new_tokens=6))
    first = lifecycle(**kwargs)
    assert first.stages_run == ["stage", "train", "optimize", "generate"] and first.predicted is None
    val_blocks = first.staged.splits["val"]
    assert first.generated.rows == val_blocks > 0 and first.generated.generated_tokens > 0
    table = Dataset.open(first.generations).read_table()
    assert table.num_rows == val_blocks and set(table.column("finish_reason").to_pylist()) <= {"length", "stop"}
    again = lifecycle(**kwargs)
    assert again.stages_cached == ["stage", "train", "optimize", "generate"] and again.generations == first.generations
