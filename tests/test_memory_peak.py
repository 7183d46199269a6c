"""utils/memory_peak.py: replaying an allocator trace to its peak (a synthetic trace: the recording itself needs CUDA)."""
from utils.memory_peak import live_at_peak, where


def frame(filename, line, name):
    return {"filename": filename, "line": line, "name": name}


def ev(action, addr, size, *frames):
    return {"action": action, "addr": addr, "size": size, "frames": list(frames)}


MODEL = frame("/repo/models/coeus.py", 120, "_qkvg")
INDUCTOR = frame("/tmp/torchinductor_root/ab/cabc.py", 77, "call")
TORCH = frame("/venv/lib/python3.11/site-packages/torch/nn/functional.py", 5, "linear")
NATIVE = frame("??", 0, "torch::unwind::unwind()")


def test_the_blocks_live_at_the_peak_largest_first():
    trace = [
        ev("free_completed", 99, 1000),                 # allocated before the recording: not counted
        ev("alloc", 1, 300, NATIVE, TORCH, MODEL),
        ev("free_requested", 1, 300),
        ev("free_completed", 1, 300),
        ev("alloc", 2, 500, INDUCTOR),                  # 500 live
        ev("alloc", 3, 200, MODEL),                     # 700: the peak
        ev("segment_alloc", 7, 4096),                   # segments are not blocks
        ev("free_completed", 2, 500),
        ev("alloc", 4, 400, MODEL),                     # 600, below the peak
    ]
    peak, blocks = live_at_peak(trace, top=5)
    assert peak == 700
    assert [b["mib"] * 2**20 for b in blocks] == [500, 200]
    assert blocks[0]["where"] == "cabc.py:77 call" and blocks[1]["where"] == "coeus.py:120 _qkvg"
    assert live_at_peak(trace, top=1)[1] == blocks[:1]
    assert live_at_peak([], top=3) == (0, [])


def test_where_skips_native_and_torch_frames():
    assert where([NATIVE, TORCH, MODEL, INDUCTOR]) == "coeus.py:120 _qkvg < cabc.py:77 call"
    assert where([NATIVE, TORCH]) == "?"
