"""What a CUDA memory peak is made of, and which lines allocated it.

torch.cuda.max_memory_allocated says how high the peak is, not what it holds. With the caching allocator's history
recorded over one call (torch.cuda.memory._record_memory_history), its events are replayed here up to the moment
the most bytes were allocated, and the blocks live then are listed, largest first, each with the first Python
frames of the code that allocated it. Inductor's generated code counts as such code: its line says which buffer
of a compiled graph the block is. This is how three projection-sized copies of Coeus's q, k, v were found at its
compiled peak (docs/coeus.md).
"""
import os

import torch


def where(frames, depth=2):
    """'file.py:line function < ...' of the first `depth` Python frames of an allocation that are not PyTorch's own
    (inductor's generated modules are kept: they live under torchinductor_*)."""
    out = []
    for f in frames:
        name = f.get("filename", "")
        if not name.endswith(".py") or ("/torch/" in name and "torchinductor" not in name):
            continue
        out.append(f"{os.path.basename(name)}:{f.get('line')} {f.get('name')}")
        if len(out) == depth:
            break
    return " < ".join(out) or "?"


def live_at_peak(events, top=10):
    """events: one device's allocator trace (memory snapshot["device_traces"][i]: dicts with action, addr, size and
    frames). Returns (the most bytes allocated at once during the trace, counting only blocks allocated in it, and
    the `top` largest of the blocks live at that moment as [{"mib", "where"}], largest first)."""
    total, peak, peak_at = 0, 0, -1
    sizes = {}
    for i, ev in enumerate(events):  # pass 1: when the peak happens
        if ev["action"] == "alloc":
            sizes[ev["addr"]] = ev["size"]
            total += ev["size"]
            if total > peak:
                peak, peak_at = total, i
        elif ev["action"] == "free_completed" and ev["addr"] in sizes:
            total -= sizes.pop(ev["addr"])
    live = {}
    for ev in events[:peak_at + 1]:  # pass 2: what is live then (one pass each, no copy per new maximum)
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
        elif ev["action"] == "free_completed":
            live.pop(ev["addr"], None)
    blocks = sorted(live.values(), key=lambda ev: -ev["size"])[:top]
    return peak, [{"mib": ev["size"] / 2**20, "where": where(ev.get("frames", []))} for ev in blocks]


def record_live_at_peak(fn, top=10, max_entries=200_000):
    """Run fn() once on the current CUDA device with the allocator's history on. Returns {"transient_peak_mib": the
    most memory fn held at once above what was allocated before it, "live_at_peak": live_at_peak's list}. Replays of a
    CUDA graph allocate nothing, so there is nothing to see in them."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=max_entries)
    try:
        fn()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    peak, blocks = live_at_peak(snapshot["device_traces"][torch.cuda.current_device()], top)
    return {"transient_peak_mib": peak / 2**20, "live_at_peak": blocks}
