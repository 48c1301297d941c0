"""What is allocated when a training step's memory peaks, and where it was allocated.

torch's caching allocator can record every allocation with its Python stack
(`torch.cuda.memory._record_memory_history`); `live_at_peak` replays that trace, finds the moment the
traced allocations peak, and groups what was live then by the line that allocated it. Two runs
(NF4 vs GPTQ bases, say) compared side by side locate a peak difference that the totals cannot.
"""
from __future__ import annotations

from collections import defaultdict

# frames in these files say how, not where: the first frame outside them names the allocating site
PLUMBING = ("/torch/", "/contextlib.py", "/functools.py", "<frozen", "/accelerate/")


def allocating_site(frames: list[dict]) -> str:
    """The innermost frame outside torch and Python's plumbing: 'path-tail:line function'."""
    for frame in frames:
        name = frame.get("filename", "")
        if not any(p in name for p in PLUMBING):
            tail = "/".join(name.split("/")[-2:])
            return f"{tail}:{frame.get('line')} {frame.get('name')}"
    return "torch internals" if frames else "no stack"


def live_at_peak(trace: list[dict], top: int = 15) -> dict:
    """Replays one device's allocator trace (alloc adds a block, free_completed takes it back; blocks
    allocated before recording began are not in it): the peak of the traced bytes, its position in the
    trace, and the `top` allocating sites by bytes live at that moment."""
    def replay(until: int | None):
        live, total, peak, peak_at = {}, 0, 0, -1
        for i, entry in enumerate(trace):
            if until is not None and i > until:
                break
            action = entry.get("action")
            if action == "alloc":
                live[entry["addr"]] = entry
                total += entry["size"]
                if total > peak:
                    peak, peak_at = total, i
            elif action == "free_completed" and entry["addr"] in live:
                total -= live.pop(entry["addr"])["size"]
        return live, peak, peak_at

    _, peak, peak_at = replay(None)
    live, _, _ = replay(peak_at)  # the same replay, stopped at the peak: what was live then
    sites: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for entry in live.values():
        site = sites[allocating_site(entry.get("frames") or [])]
        site[0] += entry["size"]
        site[1] += 1
    ranked = sorted(sites.items(), key=lambda kv: kv[1][0], reverse=True)
    return {"traced_peak_gib": round(peak / 2**30, 3), "peak_at_entry": peak_at, "entries": len(trace),
            "live_blocks": len(live),
            "sites": [{"site": s, "gib": round(b / 2**30, 3), "blocks": n} for s, (b, n) in ranked[:top]]}
