"""Training throughput and peak memory of our LLaVA (models/llava.py) vs transformers' LlavaForConditionalGeneration,
side by side in one run: the seed configuration of train_vqa.py.

    # the issue's benchmark (one H100/H200): CLIP-ViT-L/14-336 + TinyLlama-1.1B, full fine-tuning, bf16,
    # batch 8, 576 image + 128 text tokens, random weights; transformers eager and compiled (--compile-hf both)
    python benchmarks/bench_vqa_train.py --out bench_vqa_train.json
    # ablations: no torch.compile; full-logits loss as transformers computes it
    python benchmarks/bench_vqa_train.py --compile none --loss full --out bench_vqa_eager.json
    # CPU smoke test of the whole path on tiny configs (seconds)
    python benchmarks/bench_vqa_train.py --smoke --out /tmp/bench_vqa_smoke.json

Precision recipe, identical for both: every weight, gradient and AdamW state in bf16 (model.to(torch.bfloat16),
torch.optim.AdamW(fused=True) on the bf16 parameters), no autocast, no fp32 master weights; the whole model
trains (ViT, projector, decoder). Both start from the SAME weights (transformers' random init, mapped into
ours through models/hf_weights.py) and train on the same random batch, so their first-step losses must agree.

Batch: 8 samples of [<s>, 576 image placeholders, 127 text tokens] = 704 tokens and one 336x336 image each;
labels are the text tokens (image positions and <s> are -100), as in LLaVA's fine-tuning.
What differs is only the model code:
  transformers: LlavaForConditionalGeneration(attn_implementation="sdpa"), model(input_ids, pixel_values,
                labels=...).loss: all 24 ViT layers run (hidden states kept), logits for all 704 positions;
                measured eagerly (results "transformers_eager") and under torch.compile of the whole model
                ("transformers_compiled", the strongest peer: "speedup" and "goal_met" are against it).
  ours:         LlavaModel: the ViT stops at its feature layer (-2: 23 blocks), the loss is LlavaModel.loss
                (head + cross-entropy only on the 127 learned positions per sample, chunked: no logits tensor),
                and torch.compile of each ViT and decoder block (--compile blocks, the default).
Measured: samples/s over --steps timed optimizer steps after --warmup untimed ones (compilation happens there),
torch.cuda.synchronize at the window's ends; peak memory = torch.cuda.max_memory_allocated during the model's
training (reset after the model is built), the other model freed first.
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
from models.hf_weights import hf_to_ours, llava_config_to_hf  # noqa: E402
from models.llama import llama_config  # noqa: E402
from models.llava import LlavaConfig, LlavaModel  # noqa: E402
from models.vit import vision_config  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vision", default="clip-vit-l-336", help="vision config (models/vit.py VISION_CONFIGS)")
    ap.add_argument("--llm", default="tinyllama-1.1b", help="decoder config (models/llama.py LLAMA_CONFIGS)")
    ap.add_argument("--vocab", type=int, default=32064, help="decoder vocabulary (llava-1.5: 32000 + <image> + "
                    "padding to 32064)")
    ap.add_argument("--batch", type=int, default=8, help="samples per step, one image each")
    ap.add_argument("--text-tokens", type=int, default=128, help="text tokens per sample (incl. <s>)")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per model")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator warm-up)")
    ap.add_argument("--compile", default="blocks",
                    help="torch.compile for OUR model: blocks (each ViT and decoder block), vision (the vision tower as "
                         "one graph, each decoder block) or none; a comma list measures each in turn (the first is "
                         "the headline)")
    ap.add_argument("--loss", choices=["answer", "full"], default="answer",
                    help="OUR loss: head + CE on the learned positions only (chunked), or full logits as transformers")
    add_transformers_args(ap)
    add_profile_arg(ap)
    ap.add_argument("--skip-hf", action="store_true", help="measure only our model")
    ap.add_argument("--isolate", choices=["auto", "on", "off"], default="auto",
                    help="measure each model in a fresh process of its own (auto: on a GPU), so neither inherits "
                         "the other's allocator state, compiled graphs or a warm GPU")
    ap.add_argument("--side", choices=["both", "transformers", "transformers_eager", "transformers_compiled", "ours"],
                    default="both", help="which model(s) this process measures (--isolate runs one process per "
                                         "side; transformers: the --compile-hf rows)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks (both models)")
    ap.add_argument("--ce-kernel", choices=["on", "off"], default="on",
                    help="OUR fused loss's cross-entropy: the Triton kernel on CUDA (kernels/cross_entropy.py, on) or "
                         "the PyTorch chunks (off)")
    ap.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (same for both)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    ap.add_argument("--seed", type=int, default=0, help="seed for the weights and the batch")
    ap.add_argument("--smoke", action="store_true", help="tiny configs, batch 2, 2+1 steps, CPU unless --device; "
                    "no compile unless --compile is given")
    ap.add_argument("--out", default="bench_vqa_train.json", help="JSON file for the results")
    args = ap.parse_args(argv)
    if args.smoke:
        args.vision, args.llm, args.vocab, args.batch, args.text_tokens = "tiny", "tiny", 512, 2, 16
        args.steps, args.warmup = 2, 1
        if args.device == "auto":
            args.device = "cpu"
        if not any(a == "--compile" or a.startswith("--compile=") for a in (argv if argv is not None else sys.argv[1:])):
            args.compile = "none"
    args.compile = args.compile.split(",")
    bad = [m for m in args.compile if m not in ("none", "blocks", "vision")]
    if bad:
        ap.error(f"--compile: unknown mode(s) {bad}; choose from none, blocks, vision")
    if args.hf_compile_backend is None:
        args.hf_compile_backend = "aot_eager" if args.smoke and args.device == "cpu" else "inductor"
    return args


def hf_sides(args):
    """The transformers rows this run measures, by --compile-hf and --side."""
    rows = {"off": ["transformers_eager"], "eager": ["transformers_eager"], "on": ["transformers_compiled"],
            "compiled": ["transformers_compiled"], "both": ["transformers_eager", "transformers_compiled"]}
    if args.skip_hf or args.side == "ours":
        return []
    return [args.side] if args.side.startswith("transformers_") else rows[args.compile_hf]


def make_batch(cfg, n_image, args, device):
    g = torch.Generator().manual_seed(args.seed + 1)
    B, T = args.batch, 1 + n_image + args.text_tokens - 1
    ids = torch.randint(3, 32000 if cfg.text.vocab_size > 32000 else cfg.text.vocab_size - 2, (B, T), generator=g)
    ids[:, 0] = 1
    ids[:, 1:1 + n_image] = cfg.image_token_id
    labels = ids.clone()
    labels[:, :1 + n_image] = -100
    size = cfg.vision.image_size
    pixels = torch.randn(B, 3, size, size, generator=g)
    return ids.to(device), labels.to(device), pixels.to(device=device, dtype=torch.bfloat16)


def measure(name, model, loss_fn, args, timer, eager_loss_fn=None):
    t = time_training(name, model, loss_fn, args.steps, args.warmup, args.lr, timer, eager_loss_fn=eager_loss_fn,
                      profile=args.profile)
    dt, losses = t["seconds"], t["losses"]
    res = dict(name=name, samples_per_s=args.batch * args.steps / dt, step_ms=1000 * dt / args.steps,
               warmup_s=t["warmup_s"], peak_mem_gb=timer.peak_bytes() / 1e9, fused_adamw=t["fused_adamw"],
               first_loss=losses[0], last_loss=losses[-1], compile_error=t["compile_error"],
               profile=t.get("profile"))
    print(f"{name:>21s}: {res['samples_per_s']:8.1f} samples/s  {res['step_ms']:8.1f} ms/step  "
          f"peak {res['peak_mem_gb']:6.2f} GB  loss {losses[0]:.4f} -> {losses[-1]:.4f}  "
          f"(warm-up {t['warmup_s']:.0f} s)", flush=True)
    return res


def run_ours(cfg, state, mode, ids, labels, pixels, args, timer, name, device, dtype):
    with torch.device(device):
        ours = LlavaModel(cfg).to(dtype)
    ours.load_state_dict(state)
    ours.train()
    if args.ce_kernel == "on":
        from utils.runtime import use_kernels
        use_kernels(ours)
    if args.grad_checkpointing:
        ours.language_model.gradient_checkpointing = ours.vision_tower.gradient_checkpointing = True
    tower = ours.vision_tower
    blocks = [*tower.blocks, *ours.language_model.layers]
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if mode == "blocks":
        for b in blocks:
            b.compile()
    elif mode == "vision":  # one graph for the tower (23 small blocks: far fewer launches from Python), blocks after
        tower.features = torch.compile(tower.features)
        for b in ours.language_model.layers:
            b.compile()
    if args.loss == "answer":
        loss_fn = lambda: ours.loss(ids, pixels, labels)  # noqa: E731
    else:
        loss_fn = lambda: ours(ids, pixels, labels=labels)[1]  # noqa: E731

    def eager_loss_fn():
        for b in blocks:
            b._compiled_call_impl = None
        tower.__dict__.pop("features", None)
        torch._dynamo.reset()
        return loss_fn()
    timer.reset_memory() if not timer.cuda else torch.cuda.reset_peak_memory_stats()
    res = measure(name, ours, loss_fn, args, timer, eager_loss_fn=eager_loss_fn if mode != "none" else None)
    res["compile"] = mode
    return res


def run_isolated(args, argv):
    """One fresh process per model (same seeds, so the same weights and batch); returns their results."""
    import subprocess
    import tempfile
    argv = list(sys.argv[1:] if argv is None else argv)
    results, env = {}, None
    sides = hf_sides(args) + ["ours"]
    with tempfile.TemporaryDirectory() as tmp:
        for side in sides:
            out = os.path.join(tmp, side + ".json")
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--isolate", "off", "--side", side, "--out", out]
            subprocess.run(cmd, check=True)
            with open(out) as f:
                part = json.load(f)
            results.update(part["results"])
            env, n_params = part["env"], part["n_params"]
    return env, n_params, results


def main(argv=None):
    args = parse_args(argv)
    from utils.runtime import pick_device, setup_precision
    device = pick_device(args.device)
    if args.isolate == "on" or (args.isolate == "auto" and device.startswith("cuda") and args.side == "both"):
        env, n_params, results = run_isolated(args, argv)
        return summarize(args, env, n_params, results, cuda=device.startswith("cuda"))
    timer = Timer(device)
    setup_precision(device, "float32")  # TF32 on a GPU; both models run bf16 weights without autocast
    dtype = torch.bfloat16
    text = llama_config(args.llm, vocab_size=args.vocab)
    image_token_id = 32000 if args.vocab > 32000 else args.vocab - 1
    cfg = LlavaConfig(vision=vision_config(args.vision), text=text, image_token_id=image_token_id, feature_layer=-2)
    text.max_seq_len = max(text.max_seq_len, cfg.vision.num_patches + args.text_tokens)

    import transformers
    env = dict(device=torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
               torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version())
    hf_cfg = transformers.LlavaConfig(**{k: v for k, v in llava_config_to_hf(cfg).items() if k != "architectures"})
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg.text_config._attn_implementation = "sdpa"
    hf_cfg.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    hf = transformers.LlavaForConditionalGeneration(hf_cfg)  # fp32 random init on the CPU, the weights of both
    hf_state = {k: v.to(dtype) for k, v in hf.state_dict().items()}
    with torch.device("meta"):
        ours_meta = LlavaModel(cfg)
    our_state = hf_to_ours(ours_meta, "llava", hf_state, source="transformers' LlavaForConditionalGeneration")
    del ours_meta
    n_params = sum(p.numel() for p in hf.parameters())
    n_image = cfg.vision.num_patches
    ids, labels, pixels = make_batch(cfg, n_image, args, device)
    print(f"{args.vision} + {args.llm}: {n_params / 1e6:.1f}M params; batch {args.batch} x ({n_image} image + "
          f"{args.text_tokens} text tokens), bf16 weights + fused AdamW, full fine-tuning, on {env['device']}",
          flush=True)
    results = {}

    for i, name in enumerate(hf_sides(args)):
        compiled = name == "transformers_compiled"
        if i == 0:
            hf = hf.to(device=device, dtype=dtype).train()
            if args.grad_checkpointing:
                hf.gradient_checkpointing_enable()
        else:  # the weights the row before trained: back to the shared initial ones
            hf.load_state_dict(hf_state)
        timer.reset_memory()
        hf_fwd = torch.compile(hf, backend=args.hf_compile_backend) if compiled else hf
        results[name] = measure(
            name, hf, lambda: hf_fwd(input_ids=ids, pixel_values=pixels, labels=labels, use_cache=False).loss,
            args, timer, eager_loss_fn=(lambda: hf(input_ids=ids, pixel_values=pixels, labels=labels,
                                                   use_cache=False).loss) if compiled else None)
        results[name]["compile_backend"] = args.hf_compile_backend if compiled else None
        del hf_fwd
    del hf
    left = timer.reset_memory()
    if args.side.startswith("transformers"):
        return summarize(args, env, n_params, results, cuda=timer.cuda)

    del hf_state
    for i, mode in enumerate(args.compile):
        name = "ours" if i == 0 else f"ours[compile={mode}]"  # the first mode is the headline figure
        if i:
            left = timer.reset_memory()
        results[name] = run_ours(cfg, our_state, mode, ids, labels, pixels, args, timer, name, device, dtype)
        results[name]["allocated_before_gb"] = left / 1e9
    return summarize(args, env, n_params, results, cuda=timer.cuda)


GOAL_SPEEDUP, GOAL_MEMORY = 1.3, 0.9  # issue #19: >= 1.3x transformers compiled, peak memory <= 0.9x of it



def summarize(args, env, n_params, results, cuda):
    summary = dict(args=vars(args), env=env, n_params=n_params, results=results)
    if "ours" in results:
        summary.update(compare_to_peers(results, "samples_per_s", GOAL_SPEEDUP, GOAL_MEMORY, cuda))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
