"""What the training benchmarks share: device sync, memory reset between the two models, peak memory, timing and
profiling a training step, the comparison with the transformers rows."""
import gc
import time

import torch


class Timer:
    def __init__(self, device):
        self.cuda = device.startswith("cuda")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_memory(self):
        """Free what the previous model left; returns bytes still allocated (should be ~0)."""
        torch._dynamo.reset()  # compiled graphs hold references to their model's parameters
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return 0

    def peak_bytes(self):
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        from utils.runtime import peak_rss_bytes
        return peak_rss_bytes()  # CPU: process peak RSS, cumulative over the run (not comparable between models)


# GPU kernels by what they do, matched on their names in this order (the first match wins)
KERNEL_KINDS = [
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("cross-entropy kernel", ("_cross_entropy_kernel",)),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "splitk")),
    ("fused elementwise (compiled)", ("triton_",)),
]


def kernel_kind(name):
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other (eager elementwise, copies, reductions)"


def profile_step(step, timer, rows=15):
    """Profile one call of step(): prints the costliest GPU kernels and the GPU time by kind of kernel; returns
    {"gpu_busy_ms": total kernel time, "by_kind_ms": {...}, "top": [(name, ms), ...], "top_by_kind": the 5 costliest
    of each kind} (CPU: only the table)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if timer.cuda else [])
    timer.sync()
    with profile(activities=activities) as prof:
        step()
        timer.sync()
    print(prof.key_averages().table(sort_by="cuda_time_total" if timer.cuda else "cpu_time_total", row_limit=rows,
                                    max_name_column_width=70), flush=True)
    if not timer.cuda:
        return {}
    kernels = {}
    for e in prof.events():  # GPU kernels and copies; not the annotations (e.g. Optimizer.step#AdamW.step) over them
        if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False) \
                and "#" not in e.name:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.time_range.elapsed_us() / 1000
    by_kind, names_of_kind = {}, {}
    for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1]):
        kind = kernel_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
        names_of_kind.setdefault(kind, []).append((name[:120], ms))
    busy = sum(kernels.values())
    print(f"GPU busy {busy:.1f} ms in the profiled step: " + ", ".join(
        f"{k} {v:.1f} ms ({v / busy:.0%})" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])), flush=True)
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:rows]
    return dict(gpu_busy_ms=busy, by_kind_ms=by_kind, top=[(n[:120], ms) for n, ms in top],
                top_by_kind={k: v[:5] for k, v in names_of_kind.items()})


def time_training(name, model, loss_fn, steps, warmup, lr, timer, weight_decay=0.0, eager_loss_fn=None,
                  profile=False):
    """Warm up, then time `steps` optimizer steps of AdamW (fused where the device has it) on loss_fn().

    eager_loss_fn: if the first (compiling) step fails, say why and measure this uncompiled loss instead.
    profile: after the timed steps, profile one more (profile_step) and return its summary as "profile".
    Returns seconds of the timed steps, warm-up seconds, every loss, whether AdamW was fused, the compile error.
    """
    if timer.cuda:  # the peak counts from here: weights (already there), then gradients, AdamW states, activations
        torch.cuda.reset_peak_memory_stats()
    try:
        opt, fused = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True), True
    except (RuntimeError, TypeError):  # a device without a fused kernel
        opt, fused = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay), False
    losses, compile_error, current = [], None, {"fn": loss_fn}

    def step():
        loss = current["fn"]()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    t_start = time.perf_counter()
    if eager_loss_fn is not None:
        try:
            step()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - a compiler failure must not lose the run
            compile_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            print(f"warning: torch.compile failed for {name} ({compile_error}); measuring eagerly", flush=True)
            torch._dynamo.reset()
            opt.zero_grad(set_to_none=True)
            current["fn"] = eager_loss_fn
    for _ in range(warmup):
        step()
    timer.sync()
    warmup_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    timer.sync()
    seconds = time.perf_counter() - t0
    out = dict(seconds=seconds, warmup_s=warmup_s, losses=[float(x) for x in losses], fused_adamw=fused,
               compile_error=compile_error)
    if profile:
        print(f"profile of one {name} step (timed: {1000 * seconds / steps:.1f} ms a step):", flush=True)
        out["profile"] = profile_step(step, timer)
    return out


def compare_to_peers(results, rate, goal_speedup, goal_memory, cuda, mfu=False):
    """Ours against each transformers row measured (results["transformers_eager" / "_compiled"]): ours_vs_<peer>
    (`rate` ratios, e.g. tokens_per_s), memory_ratio_vs_<peer>, first_loss_diff_vs_<peer>; then speedup /
    memory_ratio / goal_met against the strongest peer (compiled where measured). mfu: print both MFUs too."""
    out, ours = {}, results["ours"]
    for peer in ("eager", "compiled"):
        r = results.get("transformers_" + peer)
        if r is None:
            continue
        out[f"ours_vs_{peer}"] = ours[rate] / r[rate]
        out[f"memory_ratio_vs_{peer}"] = ours["peak_mem_gb"] / r["peak_mem_gb"]
        out[f"first_loss_diff_vs_{peer}"] = abs(ours["first_loss"] - r["first_loss"])
        print(f"ours / transformers {peer}: {out[f'ours_vs_{peer}']:.3f}x {rate.replace('_per_s', '/s')}, peak "
              f"memory ratio {out[f'memory_ratio_vs_{peer}']:.3f}, first-step loss difference "
              f"{out[f'first_loss_diff_vs_{peer}']:.2e}" + (f", MFU {ours['mfu']:.1%} vs {r['mfu']:.1%}" if mfu else ""))
    peer = "compiled" if "ours_vs_compiled" in out else "eager" if "ours_vs_eager" in out else None
    if peer is None:
        return out
    out.update(peer=f"transformers_{peer}", speedup=out[f"ours_vs_{peer}"], memory_ratio=out[f"memory_ratio_vs_{peer}"],
               first_loss_diff=max(v for k, v in out.items() if k.startswith("first_loss_diff_vs_")))
    out["goal_met"] = peer == "compiled" and out["speedup"] >= goal_speedup and out["memory_ratio"] <= goal_memory
    print(f"goal (>= {goal_speedup}x transformers compiled, memory <= {goal_memory}x): "
          f"{'met' if out['goal_met'] else 'NOT met'}" + ("" if peer == "compiled" else " (compiled not measured)"))
    if not cuda:
        print("note: on CPU peak memory is the process's cumulative peak RSS; the ratio means nothing there")
    return out


def add_profile_arg(ap):
    ap.add_argument("--profile", action="store_true",
                    help="after timing, profile one step of each model: its costliest GPU kernels and the GPU time "
                         "by kind (matmul, attention, compiled elementwise, optimizer, ...)")


def add_transformers_args(ap):
    """The flags of which transformers rows a training benchmark measures, and how it compiles them."""
    ap.add_argument("--compile-hf", nargs="?", const="compiled", default="both",
                    choices=["both", "eager", "compiled", "off", "on"],
                    help="the transformers model: both (default: eager, then torch.compile'd, in this run; ours is "
                         "reported against each), eager (= off) or compiled (= on) alone")
    ap.add_argument("--hf-compile-backend", default=None,
                    help="torch.compile backend of transformers_compiled (default inductor; --smoke on CPU: aot_eager, "
                         "which traces the same graphs in seconds where inductor's CPU code generation takes ~40 s)")
