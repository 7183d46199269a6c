"""Time and peak memory of long sequences: Coeus parallel forward, Coeus chunked prefill, Coeus recurrent
steps, a Coeus training step, and the Llama baseline (SDPA, same size) forward and training step, over a list
of lengths.

    python stress_test_massive.py                                   # CPU: 1k .. 30k, fresh process per point
    python stress_test_massive.py --max --out $OUT/stress          # GPU: adds 100k, 300k, 1M
    python stress_test_massive.py --lengths 1000,4000 --modes parallel,llama
    python stress_test_massive.py --lengths 8192,32768,100000,300000 \
        --modes parallel,llama,train,llama-train --out $OUT/stress  # GPU: forward and training step vs Llama

Peak memory: torch.cuda.max_memory_allocated on a GPU (weights included); on the CPU the peak RSS of a fresh
subprocess per measurement (ru_maxrss never decreases, so one process cannot measure several points), with
the RSS before the measured call beside it. An out-of-memory at one length is recorded as OOM and the sweep
goes on. Writes stress.csv, stress.json and stress.png (log-log) into --out.
Modes: parallel (model(ids), the training form, no grad), prefill (model.prefill(ids, last_only=True):
prefill_chunk tokens at a time, state carried), step (recurrent decode; --step-tokens tokens measured,
reported per token), llama (the matched Llama forward, SDPA causal), train and llama-train (one full training
step of Coeus / the matched Llama: forward, cross-entropy, backward, AdamW step; bf16 autocast over fp32
weights on a GPU, fp32 on the CPU) at a fixed token budget per step, --train-tokens = B x T with
B = max(1, budget // T), so T above the budget runs one row of T tokens. The train peak counts weights,
gradients, AdamW states and activations. Every row has tokens (what one timed call processes) and tokens_per_s.
The default --modes leave the train modes out (a 64k-token step is minutes on a CPU).
"""
import argparse
import contextlib
import csv
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from models.coeus import COEUS_CONFIGS, RECOMPUTE_MIXER, Coeus, CoeusConfig, coeus_config
from models.llama import Llama, LlamaConfig
from utils.memory_peak import record_live_at_peak
from utils.runtime import CompiledBlocks, CompiledOrEager, cuda_graph, peak_rss_bytes, pick_device

DEFAULT_LENGTHS = "1000,5000,10000,20000,30000"
MAX_LENGTHS = "100000,300000,1000000"
MODES = ("parallel", "prefill", "step", "llama", "train", "llama-train")
TRAIN_MODES = ("train", "llama-train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma-separated sequence lengths")
    p.add_argument("--max", action="store_true", help=f"also run {MAX_LENGTHS} (meant for a GPU)")
    p.add_argument("--modes", default="parallel,prefill,step,llama", help=f"which measurements, of {','.join(MODES)}")
    p.add_argument("--gla", default="torch", choices=["torch", "triton"],
                   help="Coeus's global branch: models/gla.py (plain PyTorch, compiled) or kernels/gla.py's Triton "
                        "kernels (CUDA only; the CPU keeps the PyTorch form)")
    p.add_argument("--config", default="nano", choices=sorted(COEUS_CONFIGS))
    p.add_argument("--vocab-size", type=int, default=65, help="65 = tinyshakespeare characters")
    p.add_argument("--recompute-mixer", default=CoeusConfig.recompute_mixer, choices=RECOMPUTE_MIXER,
                   help="train mode: what of Coeus's mixer the backward redoes (all: norm, projection and both "
                   "branches; branches: the projection's output is kept; alternate: all in the even layers, branches "
                   "in the odd ones; none: nothing is redone)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--step-tokens", type=int, default=256, help="tokens timed in step mode")
    p.add_argument("--train-tokens", type=int, default=65536,
                   help="tokens per training step (train modes): batch = max(1, train_tokens // T)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median), after one warm-up")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights/activations dtype; auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the step (step mode) and, in the parallel, "
                   "llama and train modes, every block of both models (utils.runtime.CompiledBlocks, as train_coeus.py "
                   "does); the first call's compile time is the row's warmup_s")
    p.add_argument("--cuda-graph", action="store_true",
                   help="parallel and llama modes on a GPU: capture the forward once and time graph replays, so "
                        "neither model pays Python and launch overhead (at batch 1 and 8k tokens both are launch-bound)")
    p.add_argument("--memory-peak", action="store_true",
                   help="on a GPU, run each point once more with the allocator's history on and list the largest "
                        "blocks live at its peak with the lines that allocated them (stress.json's live_at_peak; the "
                        "top 3 are printed). Not with --cuda-graph, whose replays allocate nothing; ignored on a CPU")
    p.add_argument("--out", default="out/stress", help="folder for stress.csv / .json / .png")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "mode:T", internal
    args = p.parse_args(argv)
    bad = [m for m in args.modes.split(",") if m not in MODES]
    if bad:
        p.error(f"unknown --modes value(s) {', '.join(map(repr, bad))}; valid: {', '.join(MODES)}")
    return args


