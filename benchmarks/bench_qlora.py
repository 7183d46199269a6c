"""QLoRA and LoRA fine-tuning of an 8B-class LLaVA: our models/lora.py + models/nf4.py vs transformers + peft +
bitsandbytes, on the same configuration, each in a fresh process of its own (issue #18's benchmark).

    # one H100/H200: Llama-3-8B-shaped decoder + CLIP-ViT-L/336, random weights, r 64 on every decoder Linear
    python benchmarks/bench_qlora.py --out bench_qlora.json
    python benchmarks/bench_qlora.py --variants ours-qlora,peft-qlora           # QLoRA only
    python benchmarks/bench_qlora.py --smoke --out /tmp/bench_qlora_smoke.json  # CPU, tiny configs, seconds

Configuration (the first design that ran out of memory): decoder 32 layers, d 4096, 32 heads / 8 KV heads, FFN
14336, vocab 128256 (llama3-8b) + CLIP-ViT-L/14-336 (576 image tokens), batch 2 x (576 + 128) tokens, labels on
the 128 text tokens. Vision tower frozen in bf16; projector trained in full (fp32 master weights); adapters r 64,
alpha 16, dropout 0.05 on q,k,v,o,gate,up,down of every decoder layer (fp32); the rest of the decoder frozen in
bf16 (QLoRA: its Linears in NF4, block 64, double-quantised absmax; the head stays bf16, as bitsandbytes leaves
it); bf16 autocast; gradient checkpointing of the decoder layers; AdamW (fused) on the trainable parameters.

  ours-qlora / ours-lora   models.llava.LlavaModel, utils.adapters' spec (4-bit base in models/nf4.py, the Triton
                           dequantise of kernels/nf4.py on CUDA), LlavaModel.loss (head + CE on learned rows only),
                           each decoder block torch.compile'd (--no-compile: eager). The step is host-bound at
                           this batch when eager (a profile, --profile, shows the GPU busy ~half the step).
  peft-qlora / peft-lora   transformers' LlavaForConditionalGeneration (sdpa) with bitsandbytes' Linear4bit
                           (quant_type nf4, compress_statistics, blocksize 64, compute bf16) in place of the decoder's
                           Linears, peft.get_peft_model(LoraConfig(..., modules_to_save=["multi_modal_projector"])),
                           gradient_checkpointing_enable(use_reentrant=False), model(..., labels=...).loss. Not
                           prepare_model_for_kbit_training: it casts every non-4-bit weight to fp32 (more memory).

Weights are random (N(0, 0.02), norms 1) and made layer by layer on the GPU, so neither side ever holds the dense
bf16 decoder of a QLoRA run. Measured per variant: peak torch.cuda.max_memory_allocated over the training steps
(weights included: the peak is reset after the build, whose temporaries are not part of a step), samples/s over
--steps timed steps after --warmup ones. Ratios are ours / peft of the same mode in this run.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_common import Timer, profile_step  # noqa: E402
from models.llama import llama_config  # noqa: E402
from models.llava import LlavaConfig, LlavaModel  # noqa: E402
from models.siglip import SIGLIP_CONFIGS, siglip_config  # noqa: E402
from models.vit import vision_config  # noqa: E402

VARIANTS = ("ours-qlora", "peft-qlora", "ours-lora", "peft-lora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--llm", default="llama3-8b", help="decoder config (models/llama.py LLAMA_CONFIGS)")
    ap.add_argument("--vision", default="clip-vit-l-336", help="vision config: models/vit.py VISION_CONFIGS or "
                    "models/siglip.py SIGLIP_CONFIGS (siglip-so400m-384: 729 image tokens)")
    ap.add_argument("--batch", type=int, default=2, help="samples per step, one image each")
    ap.add_argument("--text-tokens", type=int, default=128, help="text tokens per sample after the image tokens")
    ap.add_argument("--r", type=int, default=64, help="LoRA rank")
    ap.add_argument("--alpha", type=float, default=16, help="LoRA alpha")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="leave OUR decoder blocks eager "
                    "(default: each torch.compile'd, as train_vqa.py --compile; its compile time is in warmup_s)")
    ap.add_argument("--no-grad-checkpointing", action="store_true", help="keep activations (both sides)")
    ap.add_argument("--profile", action="store_true", help="after timing, profile one step per variant and print "
                    "its 15 costliest GPU kernels and the GPU time by kind (where the time goes)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per variant's process")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny configs, 2 + 1 steps, on the CPU unless --device")
    ap.add_argument("--out", default="bench_qlora.json", help="JSON file for the results")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one variant, in this process
    args = ap.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown --variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.smoke:
        args.llm, args.vision, args.batch, args.text_tokens, args.r = "tiny", "tiny", 2, 16, 4
        args.steps, args.warmup, args.compile = 2, 1, False
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    return args


# --- random weights, made where they are used ----------------------------------------------------------------

@torch.no_grad()
def materialize_(model, device, dtype, skip=()):
    """Real storage on device for every meta parameter / buffer of model (modules of the types in skip excepted):
    1-D weights of norms 1, other 1-D tensors 0, matrices N(0, 0.02); position-id buffers 0..n-1."""
    g = torch.Generator(device=device).manual_seed(0)
    for mod_name, m in model.named_modules():
        if isinstance(m, skip):
            continue
        for name, p in list(m.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            t = torch.empty(p.shape, device=device, dtype=dtype)
            if p.dim() >= 2:
                t.normal_(0, 0.02, generator=g)
            else:
                t.fill_(1.0 if "norm" in type(m).__name__.lower() and name == "weight" else 0.0)
            setattr(m, name, nn.Parameter(t, requires_grad=p.requires_grad))
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.is_meta:
                t = torch.arange(b.numel(), device=device).view(b.shape).to(b.dtype) if "position" in name else \
                    torch.zeros(b.shape, device=device, dtype=b.dtype)
                m._buffers[name] = t


def random_weight(out_f, in_f, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16, generator=g) * 0.02


def make_batch(n_image, vocab, image_id, args, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab - 2, (args.batch, n_image + args.text_tokens), generator=g)
    ids[:, :n_image] = image_id
    labels = ids.clone()
    labels[:, :n_image] = -100
    return ids.to(device), labels.to(device)


def our_config(args):
    text = llama_config(args.llm)
    vision = siglip_config(args.vision) if args.vision in SIGLIP_CONFIGS else vision_config(args.vision)
    return LlavaConfig(vision=vision, text=text, image_token_id=text.vocab_size - 1)


# --- the two sides --------------------------------------------------------------------------------------------

def build_ours(args, qlora, device):
    from models.lora import format_report, lora_report
    from models.nf4 import Linear4bit, load_quantized_
    from utils.adapters import apply_lora_spec
    cfg = our_config(args)
    with torch.device("meta"):
        model = LlavaModel(cfg)
    spec = dict(r=args.r, alpha=args.alpha, dropout=0.05, targets=",".join(LORA_TARGETS), rslora=False, qlora=qlora,
                blocksize=64, double_quant=True, compute_dtype="bfloat16")
    if qlora:  # 4-bit modules on meta first, then each filled from a freshly made bf16 weight (one at a time)
        from utils.adapters import quantize_base
        quantize_base(model, spec)
        for i, m in enumerate(x for x in model.modules() if isinstance(x, Linear4bit)):
            load_quantized_(m, random_weight(m.out_features, m.in_features, device, i), device=device)
        if device.startswith("cuda"):
            from kernels.nf4 import use_nf4_kernels
            use_nf4_kernels(model)
    materialize_(model, device, torch.bfloat16, skip=(Linear4bit,))
    apply_lora_spec(model, dict(spec, qlora=False), train_modules=("projector",))  # already 4-bit where wanted
    for p in model.parameters():
        if p.requires_grad:  # adapters and projector: fp32 master weights, as peft keeps its adapters
            p.data = p.data.float()
    model.language_model.gradient_checkpointing = not args.no_grad_checkpointing
    if args.compile:
        from utils.runtime import CompiledBlocks
        CompiledBlocks(model.language_model.layers, what="our decoder blocks")
    print(format_report(lora_report(model)), flush=True)
    n_image = model.num_image_tokens
    ids, labels = make_batch(n_image, cfg.text.vocab_size, cfg.image_token_id, args, device)
    px = torch.randn(args.batch, 3, cfg.vision.image_size, cfg.vision.image_size, device=device, dtype=torch.bfloat16)
    return model, lambda: model.loss(ids, px, labels)


def hf_config(args):
    import transformers
    from models.hf_weights import llava_config_to_hf
    c = llava_config_to_hf(our_config(args))
    return transformers.LlavaConfig(**{k: v for k, v in c.items() if k not in ("architectures", "model_type")})


def build_peft(args, qlora, device):
    import peft
    import transformers
    cfg = hf_config(args)
    with torch.device("meta"):
        hf = transformers.LlavaForConditionalGeneration(cfg)
    lm = hf.model.language_model
    skip = ()
    if qlora:
        import bitsandbytes as bnb
        skip = (bnb.nn.Linear4bit,)
        linears = [(n, m) for n, m in lm.named_modules() if isinstance(m, nn.Linear)]
        for i, (name, m) in enumerate(linears):
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta")
            w = random_weight(m.out_features, m.in_features, device, i)
            q.weight = bnb.nn.Params4bit(w.cpu() if device == "cpu" else w, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64).to(device)
            parent, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent) if parent else lm, child, q)
    materialize_(hf, device, torch.bfloat16, skip=skip)
    rotary = lm.rotary_emb  # its inv_freq was made on meta: rebuild it for real
    with torch.device(device):
        lm.rotary_emb = type(rotary)(config=cfg.text_config)
    hf.config.use_cache = False
    if not args.no_grad_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pcfg = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                           target_modules=rf".*language_model\..*\.({'|'.join(LORA_TARGETS)})",
                           modules_to_save=["multi_modal_projector"])
    pm = peft.get_peft_model(hf, pcfg)
    for p in pm.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    pm.train()
    n_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    ids, labels = make_batch(n_image, cfg.text_config.vocab_size, cfg.image_token_id, args, device)
    size = cfg.vision_config.image_size
    px = torch.randn(args.batch, 3, size, size, device=device, dtype=torch.bfloat16)
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    print(f"peft: trainable {trainable:,} parameters", flush=True)
    return pm, lambda: pm(input_ids=ids, pixel_values=px, labels=labels).loss


def run_variant(args):
    """Build one variant, train --warmup + --steps steps; returns its figures."""
    side, mode = args.worker.split("-")
    device = args.device
    cuda = device.startswith("cuda")
    t0 = time.perf_counter()
    model, loss_fn = (build_ours if side == "ours" else build_peft)(args, mode == "qlora", device)
    build_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        build_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16)
    losses = []

    def step():
        with autocast:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    profiled = profile_step(step, Timer("cuda" if cuda else "cpu")) if args.profile else None
    res = dict(variant=args.worker, samples_per_s=args.batch * args.steps / dt, step_ms=1000 * dt / args.steps,
               trainable=sum(p.numel() for p in params), build_s=build_s, warmup_s=warmup_s, losses=losses,
               profile=profiled)
    if cuda:
        res.update(peak_gb=torch.cuda.max_memory_allocated() / 1e9, build_peak_gb=build_peak / 1e9)
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    results = {}
    for v in args.variants.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", v]
        print(f"--- {v}", flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            if args.profile:
                print(p.stdout, flush=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if line:
                results[v] = json.loads(line[-1][len("RESULT "):])
            else:
                tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
                results[v] = dict(variant=v, error=" | ".join(tail))
        except subprocess.TimeoutExpired:
            results[v] = dict(variant=v, error=f"timed out after {args.timeout} s")
        r = results[v]
        print("    " + (f"{r['samples_per_s']:.2f} samples/s, {r['step_ms']:.0f} ms/step"
                        + (f", peak {r['peak_gb']:.2f} GB" if "peak_gb" in r else "") if "error" not in r
                        else f"error: {r['error']}"), flush=True)
    for mode in ("qlora", "lora"):
        a, b = results.get(f"ours-{mode}", {}), results.get(f"peft-{mode}", {})
        if "samples_per_s" in a and "samples_per_s" in b:
            results[f"{mode}_speedup"] = a["samples_per_s"] / b["samples_per_s"]
            if "peak_gb" in a and "peak_gb" in b:
                results[f"{mode}_memory_ratio"] = a["peak_gb"] / b["peak_gb"]
            print(f"{mode}: ours {results[f'{mode}_speedup']:.2f}x peft's samples/s"
                  + (f", {results[f'{mode}_memory_ratio']:.2f}x its memory" if f"{mode}_memory_ratio" in results
                     else ""), flush=True)
    if "peak_gb" in results.get("ours-qlora", {}):
        results["qlora_fits_14gb"] = results["ours-qlora"]["peak_gb"] <= 14.0
    results["config"] = dict(llm=args.llm, vision=args.vision, batch=args.batch, text_tokens=args.text_tokens,
                             r=args.r, alpha=args.alpha, steps=args.steps, warmup=args.warmup, compile=args.compile,
                             grad_checkpointing=not args.no_grad_checkpointing, device=args.device,
                             gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                             torch=torch.__version__)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
