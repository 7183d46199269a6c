"""Training throughput of our TinyLlama-shaped decoder vs transformers' LlamaForCausalLM, in the same run.

    # the issue's benchmark (one H100/H200): tinyllama-1.1b, batch 8 x 2048 tokens, bf16, fused AdamW;
    # transformers both eager and compiled (the default, --compile-hf both), ours against each
    python benchmarks/bench_llama_train.py --out bench_llama_train.json
    # the headline plus ablations in one run: whole-trunk compile, and no compile at all
    python benchmarks/bench_llama_train.py --compile blocks,model,none --out bench_llama_train.json
    # ours with the loss's cross-entropy in PyTorch instead of the kernel, and with the full logits (as transformers)
    python benchmarks/bench_llama_train.py --loss fused,fused-torch,full --out bench_loss.json
    # where a step's GPU time goes (costliest kernels; matmul / attention / compiled elementwise / optimizer)
    python benchmarks/bench_llama_train.py --compile-hf compiled --profile --out bench_profile.json
    # CPU smoke test of the whole path on a tiny config (seconds)
    python benchmarks/bench_llama_train.py --smoke --out /tmp/bench_smoke.json

Precision recipe, identical for both models: weights, gradients and AdamW states all in bf16 (the model is
cast with .to(torch.bfloat16); torch.optim.AdamW(fused=True) steps the bf16 parameters directly), no autocast,
no fp32 master weights. Both start from the same weights (ours are exported to transformers through
models/hf_weights.py) and train on the same random token batch, so the first-step losses must agree.

What differs is only the model code:
  transformers: LlamaForCausalLM(attn_implementation="sdpa"), model(input_ids, labels=..., use_cache=False).loss,
                which materialises the (B, T, 32000) logits in bf16 and again in fp32 for the loss; measured
                eagerly (results "transformers_eager") and under torch.compile of the whole model
                (results "transformers_compiled", the strongest peer: "speedup" and "goal_met" are against it).
  ours:         models.llama.Llama, loss via Llama.loss (chunked fused linear cross-entropy: no full logits; each
                chunk's cross-entropy and gradient in one Triton kernel on CUDA, kernels/cross_entropy.py),
                and torch.compile of each decoder block (--compile blocks, the default) or of the whole trunk.

Measured: tokens/s over --steps timed steps after --warmup untimed ones (compilation happens in warmup),
with torch.cuda.synchronize around the timed loop; peak memory = torch.cuda.max_memory_allocated over the
model's training run (weights, gradients, optimizer states and activations; reset once the model is built,
so the fp32 construction before the bf16 cast does not count), the other model freed first.
Model FLOPs utilisation uses 6 * N_non-embedding + 6 * n_layers * dim * T (causal attention) per token.
"""
import argparse
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_common import (Timer, add_profile_arg, add_transformers_args, compare_to_peers,  # noqa: E402
                                     time_training)
from models.hf_weights import decoder_family, llama_config_to_hf, ours_to_hf, qwen2_config_to_hf  # noqa: E402
from models.llama import Llama, llama_config  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tinyllama-1.1b", help="named LlamaConfig (models/llama.py LLAMA_CONFIGS)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per model")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator warm-up)")
    ap.add_argument("--compile", default="blocks",
                    help="torch.compile for OUR model: blocks (each decoder block), model (the whole trunk) or none; "
                         "a comma list (e.g. blocks,model,none) measures each in turn, the first is the headline")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode, e.g. default, max-autotune-no-cudagraphs")
    ap.add_argument("--loss", default="fused",
                    help="OUR loss: fused (chunked head + cross-entropy, the chunks' cross-entropy in one Triton kernel "
                         "on CUDA: kernels/cross_entropy.py), fused-torch (the same chunks in PyTorch) or full (the "
                         "whole logits, as transformers); a comma list measures each in turn after each --compile mode")
    ap.add_argument("--chunk", default="4096", help="rows per chunk of the fused cross-entropy (a comma list measures "
                                                   "each in turn, after each --compile mode and --loss kind)")
    add_transformers_args(ap)
    add_profile_arg(ap)
    ap.add_argument("--fp8", action="store_true",
                    help="also time ours with float8 matmuls (models/fp8.py: rowwise-scaled e4m3 in all three "
                         "matmuls of every block's Linear, torchao's 'rowwise' recipe; the head stays bf16) as its own "
                         "row, ours[fp8], after the headline, with its loss curve against ours over the same steps")
    ap.add_argument("--skip-hf", action="store_true", help="measure only our model (no transformers needed)")
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (same for both)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the GPU's dense bf16 peak for the MFU figure (H100/H200 SXM: 989)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    ap.add_argument("--seed", type=int, default=0, help="seed for weights and the token batch")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny config, batch 2 x 64, 3+1 steps, CPU unless --device says otherwise; "
                         "no compile unless --compile is given explicitly")
    ap.add_argument("--out", default="bench_llama_train.json", help="JSON file for the results")
    args = ap.parse_args(argv)
    args.compile, args.loss = args.compile.split(","), args.loss.split(",")
    try:
        args.chunk = [int(c) for c in args.chunk.split(",")]
    except ValueError:
        ap.error(f"--chunk: whole numbers, comma-separated (got {args.chunk!r})")
    bad = [m for m in args.compile if m not in ("none", "blocks", "model")]
    if bad:
        ap.error(f"--compile: unknown mode(s) {bad}; choose from none, blocks, model")
    bad = [m for m in args.loss if m not in ("fused", "fused-torch", "full")]
    if bad:
        ap.error(f"--loss: unknown kind(s) {bad}; choose from fused, fused-torch, full")
    if args.smoke:
        args.batch, args.seq, args.steps, args.warmup = 2, 64, 3, 1
        args.config = args.config if args.config in ("tiny", "tiny-qwen2") else "tiny"
        if args.device == "auto":
            args.device = "cpu"
        if not any(a == "--compile" or a.startswith("--compile=") for a in (argv or sys.argv[1:])):
            args.compile = ["none"]
    if args.hf_compile_backend is None:
        args.hf_compile_backend = "aot_eager" if args.smoke and args.device == "cpu" else "inductor"
    return args


