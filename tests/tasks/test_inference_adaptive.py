"""The adaptive batch size on simulated cost functions and simulated out-of-memory."""

import numpy as np
import pytest
import torch

from tasks.inference.adaptive import AdaptiveBatchSize, is_out_of_memory, run_adaptive
from tasks.inference.memory import MemoryCap, MemoryCapExceeded, activation_bytes_per_row
from tasks.inference.predict import make_predict


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def knee(rows: int) -> float:
    """20 ms per batch + 1 ms per row up to 64 rows; past that a spill doubles the per-row cost."""
    return 0.020 + rows * (0.001 if rows <= 64 else 0.002)


def simulate(controller: AdaptiveBatchSize, cost, total: int, oom_above: int | None = None, slow_every: int = 0):
    """Run ``total`` rows through ``run_adaptive`` on a fake clock; return the chunks run."""
    clock = FakeClock()
    chunks = []

    def run(start: int, stop: int):
        if oom_above is not None and stop - start > oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        chunks.append((start, stop))
        clock.now += cost(stop - start) * (10 if slow_every and len(chunks) % slow_every == 0 else 1)
        return np.arange(start, stop)

    results = run_adaptive(run, total, controller, clock=clock)
    assert np.array_equal(np.concatenate(results), np.arange(total)), "every row once, in order"
    return chunks


def test_grows_while_throughput_improves_and_settles_at_the_knee():
    controller = AdaptiveBatchSize(maximum=1024, initial=8)
    simulate(controller, knee, 20_000)
    report = controller.report()
    assert report["size"] == 64 and report["settled"]
    assert list(report["tried"]) == [8, 16, 32, 64, 128]
    assert [c["to"] for c in report["changes"]] == [16, 32, 64]


def bump(rows: int) -> float:
    """64 rows are slower per row than 32 (a kernel that suits them badly); 256 are fastest."""
    per_row = {8: 0.0012, 16: 0.0010, 32: 0.0008, 64: 0.0009, 128: 0.0007, 256: 0.0005}.get(rows, 0.0006)
    return 0.002 + rows * per_row


@pytest.mark.parametrize("patience,settles_at,tried", [(0, 32, [8, 16, 32, 64]),
                                                       (2, 256, [8, 16, 32, 64, 128, 256, 512, 1024])])
def test_patience_grows_past_a_size_that_did_not_win(patience, settles_at, tried):
    controller = AdaptiveBatchSize(maximum=1024, initial=8, patience=patience)
    simulate(controller, bump, 40_000)
    report = controller.report()
    assert report["settled"] and report["size"] == settles_at
    assert list(report["tried"]) == tried


def test_trials_alternate_sizes_so_a_slowdown_hits_both():
    """The machine gets 3x slower in the middle of a trial (between a pair's two batches):
    16 rows still win over 8, where comparing the two sizes' medians would pick 8."""
    controller = AdaptiveBatchSize(maximum=16, initial=8)
    clock, sizes = FakeClock(), []

    def run(start, stop):
        sizes.append(stop - start)
        clock.now += knee(stop - start) * (3 if len(sizes) >= 7 else 1)
        return stop - start

    run_adaptive(run, 200, controller, clock=clock)
    assert sizes[3:9] == [8, 16, 8, 16, 8, 16]
    assert controller.size == 16 and controller.settled


def test_one_slow_batch_does_not_stop_growth():
    controller = AdaptiveBatchSize(maximum=1024, initial=8)
    simulate(controller, knee, 20_000, slow_every=3)  # each size's 3rd batch is 10x slower
    assert controller.size == 64


def test_latency_target_caps_growth():
    controller = AdaptiveBatchSize(maximum=1024, initial=8, latency_target_s=0.050)
    simulate(controller, knee, 5_000)
    assert controller.size == 16 and controller.settled  # 32 rows take 52 ms
    assert controller.ceiling == 16


def test_first_size_over_latency_target_halves_until_under():
    controller = AdaptiveBatchSize(maximum=1024, initial=64, latency_target_s=0.030)
    simulate(controller, knee, 5_000)
    assert controller.size == 8 and controller.settled  # 8 rows: 28 ms


