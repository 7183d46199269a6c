"""Global-branch kernel benchmark: gated linear attention with one decay per head, forward and forward + backward.

Ours (models/gla.py chunk_gla, plain PyTorch under torch.compile) against flash-linear-attention's Triton
kernel of the same math, `chunk_simple_gla` (a scalar log-decay per head and token, as Mamba-2's SSD and
RetNet), and, as "a heavier kernel", fla's `chunk_gla` (a decay per key dimension: more work, ours' decay is
broadcast over Dk to feed it), and SDPA causal softmax attention. H=4, D=64, bf16, --tokens tokens per batch:
B = max(1, tokens // T), so a T above the budget runs ONE row of T tokens; every row states B x T and the
tokens it processes. Times are CUDA-event medians, all measured in the same run. The bytes floor is what
forward + backward must move at least (q, k, v, o, their gradients and g, dg read or written once) over the
bandwidth of a large device-to-device copy measured in the same run. fla's chunk_simple_gla backward is
refused on Hopper with Triton 3.6 (fla issue #640): that cell then reads "unsupported (fla #640)".
When fla is importable, ours is checked against it numerically. On CUDA the Triton kernels of kernels/gla.py have
columns of their own: the three-launch forward ("triton fwd") and the one-launch forward whose segments are chained
by decoupled look-back ("look-back", kernels.gla.FWD_LOOKBACK, the default; timed only if its output matches it);
"triton f+b" runs the default forward (GLA_FWD_LOOKBACK=0: the three-launch one) and the backward.

GPU:   python benchmarks/bench_gla_kernel.py --out $OUT/bench_gla
       python benchmarks/bench_gla_kernel.py --lengths 32768 --tokens 65536 --out $OUT/bench_gla_32k  # 32k x 2
CPU:   python benchmarks/bench_gla_kernel.py --smoke --out /tmp/bench_gla_smoke
fla:   pip install fla-core  (optional; without it its columns read "fla not installed")
"""
import argparse
import inspect
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.gla import chunk_gla  # noqa: E402
from kernels.launch import kernel_ok  # noqa: E402
from utils.runtime import cuda_graph  # noqa: E402

FLA_640 = "unsupported (fla #640)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="2048,8192,32768,131072", help="comma-separated sequence lengths T")
    p.add_argument("--tokens", type=int, default=65536, help="tokens per batch; B = max(1, tokens // T)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64, help="head dimension (Dk = Dv)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--chunk-sizes", default="64", help="chunk sizes of ours to time, e.g. 64,128")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="time ours eagerly")
    p.add_argument("--no-sdpa", action="store_true", help="skip the causal-SDPA (FlashAttention) column")
    p.add_argument("--heavy-peer", action="store_true",
                   help="also time fla's chunk_gla (a decay per key dimension: more work; its autotuning takes minutes)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time CUDA-graph replays of every call (ours, fla, SDPA alike): GPU time without the Python and "
                        "launch overhead that a single call at these sizes is bound by; without it, one call's wall time")
    p.add_argument("--lookback-segments", default="32",
                   help="caps on the segments a row of the experimental look-back forward (kernels.gla."
                        "LOOKBACK_MAX_SEGMENTS) to time, comma-separated, e.g. 4,8,16,32; its column shows the fastest")
    p.add_argument("--copy-mib", type=int, default=2048, help="buffer of the bandwidth-measuring copy")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="out/bench_gla", help="folder for results.json")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: float32, T=256,512, 1024 tokens, eager")
    return p.parse_args(argv)


def load_fla():
    """(chunk_simple_gla, chunk_gla, note): either may be None; note says why."""
    try:
        import fla  # noqa: F401
    except Exception:
        return None, None, "fla not installed"
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:
        chunk_simple_gla = None
        print(f"note: fla chunk_simple_gla not importable ({type(e).__name__}: {e})")
    try:
        from fla.ops.gla import chunk_gla as fla_chunk_gla
    except Exception as e:
        fla_chunk_gla = None
        print(f"note: fla chunk_gla not importable ({type(e).__name__}: {e})")
    return chunk_simple_gla, fla_chunk_gla, ""