def measure(name, model, loss_fn, ids, args, timer, eager_loss_fn=None):
    """Warm up, then time args.steps optimizer steps; returns the result dict.

    eager_loss_fn: if the first (compiling) step fails, report why and go on with this uncompiled loss.
    """
    eager = None if eager_loss_fn is None else (lambda: eager_loss_fn(ids))
    t = time_training(name, model, lambda: loss_fn(ids), args.steps, args.warmup, args.lr, timer,
                      weight_decay=0.1, eager_loss_fn=eager, profile=args.profile)
    dt, losses = t["seconds"], t["losses"]
    tokens = args.batch * args.seq * args.steps
    res = dict(name=name, tokens_per_s=tokens / dt, step_ms=1000 * dt / args.steps, warmup_s=t["warmup_s"],
               peak_mem_gb=timer.peak_bytes() / 1e9, fused_adamw=t["fused_adamw"], first_loss=losses[0],
               last_loss=losses[-1], losses=losses, compile_error=t["compile_error"], profile=t.get("profile"))
    print(f"{name:>20s}: {res['tokens_per_s']:>10,.0f} tokens/s  {res['step_ms']:8.1f} ms/step  "
          f"peak {res['peak_mem_gb']:6.2f} GB  loss {losses[0]:.4f} -> {losses[-1]:.4f}  "
          f"(warm-up {t['warmup_s']:.0f} s)", flush=True)
    return res


def run_ours(cfg, init_state, compile_mode, loss, chunk, ids, args, timer, name, fp8=False):
    with torch.device(ids.device):
        ours = Llama(cfg)
    ours = ours.to(torch.bfloat16)
    ours.load_state_dict(init_state)
    ours.train()
    if fp8:
        from models.fp8 import to_float8_training
        to_float8_training(ours)
    if loss == "fused":
        from kernels.cross_entropy import use_cross_entropy_kernel
        use_cross_entropy_kernel(ours)  # CUDA: the chunks' cross-entropy in one kernel (no-op elsewhere)
    if loss != "full":
        loss_fn = lambda x: ours.loss(x, x, chunk_size=chunk)  # noqa: E731
    else:
        loss_fn = lambda x: ours(x, labels=x)[1]  # noqa: E731
    eager_loss_fn = None
    if compile_mode != "none":
        def eager_loss_fn(x):  # undo the compilation, then the same loss
            for layer in ours.layers:
                layer._compiled_call_impl = None
            ours.__dict__.pop("hidden", None)
            return loss_fn(x)
    # headroom, should dynamo treat each block instance as its own graph (22 > the default limit of 8)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if compile_mode == "blocks":
        for layer in ours.layers:  # one graph, reused by every block (same code, parameters as inputs)
            layer.compile(mode=args.compile_mode)
    elif compile_mode == "model":
        ours.hidden = torch.compile(ours.hidden, mode=args.compile_mode)
    res = measure(name, ours, loss_fn, ids, args, timer, eager_loss_fn=eager_loss_fn)
    res.update(compile=compile_mode, loss=loss, chunk=chunk, fp8=fp8)
    return res


def fp8_against_bf16(results):
    """ours[fp8] against ours (same weights, data and steps): speed, memory and the loss curve's distance."""
    fp8, bf16 = results["ours[fp8]"], results["ours"]
    diffs = [abs(a - b) for a, b in zip(fp8["losses"], bf16["losses"])]
    out = dict(fp8_vs_ours=fp8["tokens_per_s"] / bf16["tokens_per_s"],
               fp8_memory_vs_ours=fp8["peak_mem_gb"] / bf16["peak_mem_gb"],
               fp8_loss_max_abs_diff=max(diffs), fp8_last_loss_rel_diff=diffs[-1] / abs(bf16["losses"][-1]))
    if "transformers_compiled" in results:
        out["fp8_vs_compiled"] = fp8["tokens_per_s"] / results["transformers_compiled"]["tokens_per_s"]
    print(f"ours[fp8] / ours: {out['fp8_vs_ours']:.3f}x tokens/s, memory {out['fp8_memory_vs_ours']:.3f}x; loss curve "
          f"within {out['fp8_loss_max_abs_diff']:.4f} of ours over {len(diffs)} steps (last step "
          f"{out['fp8_last_loss_rel_diff']:.2%})" + (f"; {out['fp8_vs_compiled']:.3f}x transformers compiled"
                                                   if "fp8_vs_compiled" in out else ""), flush=True)
    return out


