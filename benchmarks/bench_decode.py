"""Decode speed at batch 1: our static KV cache + compiled decode step vs transformers' `generate`.

    python benchmarks/bench_decode.py --out bench_decode.json     # GPU: tinyllama-1.1b shape, bf16
    python benchmarks/bench_decode.py --smoke                     # CPU: tiny configs, checks every path

Both sides get the same random weights (ours exported to LlamaForCausalLM through models/hf_weights.py),
the same prompt (128 random tokens), 256 new tokens (EOS suppressed: min_new_tokens on the HF side, no
EOS check on ours) and the same sampler: temperature 0.8, top-k 50, top-p 0.95. Warm-up runs (compilation,
CUDA-graph capture) are excluded; every timed run is bracketed by a device sync; the median of --repeats
runs is reported. tokens/s counts the new tokens over the whole call (prefill included, as `generate`'s
time includes it); ours also reports decode-only tokens/s (after the prefill).

The floor: every decoded token reads all weights once, so tokens/s <= memory bandwidth / weight bytes
(bandwidth taken from the GPU's name, or --bandwidth-tbs). Also nano Coeus decode tokens/s (recurrent
state, same sampler).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.launch import kernels_by_default, pdl_enabled  # noqa: E402
from models.llama import Llama, llama_config  # noqa: E402
from utils.decoding import CoeusLM, Decoder, LlamaLM, make_step  # noqa: E402
from utils.sampling import SamplerConfig  # noqa: E402

# HBM bandwidth in TB/s by GPU name (vendor data sheets)
BANDWIDTH_TBS = {"H200": 4.8, "H100 SXM": 3.35, "H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "H100": 3.35,
                 "A100-SXM4-80GB": 2.04, "A100 80GB": 1.94, "A100": 1.55, "L40S": 0.864, "RTX 4090": 1.01}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bandwidth_tbs(device, override):
    if override:
        return override
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    for key, bw in BANDWIDTH_TBS.items():
        if key in name:
            return bw
    return None


def weight_bytes(model):
    seen, n = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:  # tied weights once
            seen.add(p.data_ptr())
            n += p.numel() * p.element_size()
    return n


@torch.no_grad()
def time_ours(lm, prompt, new_tokens, sampler, device, compile_mode, warmup, repeats):
    dec = Decoder(lm, sampler).to(device)
    dec.setup(prompt.shape[0], prompt.shape[1] + new_tokens, device)
    step = make_step(dec, device, compile_mode, tune=True)

    def once():
        sync(device)
        t0 = time.perf_counter()
        tok = dec.prefill(prompt)
        sync(device)
        t1 = time.perf_counter()
        pos = torch.tensor([prompt.shape[1]], device=device)
        out = [tok]
        for _ in range(new_tokens - 1):
            tok = step(tok, pos)
            out.append(tok)
            pos += 1
        sync(device)
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1, torch.stack(out, 1)

    t_compile = time.perf_counter()
    for _ in range(warmup):
        once()
    t_compile = time.perf_counter() - t_compile
    runs = [once() for _ in range(repeats)]
    total = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    toks = runs[-1][2]
    # the loop above must be the same computation as generate.py's decode_tokens
    assert toks.shape == (prompt.shape[0], new_tokens)
    from torch._dynamo.utils import counters
    return dict(tokens_per_s=new_tokens / total, decode_tokens_per_s=(new_tokens - 1) / decode,
                total_s=total, prefill_s=total - decode, warmup_s=t_compile, runs_s=[r[0] for r in runs],
                compiled=bool(getattr(step, "is_compiled", lambda: False)()),
                cudagraph_skips=int(counters["inductor"]["cudagraph_skips"]))  # > 0: a graph ran without CUDA graphs


@torch.no_grad()
def time_hf(model, prompt, new_tokens, sampler, device, warmup, repeats):
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM
    from models.hf_weights import llama_config_to_hf, ours_to_hf
    hf_cfg = HFLlamaConfig(**{k: v for k, v in llama_config_to_hf(model.config).items()
                              if k not in ("architectures", "model_type")})
    dtype = model.embed_tokens.weight.dtype
    hf = LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype).eval()
    missing, unexpected = hf.load_state_dict(ours_to_hf(model, "llama"), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"weights did not transfer to LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    ours_logits = model(prompt)[:, -1].float()
    hf_logits = hf(prompt).logits[:, -1].float()
    kw = dict(do_sample=True, temperature=sampler.temperature, top_k=sampler.top_k, top_p=sampler.top_p,
              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
              attention_mask=torch.ones_like(prompt))

    def once():
        sync(device)
        t0 = time.perf_counter()
        out = hf.generate(prompt, **kw)
        sync(device)
        assert out.shape[1] == prompt.shape[1] + new_tokens
        return time.perf_counter() - t0

    for _ in range(warmup):
        once()
    runs = [once() for _ in range(repeats)]
    total = statistics.median(runs)
    del hf
    return dict(tokens_per_s=new_tokens / total, total_s=total, runs_s=runs,
                first_logits_max_abs_diff_vs_ours=float((ours_logits - hf_logits).abs().max()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tinyllama-1.1b", help="models/llama.py config name")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (random ids)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per run")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="weights dtype")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda:N")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="compile our decode step (auto: CUDA graphs on CUDA, eager on CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (compilation, graph capture)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    p.add_argument("--skip-hf", action="store_true", help="skip transformers' generate")
    p.add_argument("--coeus-config", default="nano", help="Coeus config for its decode figure ('' to skip)")
    p.add_argument("--bandwidth-tbs", type=float, default=None, help="memory bandwidth for the floor (TB/s)")
    p.add_argument("--no-fuse", action="store_true",
                   help="keep q/k/v and gate/up as separate matmuls (default: fused for decoding)")
    p.add_argument("--gemv", default="auto", choices=["auto", "on", "off", "both"],
                   help="one-row matmuls through kernels/gemv.py's Triton kernel (auto: on CUDA with Triton); both: "
                        "time without it first, then with it, in the same run")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights, prompt and sampling")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny configs on CPU, 1 repeat: checks the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.config, args.prompt_len, args.new_tokens, args.dtype = "tiny", 16, 12, "float32"
        args.warmup, args.repeats = 1, 1
        args.coeus_config = "tiny" if args.coeus_config else ""
        args.device = "cpu" if args.device == "auto" else args.device
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    sampler = SamplerConfig(temperature=0.8, top_k=50, top_p=0.95)
    torch.manual_seed(args.seed)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True

    cfg = llama_config(args.config)
    model = Llama(cfg).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), device=device)
    wbytes = weight_bytes(model)
    bw = bandwidth_tbs(device, args.bandwidth_tbs)
    res = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "config": args.config, "dtype": args.dtype, "batch": 1,
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "sampler": sampler.to_dict(),
           "params": model.num_params(), "weight_bytes": wbytes,
           "bandwidth_tbs": bw, "floor_tokens_per_s": bw * 1e12 / wbytes if bw else None}
    print(f"{args.config} {args.dtype} on {res['device']}: {res['params'] / 1e6:.1f}M params, "
          f"{wbytes / 1e9:.2f} GB of weights" + (f", bandwidth floor {res['floor_tokens_per_s']:.0f} tokens/s"
                                                  if bw else ""), flush=True)
    # transformers first: ours then fuses the projections in place (no longer exportable)
    if not args.skip_hf:
        import transformers
        res["transformers_version"] = transformers.__version__
        torch.manual_seed(args.seed)
        res["hf_generate"] = time_hf(model, prompt, args.new_tokens, sampler, device, args.warmup, args.repeats)
        print(f"transformers generate: {res['hf_generate']['tokens_per_s']:.1f} tokens/s (first-token logits "
              f"max |diff| vs ours {res['hf_generate']['first_logits_max_abs_diff_vs_ours']:.3g})", flush=True)
    res["fused_projections"] = not args.no_fuse
    gemv = args.gemv
    if gemv == "auto":
        gemv = "on" if kernels_by_default(device) else "off"
    for key, with_gemv in ([("ours_no_gemv", False), ("ours", True)] if gemv == "both" else [("ours", gemv == "on")]):
        torch.manual_seed(args.seed)
        t = time.perf_counter()
        lm = LlamaLM(model, fuse=not args.no_fuse, gemv=with_gemv)
        res[key] = {"gemv": with_gemv, "gemv_tune_s": time.perf_counter() - t,
                    "gemv_configs": lm.gemv_report or {},
                    "programmatic_dependent_launch": with_gemv and pdl_enabled(device),
                    **time_ours(lm, prompt, args.new_tokens, sampler, device, args.compile, args.warmup, args.repeats)}
        r = res[key]
        print(f"{key} (static KV cache, decode kernels {with_gemv}, PDL {r['programmatic_dependent_launch']}, "
              f"compiled={r['compiled']}, cudagraph skips "
              f"{r['cudagraph_skips']}): {r['tokens_per_s']:.1f} tokens/s ({r['decode_tokens_per_s']:.1f} "
              f"decode-only)", flush=True)
    if "ours_no_gemv" in res:
        res["gemv_speedup"] = res["ours"]["decode_tokens_per_s"] / res["ours_no_gemv"]["decode_tokens_per_s"]
        print(f"decode kernels: {res['gemv_speedup']:.3f}x decode tokens/s", flush=True)
    if "hf_generate" in res:
        res["speedup_vs_hf"] = res["ours"]["tokens_per_s"] / res["hf_generate"]["tokens_per_s"]
        print(f"ours / transformers: {res['speedup_vs_hf']:.1f}x", flush=True)
    if res["floor_tokens_per_s"]:
        res["fraction_of_floor"] = res["ours"]["decode_tokens_per_s"] / res["floor_tokens_per_s"]
    del model
    if args.coeus_config:
        try:
            from models.coeus import Coeus, coeus_config
        except ImportError as e:
            res["coeus"] = f"skipped: {e}"
        else:
            torch.manual_seed(args.seed)
            ccfg = coeus_config(args.coeus_config)
            coeus = Coeus(ccfg).to(device=device, dtype=dtype).eval()
            cprompt = torch.randint(0, ccfg.vocab_size, (1, args.prompt_len), device=device)
            res["coeus"] = {"config": args.coeus_config, "params": coeus.num_params(),
                            **time_ours(CoeusLM(coeus), cprompt, args.new_tokens, sampler, device, args.compile,
                                        args.warmup, args.repeats)}
            print(f"coeus {args.coeus_config}: {res['coeus']['tokens_per_s']:.1f} tokens/s "
                  f"({res['coeus']['decode_tokens_per_s']:.1f} decode-only)", flush=True)
    if device.startswith("cuda"):
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
