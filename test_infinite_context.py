"""Stream a long sequence through Coeus's recurrent path and show that memory stays flat.

    python test_infinite_context.py                                        # CPU: 4,096 tokens, one at a time
    python test_infinite_context.py --tokens 1000000 --mode prefill --out $OUT/infinite    # GPU, 1M tokens
    python test_infinite_context.py --tokens 65536 --mode step --compile --out $OUT/infinite_step

Checks (exit code 1 if one fails):
  1. flat memory: the peak after T = tokens/4 and after 4T tokens agree within 5%
     (GPU: torch.cuda.max_memory_allocated; CPU: the largest current RSS sampled after every call while
     streaming; the process's ru_maxrss is printed too);
  2. the streamed logits of the first --check-tokens tokens equal the parallel form's (fp32, rel err <= 1e-4).
Also prints the KV cache the Llama baseline of the same size would need for the same stream, from its
shapes (2 x layers x batch x kv_heads x tokens x head_dim x bytes), beside Coeus's fixed state.
--mode step streams one token per call (the decode path); --mode prefill streams --segment tokens per call
through the chunked parallel form, carrying the same state (what makes 1M tokens practical).
"""
import argparse
import json
import os
import sys
import time

import torch

from models.coeus import COEUS_CONFIGS, Coeus, CoeusConfig, coeus_config
from utils.checkpoint import load_checkpoint
from utils.runtime import CompiledOrEager, peak_rss_bytes, pick_device


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="total tokens streamed (4T); the first check is at T")
    p.add_argument("--mode", choices=["step", "prefill"], default="step")
    p.add_argument("--segment", type=int, default=4096, help="tokens per call in prefill mode")
    p.add_argument("--config", default="nano", choices=sorted(COEUS_CONFIGS))
    p.add_argument("--checkpoint", default=None, help="a trained Coeus checkpoint (default: random init)")
    p.add_argument("--vocab-size", type=int, default=65)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--check-tokens", type=int, default=512, help="prefix compared with the parallel form")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="model dtype (the logit check uses 1e-4 in fp32, 2e-2 in bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the step (eager fallback)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="folder for infinite_context.json")
    return p.parse_args(argv)


class PeakMeter:
    """GPU: torch.cuda.max_memory_allocated since reset. CPU: the largest current RSS sampled after every
    call while streaming (ru_maxrss alone would also hold the start-up peak and could hide growth)."""

    def __init__(self, device):
        self.cuda = device.startswith("cuda")
        self.peak = 0
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.update()

    def update(self):
        if not self.cuda:
            self.peak = max(self.peak, current_rss_bytes())

    def value(self):
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        self.update()
        return self.peak


