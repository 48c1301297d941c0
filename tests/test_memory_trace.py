"""benchmarks/memory_trace.py: replaying an allocator trace finds the peak of the traced bytes and names
what was live at that moment by its allocating line (the first frame outside torch's plumbing)."""
from benchmark_modules import load_benchmark


def _memory_trace():
    return load_benchmark("memory_trace")


def _frames(*where):
    return [{"filename": f, "line": line, "name": name} for f, line, name in where]


TORCH = ("/site/torch/nn/functional.py", 10, "linear")
DEQUANT = ("/site/gptqmodel/nn_modules/qlinear/triton.py", 88, "dequantize")
FUSED = ("/repo/ptq_qlora/adapters/fused_lora.py", 120, "forward")


def test_live_at_peak_names_what_was_live_at_the_peak_not_at_the_end():
    mt = _memory_trace()
    mib = 2**20
    trace = [
        {"action": "alloc", "addr": 1, "size": 100 * mib, "frames": _frames(TORCH, FUSED)},
        {"action": "alloc", "addr": 2, "size": 300 * mib, "frames": _frames(DEQUANT, FUSED)},
        {"action": "free_requested", "addr": 2, "size": 300 * mib},  # not yet given back
        {"action": "alloc", "addr": 3, "size": 50 * mib, "frames": _frames(TORCH, FUSED)},  # the peak: 450 MiB
        {"action": "free_completed", "addr": 2, "size": 300 * mib},
        {"action": "alloc", "addr": 4, "size": 200 * mib, "frames": []},  # 350 MiB: below the peak
        {"action": "free_completed", "addr": 99, "size": 1},  # allocated before recording: ignored
    ]
    summary = mt.live_at_peak(trace)
    assert summary["peak_at_entry"] == 3 and summary["live_blocks"] == 3
    assert abs(summary["traced_peak_gib"] - 450 / 1024) < 1e-3
    sites = {s["site"]: (s["gib"], s["blocks"]) for s in summary["sites"]}
    # torch's own frames are skipped: both fused_lora allocations land on its line; the block allocated
    # after the peak is not counted
    assert sites == {"adapters/fused_lora.py:120 forward": (round(150 / 1024, 3), 2),
                     "qlinear/triton.py:88 dequantize": (round(300 / 1024, 3), 1)}
    assert [s["site"] for s in summary["sites"]][0] == "qlinear/triton.py:88 dequantize"


def test_empty_trace_and_stackless_blocks():
    mt = _memory_trace()
    assert mt.live_at_peak([]) == {"traced_peak_gib": 0.0, "peak_at_entry": -1, "entries": 0, "live_blocks": 0,
                                   "sites": []}
    assert mt.allocating_site([]) == "no stack"
    assert mt.allocating_site(_frames(TORCH)) == "torch internals"