GOAL_SPEEDUP, GOAL_MEMORY = 1.4, 0.9  # issue #19: >= 1.4x transformers compiled, peak memory <= 0.9x of it



def main(argv=None):
    args = parse_args(argv)
    from utils.runtime import pick_device, setup_precision
    device = pick_device(args.device)
    timer = Timer(device)
    setup_precision(device, "float32")  # TF32 on a GPU; both models run bf16 weights without autocast
    dtype = torch.bfloat16
    cfg = llama_config(args.config, max_seq_len=max(args.seq, llama_config(args.config).max_seq_len))
    torch.manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)

    # one set of initial weights for both, kept on the CPU while the other model runs
    with torch.device(device):
        ours = Llama(cfg).to(dtype)
    init_state = {k: v.cpu() for k, v in ours.state_dict().items()}
    family = decoder_family(cfg)  # llama (Llama-2/3.x, TinyLlama) or qwen2 (q/k/v bias)
    hf_state = {k: v.cpu() for k, v in ours_to_hf(ours, family).items()}
    n_params = ours.num_params()
    flops_per_token = 6 * ours.num_params(exclude_embeddings=True) + 6 * cfg.n_layers * cfg.dim * args.seq
    del ours

    results = {}
    env = dict(device=torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
               torch=torch.__version__, python=platform.python_version())
    print(f"{args.config}: {n_params / 1e6:.1f}M params, batch {args.batch} x {args.seq} tokens, bf16 weights + "
          f"fused AdamW, on {env['device']}", flush=True)

    if not args.skip_hf:
        try:
            import transformers
        except ImportError:
            raise SystemExit("error: transformers is not installed (pip install -r requirements-dev.txt), "
                             "or pass --skip-hf")
        env["transformers"] = transformers.__version__
        hf_config, hf_class = ((transformers.Qwen2Config, transformers.Qwen2ForCausalLM) if family == "qwen2" else
                               (transformers.LlamaConfig, transformers.LlamaForCausalLM))
        to_hf = qwen2_config_to_hf if family == "qwen2" else llama_config_to_hf
        modes = {"off": [False], "eager": [False], "on": [True], "compiled": [True],
                 "both": [False, True]}[args.compile_hf]
        for compiled in modes:
            name = "transformers_compiled" if compiled else "transformers_eager"
            left = timer.reset_memory()
            with torch.device(device):
                hf = hf_class(hf_config(**to_hf(cfg), attn_implementation="sdpa"))
            hf = hf.to(dtype)
            hf.load_state_dict(hf_state, strict=not cfg.tie_embeddings)
            hf.train()
            assert hf.config._attn_implementation == "sdpa", hf.config._attn_implementation
            hf_forward = torch.compile(hf, backend=args.hf_compile_backend) if compiled else hf
            results[name] = measure(name, hf, lambda x: hf_forward(input_ids=x, labels=x, use_cache=False).loss,
                                    ids, args, timer,
                                    eager_loss_fn=(lambda x: hf(input_ids=x, labels=x, use_cache=False).loss)
                                    if compiled else None)
            results[name]["allocated_before_gb"] = left / 1e9
            results[name]["compile_backend"] = args.hf_compile_backend if compiled else None
            del hf, hf_forward

    variants = [(mode, loss, chunk) for mode in args.compile for loss in args.loss for chunk in args.chunk]
    for i, (mode, loss, chunk) in enumerate(variants):
        name = "ours" if i == 0 else f"ours[compile={mode},loss={loss},chunk={chunk}]"  # the first is the headline
        left = timer.reset_memory()
        results[name] = run_ours(cfg, init_state, mode, loss, chunk, ids, args, timer, name)
        results[name]["allocated_before_gb"] = left / 1e9

    if args.fp8:  # the headline's compile mode, loss and chunk, float8 matmuls
        mode, loss, chunk = variants[0]
        left = timer.reset_memory()
        results["ours[fp8]"] = run_ours(cfg, init_state, mode, loss, chunk, ids, args, timer, "ours[fp8]", fp8=True)
        results["ours[fp8]"]["allocated_before_gb"] = left / 1e9

    summary = dict(args=vars(args), env=env, n_params=n_params, flops_per_token=flops_per_token, results=results)
    for r in results.values():
        r["mfu"] = r["tokens_per_s"] * flops_per_token / (args.peak_tflops * 1e12)
    summary.update(compare_to_peers(results, "tokens_per_s", GOAL_SPEEDUP, GOAL_MEMORY, device.startswith("cuda"), mfu=True))
    if args.fp8:
        summary.update(fp8_against_bf16(results))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