def fla_kwargs(fn):
    # fla's layout is (B, T, H, D); old versions that still have head_first get told so (new ones reject it)
    return {"head_first": False} if "head_first" in inspect.signature(fn).parameters else {}


class Timer:
    """Median ms of one call. graph=True (CUDA): the call is captured once as a CUDA graph and its replays timed, so
    the figure is GPU time without Python and launch overhead (which at 65k tokens exceeds it, for us and for fla)."""

    def __init__(self, device, graph=False):
        self.cuda = device.startswith("cuda")
        self.graph = graph and self.cuda

    def __call__(self, fn, warmup, iters):
        if self.graph:  # warm-up (compiles, autotunes) on a side stream, then one capture
            fn, _ = cuda_graph(fn, max(2, warmup))
        for _ in range(warmup):
            fn()
        if not self.cuda:
            ts = []
            for _ in range(iters):
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e3)
            return statistics.median(ts)
        torch.cuda.synchronize()
        ts = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts)


def copy_bandwidth(device, mib, timer):
    """Bytes/s of a device-to-device copy of `mib` MiB (read + write counted), the floor's bandwidth."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), 3, 10)
    return 2 * n * 4 / (ms * 1e-3)


def floor_bytes(B, T, H, D, elem):
    """Bytes forward alone and forward + backward must move: q, k, v read, o written (+ g fp32); backward adds
    do read and dq, dk, dv written (+ dg), each once."""
    x, g = B * T * H * D * elem, B * T * H * 4
    return 4 * x + g, 8 * x + 2 * g


def make_inputs(B, H, T, D, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, H, T, device=device, generator=gen) + 4)  # log-decays ~ -0.02
    do = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen)
    return q, k, v, g, do


def fwd_bwd(fn, leaves, do):
    def run():
        for t in leaves:
            t.grad = None
        o = fn(*leaves)
        o.backward(do)
    return run


def fwd_only(fn, inputs):
    def run():
        with torch.no_grad():
            fn(*inputs)
    return run


def peak_mib(run, device):
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def first_line(e):
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


def timed_or_error(timer, run, args, name, unsupported=None):
    """Median ms, or a string: one failing third-party kernel must not end the sweep. unsupported: what to
    record instead of the error (fla #640), the error itself is printed."""
    t0 = time.perf_counter()
    try:
        ms = timer(run, args.warmup, args.iters)
        print(f"  {name}: {ms:.3f} ms ({time.perf_counter() - t0:.0f} s with warm-up)", flush=True)
        return ms
    except torch.OutOfMemoryError:
        return "OOM"
    except Exception as e:  # noqa: BLE001
        print(f"note: {name} failed ({first_line(e)})", flush=True)
        return unsupported or f"error: {first_line(e)}"


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def ratio(a, b):
    return a / b if isinstance(a, float) and isinstance(b, float) else None


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        args.lengths, args.tokens, args.dtype, args.iters, args.warmup = "256,512", 1024, "float32", 2, 1
        args.no_compile, args.device, args.copy_mib = True, "cpu", 16
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = getattr(torch, args.dtype)
    H, D = args.heads, args.dim
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",")]
    fla_simple, fla_gla, fla_note = load_fla()
    if fla_note:
        print(f"note: {fla_note}; fla columns marked so")
    bandwidth = copy_bandwidth(device, args.copy_mib, Timer(device))
    timer = Timer(device, graph=args.cuda_graph)
    print(f"device-to-device copy: {bandwidth / 1e9:.0f} GB/s (read + write, {args.copy_mib} MiB)")

    # one compiled graph per (T, chunk size, grad or not): lift dynamo's recompile cap (8) so none runs eagerly
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)

    def eager(C):
        return lambda q, k, v, g: chunk_gla(q, k, v, g, chunk_size=C, output_final_state=False)[0]
    ours = {C: eager(C) if args.no_compile else torch.compile(eager(C), dynamic=False) for C in chunk_sizes}

    rows = []
    for T in [int(t) for t in args.lengths.split(",")]:
        B = max(1, args.tokens // T)
        q, k, v, g, do = make_inputs(B, H, T, D, dtype, device)
        fb_fwd, fb_all = floor_bytes(B, T, H, D, dtype.itemsize)
        row = {"label": f"{B} x {T:,} = {B * T:,} tokens", "T": T, "B": B, "tokens": B * T, "H": H, "D": D,
               "dtype": args.dtype, "floor_fwd_ms": fb_fwd / bandwidth * 1e3, "floor_fwd_bwd_ms": fb_all / bandwidth * 1e3}
        for C in chunk_sizes:
            leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
            run = fwd_bwd(ours[C], leaves, do)
            try:
                run()
            except Exception as e:  # noqa: BLE001 - no working compiler: time the eager path and say so
                print(f"note: torch.compile failed ({first_line(e)[:160]}); eager")
                ours[C] = eager(C)
                run = fwd_bwd(ours[C], leaves, do)
                row[f"ours_c{C}_compiled"] = False
            row[f"ours_c{C}_fwd_ms"] = timer(fwd_only(ours[C], (q, k, v, g)), args.warmup, args.iters)
            row[f"ours_c{C}_ms"] = timer(run, args.warmup, args.iters)
            row[f"ours_c{C}_peak_mib"] = peak_mib(run, device)
            print(f"  ours C={C}: fwd {row[f'ours_c{C}_fwd_ms']:.3f} ms, fwd+bwd {row[f'ours_c{C}_ms']:.3f} ms", flush=True)
        if kernel_ok(device):  # the Triton kernels of kernels/gla.py (same math, fused per chunk)
            import kernels.gla as gla_kernels
            from kernels.gla import chunk_gla_triton
            default = gla_kernels.FWD_LOOKBACK
            gla_kernels.FWD_LOOKBACK = False  # the three-launch forward first; the look-back one is its own column
            tri = lambda q_, k_, v_, g_: chunk_gla_triton(q_, k_, v_, g_, chunk_size=chunk_sizes[0])[0]  # noqa: E731
            row["triton_fwd_ms"] = timed_or_error(timer, fwd_only(tri, (q, k, v, g)), args, "kernels/gla.py forward")
            if isinstance(row["triton_fwd_ms"], float):
                with torch.no_grad():
                    o_tri = tri(q, k, v, g)
                    row["rel_err_o_triton_vs_ours"] = rel(o_tri, ours[chunk_sizes[0]](q, k, v, g))
                # the experimental one-launch forward (segments chained by decoupled look-back), checked against it,
                # at each cap on its segments a row (--lookback-segments); the column shows the fastest
                gla_kernels.FWD_LOOKBACK = True
                cap, lookback = gla_kernels.LOOKBACK_MAX_SEGMENTS, {}
                for n_seg in [int(n) for n in args.lookback_segments.split(",") if n]:
                    gla_kernels.LOOKBACK_MAX_SEGMENTS = n_seg
                    key = f"triton_lookback_s{n_seg}_fwd_ms"
                    try:
                        with torch.no_grad():
                            row[f"rel_err_o_lookback_s{n_seg}_vs_triton"] = err = rel(tri(q, k, v, g), o_tri)
                        if err < 1e-2:
                            row[key] = timed_or_error(timer, fwd_only(tri, (q, k, v, g)), args,
                                                      f"kernels/gla.py forward, look-back over <= {n_seg} segments")
                            print(f"  look-back forward, <= {n_seg} segments a row: {fmt(row[key])} ms", flush=True)
                        else:
                            row[key] = f"wrong (rel err {err:.2e})"
                            print(f"  look-back forward, <= {n_seg} segments: wrong (rel err {err:.2e}); not timed")
                    except Exception as e:  # noqa: BLE001  (an experiment: its failure must not end the sweep)
                        row[key] = f"error: {first_line(e)}"
                        print(f"note: the look-back forward failed ({first_line(e)})", flush=True)
                    lookback[n_seg] = row[key]
                gla_kernels.LOOKBACK_MAX_SEGMENTS = cap
                timed = {n: t for n, t in lookback.items() if isinstance(t, float)}
                if timed:
                    row["lookback_best_segments"] = min(timed, key=timed.get)
                    row["triton_lookback_fwd_ms"] = timed[row["lookback_best_segments"]]
                elif lookback:  # the first failure, as the column's cell
                    row["triton_lookback_fwd_ms"] = next(iter(lookback.values()))
            # forward + backward as training runs it: the default forward (look-back unless GLA_FWD_LOOKBACK=0)
            gla_kernels.FWD_LOOKBACK = default
            leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
            row["triton_ms"] = timed_or_error(timer, fwd_bwd(tri, leaves, do), args, "kernels/gla.py fwd+bwd")
        qt, kt, vt, dot = (t.transpose(1, 2).contiguous() for t in (q, k, v, do))   # (B, T, H, D) for fla
        gs = g.transpose(1, 2).contiguous()                                          # (B, T, H)
        if fla_note:
            for c in ("fla_simple_fwd_ms", "fla_simple_ms", "fla_chunk_gla_ms"):
                row[c] = fla_note
        if fla_simple is not None:
            kw = fla_kwargs(fla_simple)
            f = lambda q_, k_, v_, g_: fla_simple(q=q_, k=k_, v=v_, g=g_, output_final_state=False, **kw)[0]  # noqa: E731
            row["fla_simple_fwd_ms"] = timed_or_error(timer, fwd_only(f, (qt, kt, vt, gs)), args, "fla chunk_simple_gla forward")
            leaves = [t.clone().requires_grad_() for t in (qt, kt, vt, gs)]
            row["fla_simple_ms"] = timed_or_error(timer, fwd_bwd(f, leaves, dot), args, "fla chunk_simple_gla backward",
                                                  unsupported=FLA_640)
            if isinstance(row["fla_simple_fwd_ms"], float):  # numerics: same math, same decays
                with torch.no_grad():
                    row["rel_err_o_vs_fla_simple"] = rel(ours[chunk_sizes[0]](q, k, v, g), f(qt, kt, vt, gs).transpose(1, 2))
        if fla_gla is not None and args.heavy_peer:
            kw = fla_kwargs(fla_gla)
            gk = gs[..., None].expand(B, T, H, D).contiguous()                       # the same decay on every key dim
            f = lambda q_, k_, v_, g_: fla_gla(q=q_, k=k_, v=v_, g=g_, output_final_state=False, **kw)[0]  # noqa: E731
            leaves = [t.clone().requires_grad_() for t in (qt, kt, vt, gk)]
            run = fwd_bwd(f, leaves, dot)
            row["fla_chunk_gla_ms"] = timed_or_error(timer, run, args, "fla chunk_gla")
            if isinstance(row["fla_chunk_gla_ms"], float):  # numerics of the gradients, through the heavier kernel
                row["fla_chunk_gla_peak_mib"] = peak_mib(run, device)
                l_ours = [t.clone().requires_grad_() for t in (q, k, v, g)]
                ours[chunk_sizes[0]](*l_ours).backward(do)
                row["rel_err_dq_vs_fla"] = rel(l_ours[0].grad, leaves[0].grad.transpose(1, 2))
                row["rel_err_dg_vs_fla"] = rel(l_ours[3].grad, leaves[3].grad.sum(-1).transpose(1, 2))
        if not args.no_sdpa:
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            run = fwd_bwd(lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=True), leaves, do)
            row["sdpa_causal_ms"] = timed_or_error(timer, run, args, "SDPA causal")
            if isinstance(row["sdpa_causal_ms"], float):
                row["sdpa_causal_peak_mib"] = peak_mib(run, device)
        # ours at its best: the compiled PyTorch form at any chunk size, or the Triton kernels
        best = min([row[f"ours_c{C}_ms"] for C in chunk_sizes] + [x for x in [row.get("triton_ms")] if isinstance(x, float)])
        best_fwd = min([row[f"ours_c{C}_fwd_ms"] for C in chunk_sizes]
                       + [x for x in [row.get("triton_fwd_ms"), row.get("triton_lookback_fwd_ms")] if isinstance(x, float)])
        row.update(ours_best_ms=best, ours_best_fwd_ms=best_fwd, ours_over_floor=best / row["floor_fwd_bwd_ms"],
                   fla_simple_fwd_over_ours=ratio(row.get("fla_simple_fwd_ms"), best_fwd),
                   ours_over_fla_simple=ratio(best, row.get("fla_simple_ms")),
                   ours_over_fla_chunk_gla=ratio(best, row.get("fla_chunk_gla_ms")),
                   ours_over_sdpa=ratio(best, row.get("sdpa_causal_ms")),
                   fla_simple_fwd_over_triton=ratio(row.get("fla_simple_fwd_ms"), row.get("triton_fwd_ms")))
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(args, rows, {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                          "torch": torch.__version__, "compiled": not args.no_compile, "fla_note": fla_note,
                          "cuda_graph": timer.graph,
                          "copy_bandwidth_gb_s": bandwidth / 1e9})  # after every length: a timeout keeps the rest
        del q, k, v, g, do, qt, kt, vt, dot, gs
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    cols = [("label", "B x T = tokens"), ("ours_c64_fwd_ms", "torch fwd"), ("triton_fwd_ms", "triton fwd"),
            ("triton_lookback_fwd_ms", "look-back fwd"),
            ("fla_simple_fwd_ms", "fla simple fwd"), ("fla_simple_fwd_over_ours", "simple/best fwd"),
            ("ours_c64_ms", "torch f+b"), ("triton_ms", "triton f+b"),
            ("fla_simple_ms", "fla simple f+b"), ("fla_chunk_gla_ms", "chunk_gla f+b*"), ("sdpa_causal_ms", "SDPA f+b"),
            ("floor_fwd_bwd_ms", "floor f+b"), ("ours_over_floor", "best/floor")]
    cols = [(c, h) for c, h in cols if any(c in r for r in rows)]
    w = [max(len(h), *(len(fmt(r.get(c))) for r in rows)) for c, h in cols]
    print(f"\nms, medians of {'CUDA-graph replays (GPU time)' if timer.graph else 'single calls (wall, launches included)'}; "
          "torch = models/gla.py compiled, triton = kernels/gla.py (look-back: its one-launch forward), best = the fastest. "
          "*chunk_gla: a heavier kernel (a decay per key dimension), not the same math")
    print(" | ".join(h.rjust(n) for (c, h), n in zip(cols, w)))
    for r in rows:
        print(" | ".join(fmt(r.get(c)).rjust(n) for (c, _), n in zip(cols, w)))
    goal = [r for r in rows if r["T"] == 32768 and r["B"] == 2]
    for r in goal:  # issue 20's kernel goals, at 32k x 2
        fwd = r["fla_simple_fwd_over_ours"]
        print(f"\ngoal at {r['label']}: forward >= 2x fla chunk_simple_gla's: "
              f"{'-' if fwd is None else ('met' if fwd >= 2 else 'NOT met') + f' ({fwd:.2f}x)'}; "
              f"fwd+bwd <= 0.8 ms: {'met' if r['ours_best_ms'] <= 0.8 else 'NOT met'} ({r['ours_best_ms']:.3f} ms)")
    print(f"wrote {os.path.join(args.out, 'results.json')}")


def save(args, rows, meta):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


def fmt(x):
    if isinstance(x, float):
        return f"{x:.4g}"
    return "-" if x is None else str(x)


if __name__ == "__main__":
    main()
