"""Training attention (forward + backward) by SDPA backend, at the shapes of the decoders and the vision tower we train.

    python benchmarks/bench_attention.py --out bench_attention.json          # every backend at every shape (GPU)
    python benchmarks/bench_attention.py --smoke --out /tmp/bench_attn.json  # tiny shapes on the CPU (math only)

Which kernel F.scaled_dot_product_attention picks decides a good share of a training step (tinyllama-1.1b at 8 x 2048:
~1e13 attention FLOPs a step beside ~1e14 in the matmuls, at a lower rate). For each shape this times the causal
(decoders) or full (ViT) attention of bf16 q/k/v, forward + backward, through:
    default           SDPA as the models call it (grouped-query through enable_gqa; PyTorch picks the backend)
    flash / efficient / cudnn
                      SDPA restricted to that backend (torch.nn.attention.sdpa_kernel), grouped-query through
                      enable_gqa where the backend takes it, else with K/V repeated to every query head ("+repeat")
    flex              FlexAttention (compiled), causal block mask, enable_gqa
A backend that refuses a shape is recorded with its error. Rates: FLOPs / time against a bf16 matmul rate measured in
the same run (8192^3); attention FLOPs = 4 B H Tq Tk D forward (half of it when causal), x 3.5 with the backward.
"""
import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (name, batch, query heads, kv heads, tokens, head dim, causal)
SHAPES = [
    ("tinyllama-1.1b 8x2048", 8, 32, 4, 2048, 64, True),
    ("llama3.2-1b 8x2048", 8, 32, 8, 2048, 64, True),
    ("qwen2.5-0.5b 8x2048", 8, 14, 2, 2048, 64, True),
    ("llava seed LM 8x704", 8, 32, 4, 704, 64, True),
    ("clip-vit-l-336 8x577", 8, 16, 16, 577, 64, False),
]
SMOKE_SHAPES = [("tiny gqa", 2, 4, 2, 64, 16, True), ("tiny vit", 2, 4, 4, 50, 16, False)]
VARIANTS = ["default", "flash", "efficient", "cudnn", "flex"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--iters", type=int, default=20, help="timed forward + backward passes per variant")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 iterations, the default variant, on the CPU")
    ap.add_argument("--out", default="bench_attention.json", help="JSON file for the results")
    args = ap.parse_args(argv)
    args.variants = args.variants.split(",")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown --variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.smoke:
        args.iters, args.variants = 2, ["default"]
        args.device = "cpu" if args.device == "auto" else args.device
    return args


def attention_fn(variant, H, Hkv, causal, notes):
    """(q, k, v) -> output for one variant; q (B, H, T, D), k/v (B, Hkv, T, D). notes["repeat_kv"]: set when the
    backend refused enable_gqa and K/V were repeated."""
    gqa = H != Hkv
    if variant == "default":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    if variant == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention)
        masks = {}

        def run(q, k, v):
            T = q.shape[2]
            if T not in masks:
                masks[T] = create_block_mask(lambda b, h, i, j: i >= j, None, None, T, T, device=q.device) \
                    if causal else None
            return flex(q, k, v, block_mask=masks[T], enable_gqa=gqa)
        return run
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION}[variant]

    def run(q, k, v):
        with sdpa_kernel(backend):
            try:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
            except RuntimeError:
                if not gqa:
                    raise
                G = H // Hkv  # the backend refuses enable_gqa: K/V repeated to every query head (HF's repeat_kv)
                notes["repeat_kv"] = True
                return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                                      is_causal=causal)
    return run


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variant(fn, shape, iters, device, dtype):
    _, B, H, Hkv, T, D, causal = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen).requires_grad_()
    k, v = (torch.randn(B, Hkv, T, D, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(2))
    do = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, enable_gqa=H != Hkv)

    def step():
        out = fn(q, k, v)
        torch.autograd.backward(out, do)
        return out

    t0 = time.perf_counter()
    out = step()  # compiles (flex), picks the kernel
    sync(device)
    first_s = time.perf_counter() - t0
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    for _ in range(2):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    ms = 1000 * (time.perf_counter() - t0) / iters
    flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0) * 3.5
    return dict(ms=ms, tflops=flops / ms / 1e9, rel_err_vs_fp32=err, first_call_s=first_s)


def matmul_tflops(device, dtype, n=8192, iters=10):
    if not device.startswith("cuda"):
        return None
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12


def main(argv=None):
    args = parse_args(argv)
    from utils.runtime import pick_device
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    env = dict(device=torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
               torch=torch.__version__, cudnn=torch.backends.cudnn.version() if device.startswith("cuda") else None)
    rate = matmul_tflops(device, dtype)
    print(f"{env['device']}, torch {env['torch']}" + (f", bf16 matmul {rate:.0f} TFLOP/s measured" if rate else ""),
          flush=True)
    results = []
    for shape in (SMOKE_SHAPES if args.smoke else SHAPES):
        for variant in args.variants:
            row = dict(shape=shape[0], batch=shape[1], heads=shape[2], kv_heads=shape[3], tokens=shape[4],
                       head_dim=shape[5], causal=shape[6], variant=variant)
            try:
                notes = {}
                row.update(time_variant(attention_fn(variant, shape[2], shape[3], shape[6], notes), shape,
                                        args.iters, device, dtype), **notes)
                if rate:
                    row["fraction_of_matmul_rate"] = row["tflops"] / rate
                print(f"{shape[0]:>24s} {variant:>10s}: {row['ms']:8.3f} ms fwd+bwd, {row['tflops']:6.0f} TFLOP/s, "
                      f"max rel. err {row['rel_err_vs_fp32']:.1e}" + (" (K/V repeated)" if notes else ""), flush=True)
            except Exception as e:  # noqa: BLE001 - a backend that refuses the shape is a result, not a crash
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                print(f"{shape[0]:>24s} {variant:>10s}: {row['error']}", flush=True)
            results.append(row)
    summary = dict(args=vars(args), env=env, matmul_tflops=rate, results=results)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