def build(mode, args, device, dtype):
    """The model of a mode, in eval mode for the inference modes and in train mode (dropout is 0) for training."""
    cfg = coeus_config(args.config, vocab_size=args.vocab_size, recompute_mixer=args.recompute_mixer)
    if mode in ("llama", "llama-train"):
        lcfg = LlamaConfig(vocab_size=args.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                           n_kv_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim, max_seq_len=2048, tie_embeddings=True)
        model = Llama(lcfg)
    else:
        model = Coeus(cfg)
    model = model.to(device, dtype).train(mode in TRAIN_MODES)
    if args.gla == "triton":  # the global branch through kernels/gla.py (CUDA; elsewhere it stays plain PyTorch)
        from kernels.gla import use_gla_kernels
        use_gla_kernels(model)
    return model


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step_fn(model, ids, device, dtype):
    """One optimizer step on next-token cross-entropy: weights fp32, bf16 autocast when dtype is bf16 on a GPU."""
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = device.startswith("cuda") and dtype != torch.float32
    ctx = (lambda: torch.autocast("cuda", dtype=dtype)) if amp else contextlib.nullcontext

    def fn():
        with ctx():
            loss = model(ids, labels=ids)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return fn


def measure(mode, T, args, device, dtype):
    """One point: median seconds of `repeats` calls after a warm-up, and peak memory."""
    with torch.set_grad_enabled(mode in TRAIN_MODES):
        return _measure(mode, T, args, device, dtype)