def test_stops_at_maximum():
    controller = AdaptiveBatchSize(maximum=48, initial=8)
    chunks = simulate(controller, lambda rows: 0.020 + rows * 0.0001, 10_000)
    assert controller.size == 48 and controller.settled
    assert max(stop - start for start, stop in chunks) == 48


def test_out_of_memory_backs_off_and_retries_the_batch():
    controller = AdaptiveBatchSize(maximum=512, initial=256)
    chunks = simulate(controller, knee, 3_000, oom_above=50)
    assert max(stop - start for start, stop in chunks) <= 50
    report = controller.report()
    assert report["out_of_memory_at"] == [256, 128, 64] and report["ceiling"] == 32
    assert report["size"] == 32 and any("out of memory" in c["reason"] for c in report["changes"])


def test_out_of_memory_at_the_minimum_is_raised():
    controller = AdaptiveBatchSize(maximum=8, initial=8)
    with pytest.raises(MemoryError):
        run_adaptive(lambda a, b: (_ for _ in ()).throw(MemoryError("no memory")), 10, controller)
    assert controller.size == 1 and controller.oom_sizes == [8, 4, 2, 1]


def test_other_errors_are_not_retried():
    controller = AdaptiveBatchSize(maximum=64, initial=32)
    calls = []

    def run(start, stop):
        calls.append(stop - start)
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        run_adaptive(run, 100, controller)
    assert calls == [32] and controller.size == 32


def test_partial_batches_do_not_count():
    controller = AdaptiveBatchSize(maximum=64, initial=8, samples=1)
    controller.observe(3, 0.001)
    controller.observe(5, 0.001)
    assert controller.size == 8 and not controller.tried
    controller.observe(8, 0.010)
    assert controller.candidate == 16 and controller.size == 8, "trials start with the current size"
    controller.observe(8, 0.010)
    assert controller.size == 16


def test_without_a_controller_one_call():
    assert run_adaptive(lambda a, b: (a, b), 10, None) == [(0, 10)]
    assert run_adaptive(lambda a, b: (a, b), 0, None) == []


@pytest.mark.parametrize("exc, oom", [
    (torch.OutOfMemoryError("CUDA out of memory"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), True),
    (MemoryError(), True),
    (MemoryCapExceeded("out of memory: a batch of 9 rows"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("out of memory"), False),
])
def test_out_of_memory_recognized(exc, oom):
    assert is_out_of_memory(exc) is oom


def test_bad_bounds_refused():
    with pytest.raises(ValueError):
        AdaptiveBatchSize(maximum=4, minimum=8)
    with pytest.raises(ValueError):
        AdaptiveBatchSize(maximum=4, latency_target_s=0)


def test_memory_cap_on_cpu_backs_off_and_matches_the_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5)).eval()
    x = np.random.default_rng(0).random((100, 16), dtype=np.float32)
    per_row = activation_bytes_per_row(model, torch.from_numpy(x[:1]))
    assert per_row == (64 + 64 + 5 + 5) * 4  # every module's output for one row, the Sequential's too
    controller = AdaptiveBatchSize(maximum=64, initial=32)
    predict = make_predict(model, torch.from_numpy, "cpu", controller, MemoryCap(10 * per_row, per_row))
    out = predict(x)
    with torch.no_grad():
        expected = torch.cat([model(torch.from_numpy(x[i:i + 1])) for i in range(100)]).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert controller.oom_sizes == [32, 16] and controller.size == 8


def test_a_settled_size_is_probed_again():
    """Settled at 16 under a load that made larger batches slow; once it lifts, a re-probe finds 64."""
    controller = AdaptiveBatchSize(maximum=1024, initial=8, reprobe_after=20)
    simulate(controller, lambda rows: 0.020 + rows * (0.001 if rows <= 16 else 0.003), 2_000)
    assert controller.current == 16 and controller.changes[-1]["to"] == 16
    simulate(controller, knee, 20_000)
    assert controller.current == 64


def test_out_of_memory_ceiling_survives_reprobes():
    controller = AdaptiveBatchSize(maximum=1024, initial=64, reprobe_after=5)
    simulate(controller, knee, 20_000, oom_above=40)
    assert controller.size <= 32 and controller.memory_ceiling == 32
    assert len(controller.oom_sizes) == 1, "no size over the memory ceiling is tried again"