def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # the logit check is an fp32 comparison
    dtype = getattr(torch, args.dtype)
    if args.checkpoint:
        try:
            ckpt = load_checkpoint(args.checkpoint, expect_kind="coeus")
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}")
        model = Coeus(CoeusConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    else:
        torch.manual_seed(0)
        model = Coeus(coeus_config(args.config, vocab_size=args.vocab_size))
    model = model.to(device, dtype).eval()
    cfg = model.config
    B, N = args.batch_size, args.tokens
    if N < 4 or N % 4:
        raise SystemExit(f"error: --tokens {N} must be a positive multiple of 4 (memory is compared at N/4 and N)")
    if args.mode == "prefill" and N < 8 * args.segment:
        raise SystemExit(f"error: --mode prefill needs --tokens >= 8 x --segment ({8 * args.segment}), so that the "
                         f"peak at T = tokens/4 already includes full segments; got --tokens {N}")
    gen = torch.Generator(device="cpu").manual_seed(1)
    P = min(args.check_tokens, N)
    prefix = torch.randint(0, cfg.vocab_size, (B, P), generator=gen).to(device)

    def tokens(start, n):  # the stream: the fixed prefix, then pseudo-random tokens made on the fly
        if start + n <= P:
            return prefix[:, start:start + n]
        g = torch.Generator(device="cpu").manual_seed(start)
        t = torch.randint(0, cfg.vocab_size, (B, n), generator=g).to(device)
        if start < P:
            t[:, :P - start] = prefix[:, start:]
        return t

    state = model.init_state(B)
    seg = 1 if args.mode == "step" else args.segment
    checks = {}
    streamed_prefix = []
    pos = 0
    t0 = time.time()
    # warm-up outside the measured region: allocator pools, compile
    warm = model.init_state(B)
    step = CompiledOrEager(model.step, "the recurrent step", dynamic=False) if args.compile else model.step
    if args.mode == "step":
        step(tokens(0, 1)[:, 0], warm)
    else:
        model.prefill(tokens(0, min(seg, N)), warm, last_only=True)
    del warm
    meter = PeakMeter(device)
    mem_start = meter.value()
    marks = {N // 4: None, N: None}
    while pos < N:
        n = min(seg, N - pos, (N // 4 - pos) if pos < N // 4 else N - pos)  # land exactly on N/4
        if pos < P and seg > 1:
            n = min(n, 97)  # the checked prefix goes in odd pieces, so the check crosses carried states
        ids = tokens(pos, n)
        if args.mode == "step":
            logits, state = step(ids[:, 0], state)
            if pos < P:
                streamed_prefix.append(logits[:, None])
        else:
            want_all = pos < P
            logits, state = model.prefill(ids, state, last_only=not want_all)
            if want_all:
                streamed_prefix.append(logits[:, :P - pos])
        pos += n
        meter.update()
        if pos in marks:
            marks[pos] = meter.value()
            print(f"{pos:>10,} tokens: peak memory {human(marks[pos])} ({time.time() - t0:.1f}s)", flush=True)
    elapsed = time.time() - t0

    # 1. flat memory
    m1, m4 = marks[N // 4], marks[N]
    flat = m4 <= 1.05 * m1
    checks["flat_memory"] = flat
    # 2. streamed logits vs the parallel form on the prefix
    streamed = torch.cat(streamed_prefix, 1)[:, :P].float()
    parallel = model(prefix).float()
    err = ((streamed - parallel).abs().max() / parallel.abs().max()).item()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    checks["logits_match_parallel"] = err <= tol

    # the Llama baseline's KV cache for the same stream, from its shapes (matched size: full MHA)
    elt = torch.finfo(dtype).bits // 8
    kv_llama = 2 * cfg.n_layers * B * cfg.n_heads * N * cfg.head_dim * elt
    coeus_state = sum(t.numel() * t.element_size() for t in state.values())
    tinyllama = 2 * 22 * B * 4 * N * 64 * 2  # TinyLlama-1.1B in bf16 (22 layers, 4 KV heads of 64)
    print(f"\nstreamed {N:,} tokens ({args.mode}, {'compiled' if args.compile else 'eager'}) in {elapsed:.1f}s "
          f"= {N / elapsed:,.0f} tokens/s on {device}")
    print(f"peak memory at {N // 4:,}: {human(m1)}; at {N:,}: {human(m4)} (start {human(mem_start)}); "
          f"ratio {m4 / m1:.4f} -> {'flat' if flat else 'NOT flat'} (<= 1.05)")
    print(f"logits vs parallel form on the first {P} tokens: rel err {err:.2e} (tolerance {tol:g}) -> "
          f"{'ok' if checks['logits_match_parallel'] else 'MISMATCH'}")
    if not device.startswith("cuda"):
        print(f"process peak RSS (ru_maxrss, includes start-up): {human(peak_rss_bytes())}")
    print(f"Coeus state (fixed, any length): {human(coeus_state)}")
    print(f"Llama baseline of the same size, KV cache for {N:,} tokens: {human(kv_llama)} "
          f"(2 x {cfg.n_layers} layers x {B} x {cfg.n_heads} kv heads x {N:,} x {cfg.head_dim} x {elt} B)")
    print(f"TinyLlama-1.1B (bf16) KV cache for {N:,} tokens: {human(tinyllama)}")
    result = {"tokens": N, "mode": args.mode, "device": device, "dtype": args.dtype, "seconds": elapsed,
              "peak_bytes_at_T": m1, "peak_bytes_at_4T": m4, "ratio": m4 / m1, "logit_rel_err": err,
              "coeus_state_bytes": coeus_state, "llama_kv_cache_bytes": kv_llama, "checks": checks}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "infinite_context.json"), "w") as f:
            json.dump(result, f, indent=1)
    if not all(checks.values()):
        print("FAILED: " + ", ".join(k for k, v in checks.items() if not v))
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