def _measure(mode, T, args, device, dtype):
    torch.manual_seed(0)
    train = mode in TRAIN_MODES
    batch = max(1, args.train_tokens // T) if train else args.batch_size
    model = build(mode, args, device, torch.float32 if train else dtype)
    ids = torch.randint(0, args.vocab_size, (batch, T), device=device)
    t0 = time.perf_counter()  # warmup_s counts compilation and graph capture from here
    graph_peak = None
    if train:
        if args.compile:
            CompiledBlocks(model.layers, what=f"the {mode} blocks", dynamic=False)
        fn = train_step_fn(model, ids, device, dtype)
    elif mode == "parallel" or mode == "llama":
        if args.compile:
            CompiledBlocks(model.layers, what=f"the {mode} blocks", dynamic=False)
        fn = lambda: model(ids)  # noqa: E731
        if args.cuda_graph and device.startswith("cuda"):
            fn, graph_peak = cuda_graph(fn)
    elif mode == "prefill":
        fn = lambda: model.prefill(ids, last_only=True)  # noqa: E731
    elif mode == "step":
        n = min(T, args.step_tokens)
        step = CompiledOrEager(model.step, "the recurrent step", dynamic=False) if args.compile else model.step

        def fn():
            state = model.init_state(args.batch_size)
            for t in range(n):
                _, state = step(ids[:, t], state)
    else:
        raise SystemExit(f"error: unknown mode {mode!r}")
    base_rss = _current_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    fn()  # warm-up (and compile)
    sync(device)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    tokens = batch * (min(T, args.step_tokens) if mode == "step" else T)
    row = {"mode": mode, "T": T, "batch": batch, "tokens": tokens, "seconds": sec, "tokens_per_s": tokens / sec,
           "warmup_s": warmup_s}
    if mode == "step":
        row.update(step_tokens=min(T, args.step_tokens), ms_per_token=1e3 * sec / min(T, args.step_tokens))
    if device.startswith("cuda"):
        row["peak_mib"] = (graph_peak or torch.cuda.max_memory_allocated()) / 2**20
        if args.memory_peak and graph_peak is None:
            row.update(record_live_at_peak(fn))
    else:
        row["peak_mib"] = peak_rss_bytes() / 2**20
        row["rss_before_mib"] = base_rss / 2**20
    return row


def _current_rss():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def run_point(mode, T, args, device, dtype):
    if device.startswith("cuda"):
        try:
            return measure(mode, T, args, device, dtype)
        except torch.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()  # out of the except block: the traceback no longer holds the point's tensors
        return {"mode": mode, "T": T, "seconds": "OOM", "peak_mib": "OOM"}
    # CPU: a fresh interpreter per point, so ru_maxrss is this point's peak
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{mode}:{T}", "--config", args.config,
           "--vocab-size", str(args.vocab_size), "--recompute-mixer", args.recompute_mixer,
           "--batch-size", str(args.batch_size), "--repeats", str(args.repeats),
           "--step-tokens", str(args.step_tokens), "--train-tokens", str(args.train_tokens), "--device", device,
           "--dtype", args.dtype, "--gla", args.gla] + (["--compile"] if args.compile else []) \
        + (["--cuda-graph"] if args.cuda_graph else [])
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    if r.returncode != 0:
        err = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        oom = r.returncode in (-9, 137) or "MemoryError" in err or "out of memory" in err.lower()
        return {"mode": mode, "T": T, "seconds": "OOM" if oom else "error", "peak_mib": "OOM" if oom else "error",
                "note": err[:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def versus_llama(rows):
    """Per length, Coeus against the matched Llama where both were measured: speed-up (Llama seconds / Coeus
    seconds) and peak-memory ratio (Coeus / Llama), for the forward (parallel vs llama) and the training step."""
    by = {(r["mode"], r["T"]): r for r in rows if isinstance(r["seconds"], float)}
    out = []
    for what, ours, theirs in (("forward", "parallel", "llama"), ("training step", "train", "llama-train")):
        for T in sorted({r["T"] for r in rows}):
            a, b = by.get((ours, T)), by.get((theirs, T))
            if a and b:
                out.append({"T": T, "what": what, "speedup": b["seconds"] / a["seconds"],
                            "memory": a["peak_mib"] / b["peak_mib"]})
    return out


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode in sorted({r["mode"] for r in rows}):
        pts = [r for r in rows if r["mode"] == mode and isinstance(r["seconds"], float)]
        if not pts:
            continue
        style = dict(marker="s" if mode in TRAIN_MODES else "o", ls="--" if mode.startswith("llama") else "-",
                     label=mode)
        axes[0].plot([r["T"] for r in pts], [r["seconds"] for r in pts], **style)
        axes[1].plot([r["T"] for r in pts], [r["peak_mib"] for r in pts], **style)
        for r in rows:
            if r["mode"] == mode and r["seconds"] == "OOM":
                axes[0].axvline(r["T"], ls=":", color="gray")
    axes[0].set_ylabel("seconds per call (train: per step)")
    axes[1].set_ylabel("peak memory (MiB)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    if args.worker:
        mode, T = args.worker.split(":")
        print(json.dumps(measure(mode, int(T), args, device, dtype)))
        return
    lengths = [int(x) for x in args.lengths.split(",")] + ([int(x) for x in MAX_LENGTHS.split(",")] if args.max else [])
    modes = args.modes.split(",")
    os.makedirs(args.out, exist_ok=True)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    # every length is a new shape for the compiled flex_attention (and --compile's step): lift dynamo's cap
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    print(f"device {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}), {dtype_name}, "
          f"config {args.config}, batch {args.batch_size}, train budget {args.train_tokens} tokens/step")
    rows = []
    print(f"{'mode':>11} {'T':>9} {'batch':>5} {'seconds':>10} {'tokens/s':>11} {'peak MiB':>10}  note")
    for T in lengths:
        for mode in modes:
            row = run_point(mode, T, args, device, dtype)
            rows.append(row)
            sec = f"{row['seconds']:.4f}" if isinstance(row["seconds"], float) else row["seconds"]
            mem = f"{row['peak_mib']:.0f}" if isinstance(row["peak_mib"], float) else row["peak_mib"]
            tps = f"{row['tokens_per_s']:.0f}" if "tokens_per_s" in row else "-"
            note = f"{row['ms_per_token']:.2f} ms/token over {row['step_tokens']}" if "ms_per_token" in row else ""
            note += row.get("note", "")
            print(f"{mode:>11} {T:>9} {row.get('batch', '-'):>5} {sec:>10} {tps:>11} {mem:>10}  {note}", flush=True)
            for block in row.get("live_at_peak", [])[:3]:
                print(f"{'':>21} live at the peak: {block['mib']:8.1f} MiB  {block['where']}")
    comparison = versus_llama(rows)
    for c in comparison:
        print(f"T {c['T']:>9}: Coeus {c['what']} {c['speedup']:.2f}x the Llama's speed, {c['memory']:.2f}x its peak memory")
    keys = ["mode", "T", "batch", "tokens", "seconds", "tokens_per_s", "peak_mib", "rss_before_mib", "step_tokens",
            "ms_per_token", "note"]
    with open(os.path.join(args.out, "stress.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "stress.json"), "w") as f:
        json.dump({"device": device, "dtype": dtype_name, "config": args.config, "train_tokens": args.train_tokens,
                   "recompute_mixer": args.recompute_mixer,
                   "compile": args.compile, "cuda_graph": args.cuda_graph, "gla": args.gla, "rows": rows,
                   "vs_llama": comparison}, f, indent=1)
    plot(rows, os.path.join(args.out, "stress.png"))
    print(f"wrote {args.out}/stress.csv, stress.json, stress.png")


if __name__ == "__main__":
    main()
