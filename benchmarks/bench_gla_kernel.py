"""Global-branch kernel benchmark: forward + backward of gated linear attention at a fixed token budget.

Ours (models/gla.py chunk_gla, plain PyTorch under torch.compile) vs flash-linear-attention's Triton
`chunk_gla` (and `chunk_simple_gla`, fla's own scalar-gate kernel, where present) vs SDPA causal softmax
attention, at H=4, D=64, bf16, 65,536 tokens per batch (B = 65536 / T). Times are CUDA-event medians of
fwd+bwd (a fixed upstream gradient), all measured in the same run. When fla is importable, ours is also
checked against it numerically (same per-head decay broadcast over the key dimension).

GPU:   python benchmarks/bench_gla_kernel.py --out $OUT/bench_gla
CPU:   python benchmarks/bench_gla_kernel.py --smoke --out /tmp/bench_gla_smoke
fla:   pip install fla-core  (optional; without it its columns are skipped with a note)
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


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="2048,8192,32768,131072", help="comma-separated sequence lengths T")
    p.add_argument("--tokens", type=int, default=65536, help="tokens per batch; B = tokens // T")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64, help="head dimension (Dk = Dv)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--chunk-sizes", default="64", help="chunk sizes of ours to time, e.g. 64,128")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="time ours eagerly")
    p.add_argument("--no-sdpa", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="out/bench_gla", help="folder for results.json")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: float32, T=256,512, 1024 tokens, eager")
    return p.parse_args()


def load_fla():
    try:
        from fla.ops.gla import chunk_gla as fla_gla
    except Exception as e:
        return None, None, f"fla not importable ({type(e).__name__}: {e}); pip install fla-core"
    try:
        from fla.ops.simple_gla import chunk_simple_gla as fla_simple
    except Exception:
        fla_simple = None
    return fla_gla, fla_simple, ""


def fla_kwargs(fn):
    # fla's layout is (B, T, H, D); versions that still have head_first get told so explicitly
    return {"head_first": False} if "head_first" in inspect.signature(fn).parameters else {}


class Timer:
    def __init__(self, device):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn, warmup, iters):
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


def make_inputs(B, H, T, D, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, H, T, device=device, generator=gen) + 4) / 1.0  # log-decays ~ -0.02
    do = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen)
    return q, k, v, g, do


def fwd_bwd(fn, leaves, do):
    def run():
        for t in leaves:
            t.grad = None
        o = fn(*leaves)
        o.backward(do)
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


def timed_or_error(timer, run, args, name):
    """Median ms, or the error's first line: one failing third-party kernel must not end the sweep."""
    try:
        return timer(run, args.warmup, args.iters)
    except Exception as e:
        msg = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"note: {name} failed ({msg})", flush=True)
        return msg


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def main():
    args = parse_args()
    if args.smoke:
        args.lengths, args.tokens, args.dtype, args.iters, args.warmup = "256,512", 1024, "float32", 2, 1
        args.no_compile = True
        args.device = "cpu"
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = getattr(torch, args.dtype)
    H, D = args.heads, args.dim
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",")]
    fla_gla, fla_simple, fla_note = load_fla()
    if fla_note:
        print(f"note: {fla_note}; fla columns skipped")
    timer = Timer(device)

    # one compiled graph per (T, chunk size): lift dynamo's recompile cap (8) so none silently runs eagerly
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    ours = {}
    for C in chunk_sizes:
        f = (lambda q, k, v, g, C=C: chunk_gla(q, k, v, g, chunk_size=C, output_final_state=False)[0])
        ours[C] = f if args.no_compile else torch.compile(f, dynamic=False)

    rows = []
    for T in [int(t) for t in args.lengths.split(",")]:
        B = max(1, args.tokens // T)
        q, k, v, g, do = make_inputs(B, H, T, D, dtype, device)
        row = {"T": T, "B": B, "H": H, "D": D, "dtype": args.dtype}
        for C, f in ours.items():
            leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
            run = fwd_bwd(f, leaves, do)
            try:
                run()
            except Exception as e:  # no working compiler: time the eager path and say so
                print(f"note: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); eager")
                ours[C] = f = (lambda q, k, v, g, C=C: chunk_gla(q, k, v, g, chunk_size=C, output_final_state=False)[0])
                run = fwd_bwd(f, leaves, do)
                row[f"ours_c{C}_compiled"] = False
            row[f"ours_c{C}_ms"] = timer(run, args.warmup, args.iters)
            row[f"ours_c{C}_peak_mib"] = peak_mib(run, device)
        if fla_gla is not None:
            qt, kt, vt, dot = (t.transpose(1, 2).contiguous() for t in (q, k, v, do))   # (B, T, H, D)
            gt = g.transpose(1, 2)[..., None].expand(B, T, H, D).contiguous()          # per key dim
            kw = fla_kwargs(fla_gla)
            leaves = [t.clone().requires_grad_() for t in (qt, kt, vt, gt)]
            run = fwd_bwd(lambda q_, k_, v_, g_: fla_gla(q_, k_, v_, g_, **kw)[0], leaves, dot)
            row["fla_chunk_gla_ms"] = timed_or_error(timer, run, args, "fla chunk_gla")
            row["fla_chunk_gla_peak_mib"] = peak_mib(run, device) if isinstance(row["fla_chunk_gla_ms"], float) else None
            if fla_simple is not None:
                kws = fla_kwargs(fla_simple)
                leaves = [t.clone().requires_grad_() for t in (qt, kt, vt, g.transpose(1, 2).contiguous())]
                run = fwd_bwd(lambda q_, k_, v_, g_: fla_simple(q_, k_, v_, g_, **kws)[0], leaves, dot)
                # fla refuses its scalar-gate backward on some Triton/Hopper pairs (fla #640): record, go on
                row["fla_chunk_simple_gla_ms"] = timed_or_error(timer, run, args, "fla chunk_simple_gla")
        if fla_gla is not None and isinstance(row.get("fla_chunk_gla_ms"), float):
            # numerics: ours vs fla (same decays), outputs and dq, on this batch
            l_ours = [t.clone().requires_grad_() for t in (q, k, v, g)]
            o_ours = ours[chunk_sizes[0]](*l_ours)
            o_ours.backward(do)
            l_fla = [t.clone().requires_grad_() for t in (qt, kt, vt, gt)]
            o_fla = fla_gla(*l_fla, **kw)[0]
            o_fla.backward(dot)
            row["rel_err_o_vs_fla"] = rel(o_ours, o_fla.transpose(1, 2))
            row["rel_err_dq_vs_fla"] = rel(l_ours[0].grad, l_fla[0].grad.transpose(1, 2))
            row["rel_err_dg_vs_fla"] = rel(l_ours[3].grad, l_fla[3].grad.sum(-1).transpose(1, 2))
        if not args.no_sdpa:
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            run = fwd_bwd(lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=True), leaves, do)
            try:
                row["sdpa_causal_ms"] = timer(run, args.warmup, args.iters)
                row["sdpa_causal_peak_mib"] = peak_mib(run, device)
            except torch.OutOfMemoryError:
                row["sdpa_causal_ms"] = "OOM"
                torch.cuda.empty_cache()
        best = min(row[f"ours_c{C}_ms"] for C in chunk_sizes)
        row["ours_best_ms"] = best
        if isinstance(row.get("fla_chunk_gla_ms"), float):
            row["ours_over_fla"] = best / row["fla_chunk_gla_ms"]
        if isinstance(row.get("sdpa_causal_ms"), float):
            row["ours_over_sdpa"] = best / row["sdpa_causal_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, g, do
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    cols = ["T", "B"] + [f"ours_c{C}_ms" for C in chunk_sizes] + \
           ["fla_chunk_gla_ms", "fla_chunk_simple_gla_ms", "sdpa_causal_ms", "ours_over_fla", "ours_over_sdpa",
            "rel_err_o_vs_fla", "rel_err_dq_vs_fla"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print("\n" + " | ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>14.4g}" if isinstance(r.get(c), float) else f"{str(r.get(c, '-')):>14}"
                         for c in cols))
    goal = [r for r in rows if r["T"] >= 8192]
    if goal and all("ours_over_fla" in r for r in goal):
        ok_fla = all(r["ours_over_fla"] <= 1.5 for r in goal)
        ok_sdpa = all(r.get("ours_over_sdpa", 0) < 1.0 for r in goal)
        print(f"\ngoal (T >= 8k): <= 1.5x fla: {'met' if ok_fla else 'NOT met'}; faster than SDPA: "
              f"{'met' if ok_sdpa else 'NOT met'}")
    os.makedirs(args.out, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "compiled": not args.no_compile, "fla_note": fla_note}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()
