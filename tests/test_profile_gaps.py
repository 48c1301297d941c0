"""benchmarks/qlora_speed.py's profile summary: the GPU's busy time is the union of kernel intervals over
all streams (overlaps counted once), the idle time the rest of the window, and the largest idle gaps say
where the GPU waited and which kernel ended the wait. Host (CPU) events do not count."""
from types import SimpleNamespace

from benchmark_modules import load_benchmark


def _qlora_speed():
    return load_benchmark("qlora_speed")


def _event(device, name, start_us, end_us):
    return SimpleNamespace(device_type=f"DeviceType.{device}", name=name,
                           time_range=SimpleNamespace(start=start_us, end=end_us))


def test_busy_time_is_the_union_of_kernels_and_gaps_are_ranked():
    events = [_event("CUDA", "gemm", 0, 10_000), _event("CUDA", "copy_side_stream", 5_000, 20_000),  # overlapping
              _event("CUDA", "norm", 30_000, 40_000), _event("CUDA", "step_start", 1_040_000, 1_050_000),
              _event("CPU", "optimizer", 0, 2_000_000)]
    summary = _qlora_speed().busy_and_idle(events)
    assert summary["window_ms"] == 1050.0 and summary["busy_ms"] == 40.0 and summary["idle_ms"] == 1010.0
    assert summary["largest_gaps"] == [{"at_ms": 40.0, "ms": 1000.0, "next_kernel": "step_start"},
                                       {"at_ms": 20.0, "ms": 10.0, "next_kernel": "norm"}]
    assert _qlora_speed().busy_and_idle([_event("CPU", "only host", 0, 5)]) == {}
