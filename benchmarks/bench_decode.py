"""Decode speed at batch 1: our static KV cache + compiled decode step vs transformers' `generate`, measured
against the strongest way transformers runs and against the memory-bandwidth floor, all in one run.

    python benchmarks/bench_decode.py --out bench_decode.json     # GPU: tinyllama-1.1b shape, bf16 (< 3 min)
    python benchmarks/bench_decode.py --smoke                     # CPU: tiny configs, checks every path

Compared, on the same random weights (ours exported to LlamaForCausalLM through models/hf_weights.py), the
same prompt (128 random tokens) and 256 new tokens (EOS suppressed: min_new_tokens on the HF side, no EOS
check on ours):
  hf_static_compiled  transformers' generate(..., cache_implementation="static") with model.forward =
                      torch.compile(model.forward, mode="reduce-overhead", fullgraph=True), as transformers
                      documents for a static cache (generate's own auto-compile then off: --hf-static-compile
                      auto uses that instead); greedy and sampled. The peer the headline ratios are against.
  hf_eager_dynamic    transformers' default: generate() eagerly with its DynamicCache; greedy and sampled.
  ours                static KV cache, the decode step compiled (CUDA graphs), kernels/ GEMVs; sampled.
Sampled = temperature 0.8, top-k 50, top-p 0.95, on both sides. Warm-up runs (compilation, CUDA-graph
capture) are excluded; every timed run is bracketed by a device sync; the median of --repeats runs is
reported. tokens/s counts the new tokens over the whole call (prefill included, as `generate`'s time
includes it); ours also reports decode-only tokens/s (after the prefill).

The floor: a decoded token reads every weight but the embedding table once, and the KV cache so far, so
tokens/s <= bandwidth / bytes read a token; the bandwidth is measured in this run (a large device-to-device
copy: bytes read + written over its time), not taken from a data sheet (--bandwidth-tbs overrides it).
Start-up: startup_s is ours from the model to the end of its first (warm-up) run: GEMV tuning (or its disk
cache, or the tiles shipped for this GPU in kernels/gemv_tuned.json; KERNELS_SHIPPED=off times them), compilation of
the step's kernels, prefill and glue, CUDA-graph capture; wall_s is the whole run.
Inductor's coordinate-descent tuning is off unless --coordinate-descent (it cost > 200 s of compilation).
Also a float32 prefill-with-KV-cache check (models/llama.py's grouped-query path, on the device: it crashed on
CUDA) and nano Coeus decode tokens/s.
"""
import time  # noqa: E402 - the clock first

T_START = time.perf_counter()  # wall_s counts from here (the imports included)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import gemv as kernels_gemv, tune_cache  # noqa: E402
from kernels.launch import kernels_by_default, pdl_enabled  # noqa: E402
from models.llama import Llama, llama_config  # noqa: E402
from utils.decoding import PREFILL_MODES, STEP_MODES, CoeusLM, Decoder, LlamaLM, make_step  # noqa: E402
from utils.sampling import SamplerConfig  # noqa: E402

# HBM bandwidth in TB/s by GPU name (vendor data sheets): printed beside the measured one, for reference only
BANDWIDTH_TBS = {"H200": 4.8, "H100 SXM": 3.35, "H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "H100": 3.35,
                 "A100-SXM4-80GB": 2.04, "A100 80GB": 1.94, "A100": 1.55, "L40S": 0.864, "RTX 4090": 1.01}
SAMPLED = SamplerConfig(temperature=0.8, top_k=50, top_p=0.95)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def datasheet_tbs(device):
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in BANDWIDTH_TBS.items() if key in name), None)


def measure_bandwidth(device, nbytes, reps=20):
    """Device memory bandwidth in TB/s: the best of reps copies of an nbytes buffer into another (each reads
    nbytes and writes nbytes), timed with CUDA events (CPU: the clock)."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * n * 4 / min(times) / 1e12


def bytes_read_per_token(model, context_len):
    """What one decoded token must read: every weight except the embedding table (one row of it; with tied
    embeddings the table is the head and is read whole), plus the K and V cache of context_len positions."""
    seen, n = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:  # tied weights once
            seen.add(p.data_ptr())
            n += p.numel() * p.element_size()
    emb = model.embed_tokens.weight
    if not model.config.tie_embeddings:
        n -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    cfg = model.config
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * context_len * emb.element_size()
    return n, kv


def weight_bytes(model):
    seen, n = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel() * p.element_size()
    return n


@torch.no_grad()
def fp32_prefill_with_cache_check(config_name, prompt_len, device, n_layers=2):
    """models/llama.py's prefill through the KV cache (the grouped-query SDPA path with a mask) in float32 on
    device, against the same model without a cache. It used to crash on CUDA in float32 (a .view of a
    non-contiguous SDPA output). TF32 off for the comparison."""
    cfg = llama_config(config_name, n_layers=min(n_layers, llama_config(config_name).n_layers))
    torch.manual_seed(0)
    model = Llama(cfg).to(device=device, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = model(ids)
        model.setup_cache(1, prompt_len + 8)
        out = model(ids, input_pos=torch.arange(prompt_len, device=device))
        err = float((out - ref).abs().max() / ref.abs().max())
        res = dict(ok=err < 1e-4, rel_max_abs_diff=err, error=None)
    except Exception as e:  # noqa: BLE001 - report it, and go on measuring
        res = dict(ok=False, rel_max_abs_diff=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    del model
    res.update(device=device, config=f"{config_name} ({cfg.n_layers} layers)", prompt_len=prompt_len)
    return res


@torch.no_grad()
def time_ours(lm, prompt, new_tokens, sampler, device, compile_mode, warmup, repeats, tune=False, prefill="auto"):
    """Our decoding: prefill, then new_tokens - 1 compiled steps. Also first_run_s: the first warm-up run,
    i.e. compilation and CUDA-graph capture with one run's tokens."""
    from torch._dynamo.utils import counters
    skips0 = int(counters["inductor"]["cudagraph_skips"])
    t_setup = time.perf_counter()
    dec = Decoder(lm, sampler).to(device)
    dec.setup(prompt.shape[0], prompt.shape[1] + new_tokens, device)
    step = make_step(dec, device, compile_mode, tune=tune, prefill=prefill, batch=prompt.shape[0])

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

    firsts = []
    for i in range(max(1, warmup)):
        once()
        firsts.append(time.perf_counter())
    first_run_s = firsts[0] - t_setup
    t_compile = firsts[-1] - t_setup
    runs = [once() for _ in range(repeats)]
    total = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    toks = runs[-1][2]
    # the loop above must be the same computation as generate.py's decode_tokens
    assert toks.shape == (prompt.shape[0], new_tokens)
    return dict(tokens_per_s=new_tokens / total, decode_tokens_per_s=(new_tokens - 1) / decode,
                total_s=total, prefill_s=total - decode, warmup_s=t_compile, first_run_s=first_run_s,
                runs_s=[r[0] for r in runs], compiled=bool(getattr(step, "is_compiled", lambda: False)()),
                step_mode=step.mode, prefill_mode=step.prefill,
                coordinate_descent_tuning=bool(tune and getattr(step, "is_compiled", lambda: False)()),
                # > 0: a graph ran without CUDA graphs
                cudagraph_skips=int(counters["inductor"]["cudagraph_skips"]) - skips0)


def hf_model(model, device):
    """transformers' LlamaForCausalLM with our model's weights (before ours fuses them), checked for a full load."""
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
    return hf


@torch.no_grad()
def time_generate(hf, prompt, new_tokens, sampler, device, warmup, repeats, warmup_tokens=None, **gen_kw):
    """transformers' generate at batch 1: greedy (sampler None) or sampled; the median of repeats timed calls
    after warmup untimed ones (of warmup_tokens new tokens if given: an eager run needs no full-length one)."""
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
              attention_mask=torch.ones_like(prompt), **gen_kw)
    kw.update(dict(do_sample=False) if sampler is None else
              dict(do_sample=True, temperature=sampler.temperature, top_k=sampler.top_k, top_p=sampler.top_p))

    def once(n=new_tokens):
        sync(device)
        t0 = time.perf_counter()
        out = hf.generate(prompt, **{**kw, "max_new_tokens": n, "min_new_tokens": n})
        sync(device)
        assert out.shape[1] == prompt.shape[1] + n
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(warmup):
        once(warmup_tokens or new_tokens)
    warmup_s = time.perf_counter() - t0
    runs = [once() for _ in range(repeats)]
    total = statistics.median(runs)
    return dict(tokens_per_s=new_tokens / total, total_s=total, runs_s=runs, warmup_s=warmup_s)


def time_hf(model, prompt, args, device, compile_ok):
    """The transformers rows: eager with its dynamic cache, and static cache + compiled forward; greedy and
    sampled each. Returns {row: {sampler: result}}, plus the first-token logits check."""
    hf = hf_model(model, device)
    with torch.no_grad():
        diff = float((model(prompt)[:, -1].float() - hf(prompt).logits[:, -1].float()).abs().max())
    out = {"first_logits_max_abs_diff_vs_ours": diff}
    samplers = {"greedy": None, "sampled": SAMPLED}
    if "eager" in args.hf:
        row = out["hf_eager_dynamic"] = {"cache": "dynamic", "compiled": False}
        for name, sampler in samplers.items():
            torch.manual_seed(args.seed)
            row[name] = time_generate(hf, prompt, args.new_tokens, sampler, device, 1, args.hf_eager_repeats,
                                      warmup_tokens=8, disable_compile=True)
            print(f"transformers generate, eager, dynamic cache, {name}: {row[name]['tokens_per_s']:.1f} tokens/s",
                  flush=True)
    del hf
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    if "static" in args.hf:
        out["hf_static_compiled"] = time_hf_static_in_child(args, weights_checksum(model))
    return out


def weights_checksum(model):
    """A float64 sum over every parameter: the child process must have rebuilt the same random weights."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters()))


def time_hf_static_in_child(args, checksum):
    """The static-cache compiled row in a child process of this script: its CUDA-graph path has died with a
    segfault (transformers' cache update under cudagraphs), which in-process would lose every other figure.
    The child rebuilds the same weights from the seed and writes its row as JSON; a crash, a timeout or other
    weights become the row's error."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "hf_static.json")
        cmd = [sys.executable, os.path.abspath(__file__), *args.argv, "--hf-static-child", path]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.hf_static_timeout)
        except subprocess.TimeoutExpired:
            return {"cache": "static", "error": f"timed out after {args.hf_static_timeout} s"}
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0 or not os.path.exists(path):
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])[:400]
            row = {"cache": "static", "error": f"child process died ({how}): {tail}"}
            print(f"transformers static-cache generate failed: {row['error']}", flush=True)
            return row
        with open(path) as f:
            row = json.load(f)
    row["child_wall_s"] = time.perf_counter() - t0
    if abs(row.pop("weights_checksum") - checksum) > 1e-6 * max(1.0, abs(checksum)):
        row = {"cache": "static", "error": "the child process built other weights than ours"}
    return row


def time_hf_static(model, prompt, args, device, compile_ok):
    """transformers' generate with a static cache and (on CUDA) a compiled forward; greedy and sampled."""
    hf = hf_model(model, device)
    samplers = {"greedy": None, "sampled": SAMPLED}
    compiled = compile_ok and args.hf_static_compile != "off"
    row = {"cache": "static", "compiled": compiled, "compile": args.hf_static_compile if compiled else "off"}
    gen_kw = dict(cache_implementation="static")
    if compiled and args.hf_static_compile == "forward":  # transformers' documented static-cache recipe
        compiled_forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)

        def forward(*a, **k):  # each call a new CUDA-graph step, else the cache written in place reads as stale
            torch.compiler.cudagraph_mark_step_begin()
            return compiled_forward(*a, **k)
        hf.forward = forward
        gen_kw["disable_compile"] = True  # generate's own compile of the decode steps: off (one compile, ours)
    elif not compiled:
        gen_kw["disable_compile"] = True
    # else "auto": generate compiles the decode steps itself (CompileConfig: reduce-overhead)
    t0 = time.perf_counter()
    try:
        for name, sampler in samplers.items():
            torch.manual_seed(args.seed)
            row[name] = time_generate(hf, prompt, args.new_tokens, sampler, device, args.warmup, args.repeats,
                                      **gen_kw)
            print(f"transformers generate, static cache, compiled={compiled}, {name}: "
                  f"{row[name]['tokens_per_s']:.1f} tokens/s (warm-up {row[name]['warmup_s']:.0f} s)", flush=True)
        row["startup_s"] = time.perf_counter() - t0 - sum(sum(row[n]["runs_s"]) for n in samplers)
    except Exception as e:  # noqa: BLE001 - the peer failing must not lose our figures
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        print(f"transformers static-cache generate failed: {row['error']}", flush=True)
    return row


def build_model(args, device, dtype):
    """The random-weight model and prompt from the seed: the same in this process and in the static child."""
    torch.manual_seed(args.seed)
    cfg = llama_config(args.config)
    model = Llama(cfg).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), device=device)
    return model, prompt


def main(argv=None):
    t_start = T_START if argv is None else time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tinyllama-1.1b", help="models/llama.py config name")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (random ids)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per run")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="weights dtype")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda:N")
    p.add_argument("--compile", default="auto", choices=list(STEP_MODES),
                   help="our decode step (utils.decoding.make_step: on = torch.compile + CUDA graphs, graph = a CUDA "
                        "graph of the step as it runs with its glue compiled, off; auto: graph on CUDA for the fused "
                        "decode kernels, else on; off on CPU); transformers' static-cache forward is compiled unless "
                        "off (or on CPU under auto)")
    p.add_argument("--prefill", default="auto", choices=list(PREFILL_MODES),
                   help="our prompt forward: graph (a CUDA graph per prompt shape), compile (torch.compile, dynamic "
                        "shapes), eager; auto: graph on CUDA unless --compile off")
    p.add_argument("--coordinate-descent", action="store_true",
                   help="inductor's coordinate-descent tuning of our decode step's kernels (gpt-fast's setting): "
                        "a little faster steps, minutes more compilation (it was the default: > 200 s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (compilation, graph capture)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    p.add_argument("--hf", default="eager,static",
                   help="transformers rows, a comma list: eager (generate, DynamicCache, no compile) and static "
                        "(generate, cache_implementation='static', compiled forward); '' or --skip-hf: none")
    p.add_argument("--hf-static-compile", default="forward", choices=["forward", "auto", "off"],
                   help="the static row's compile: forward (model.forward = torch.compile(..., "
                        "mode='reduce-overhead', fullgraph=True), as transformers documents), auto (generate's own "
                        "auto-compile of the decode steps) or off")
    p.add_argument("--hf-eager-repeats", type=int, default=1,
                   help="timed runs of the (slow) eager rows, after one short warm-up run")
    p.add_argument("--hf-static-timeout", type=int, default=900,
                   help="seconds the static row's child process may take (it runs apart: a crash there is a row error)")
    p.add_argument("--hf-static-child", default=None, metavar="JSON",
                   help="internal: run only the static-cache row and write it to JSON (the parent starts this)")
    p.add_argument("--skip-hf", action="store_true", help="skip transformers' generate")
    p.add_argument("--coeus-config", default="nano", help="Coeus config for its decode figure ('' to skip)")
    p.add_argument("--bandwidth-tbs", type=float, default=None,
                   help="memory bandwidth for the floor (TB/s) instead of the one measured in this run")
    p.add_argument("--bandwidth-copy-mb", type=int, default=None,
                   help="size of the copy that measures the bandwidth (default: 1024 on CUDA, 64 on CPU)")
    p.add_argument("--no-fuse", action="store_true",
                   help="keep q/k/v and gate/up as separate matmuls (default: fused for decoding)")
    p.add_argument("--gemv", default="auto", choices=["auto", "on", "off", "both"],
                   help="one-row matmuls through kernels/gemv.py's Triton kernel (auto: on CUDA with Triton); both: "
                        "time without it first, then with it, in the same run")
    p.add_argument("--gemv-prefetch", default="on", choices=["on", "off", "both"],
                   help="the GEMV kernels request their first tile of W before waiting for the kernel before them "
                        "(programmatic dependent launch, Hopper; kernels/gemv.py PREFETCH_W); both: time without it "
                        "first (row ours_no_prefetch), then with it, in the same run")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights, prompt and sampling")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny configs on CPU, 1 repeat: checks the script runs")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.hf = [] if args.skip_hf else [h for h in args.hf.split(",") if h]
    bad = [h for h in args.hf if h not in ("eager", "static")]
    if bad:
        p.error(f"--hf: unknown row(s) {bad}; choose from eager, static")
    if args.smoke:
        args.config, args.prompt_len, args.new_tokens, args.dtype = "tiny", 16, 12, "float32"
        args.warmup, args.repeats = 1, 1
        args.coeus_config = "tiny" if args.coeus_config else ""
        args.device = "cpu" if args.device == "auto" else args.device
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    cuda = device.startswith("cuda")
    compile_ok = args.compile in ("on", "graph") or (args.compile == "auto" and cuda)
    dtype = getattr(torch, args.dtype)
    sampler = SAMPLED
    caches = tune_cache.compile_caches()  # inductor's FX-graph / autotune / AOTAutograd caches on disk (default on)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.hf_static_child:  # the child process of time_hf_static_in_child: the static row only
        model, prompt = build_model(args, device, dtype)
        row = time_hf_static(model, prompt, args, device, compile_ok)
        row["weights_checksum"] = weights_checksum(model)
        with open(args.hf_static_child, "w") as f:
            json.dump(row, f)
        return row

    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "config": args.config, "dtype": args.dtype, "batch": 1, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "sampler": sampler.to_dict(), "compile_caches": caches,
           "coordinate_descent": args.coordinate_descent}
    # the float32 prefill through the KV cache (crashed on CUDA): a 2-layer model of this config's shape
    res["fp32_prefill_with_cache"] = chk = fp32_prefill_with_cache_check(args.config, args.prompt_len, device)
    print(f"float32 prefill with KV cache on {device}: {'ok' if chk['ok'] else 'FAILED'} "
          f"(rel. diff {chk['rel_max_abs_diff']}, {chk['error'] or 'no error'})", flush=True)

    # the bandwidth floor, from a bandwidth measured now
    copy_mb = args.bandwidth_copy_mb or (1024 if cuda else 64)
    measured = measure_bandwidth(device, copy_mb * 2 ** 20)
    bw = args.bandwidth_tbs or measured
    model, prompt = build_model(args, device, dtype)
    wread, kv = bytes_read_per_token(model, args.prompt_len + args.new_tokens // 2)  # mean context of the decode
    res.update(params=model.num_params(), weight_bytes=weight_bytes(model), weight_bytes_read_per_token=wread,
               kv_bytes_read_per_token=kv, bytes_read_per_token=wread + kv,
               bandwidth_measured_tbs=measured, bandwidth_copy_mb=copy_mb,
               bandwidth_datasheet_tbs=datasheet_tbs(device),
               bandwidth_tbs=bw, bandwidth_source="--bandwidth-tbs" if args.bandwidth_tbs else "measured",
               floor_tokens_per_s=bw * 1e12 / (wread + kv))
    print(f"{args.config} {args.dtype} on {res['device']}: {res['params'] / 1e6:.1f}M params; a token reads "
          f"{wread / 1e9:.3f} GB of weights + {kv / 1e6:.1f} MB of KV cache; bandwidth {bw:.2f} TB/s "
          f"({res['bandwidth_source']}; copy of {copy_mb} MB, data sheet {res['bandwidth_datasheet_tbs']}) -> "
          f"floor {res['floor_tokens_per_s']:.0f} tokens/s", flush=True)

    # transformers first: ours then fuses the projections in place (no longer exportable)
    if args.hf:
        import transformers
        res["transformers_version"] = transformers.__version__
        res.update(time_hf(model, prompt, args, device, compile_ok))
        if "hf_eager_dynamic" in res:  # the earlier JSON's row: eager generate, sampled
            res["hf_generate"] = {**res["hf_eager_dynamic"]["sampled"],
                                  "first_logits_max_abs_diff_vs_ours": res["first_logits_max_abs_diff_vs_ours"]}
    res["fused_projections"] = not args.no_fuse
    gemv = args.gemv
    if gemv == "auto":
        gemv = "on" if kernels_by_default(device) else "off"
    # (row, decode kernels on, W prefetched before the PDL wait)
    variants = ([("ours_no_gemv", False, True), ("ours", True, True)] if gemv == "both"
                else [("ours", gemv == "on", True)])
    if args.gemv_prefetch != "on" and gemv != "off":
        variants = ([("ours_no_prefetch", True, False)] + variants if args.gemv_prefetch == "both"
                    else [(key, with_gemv, False) for key, with_gemv, _ in variants])
    prefetch_default = kernels_gemv.PREFETCH_W
    for key, with_gemv, prefetch in variants:
        kernels_gemv.PREFETCH_W = prefetch
        torch.manual_seed(args.seed)
        t = time.perf_counter()
        lm = LlamaLM(model, fuse=not args.no_fuse, gemv=with_gemv)
        tune_s = time.perf_counter() - t
        r = res[key] = {"gemv": with_gemv, "gemv_prefetch": with_gemv and prefetch, "gemv_tune_s": tune_s,
                        "gemv_configs": lm.gemv_report or {},
                        "programmatic_dependent_launch": with_gemv and pdl_enabled(device),
                        **time_ours(lm, prompt, args.new_tokens, sampler, device, args.compile, args.warmup,
                                    args.repeats, tune=args.coordinate_descent, prefill=args.prefill)}
        # to the end of our first (warm-up) run: GEMV tuning (or its disk cache), decoder set-up, compilation of
        # prefill and step, CUDA-graph capture, and that run's tokens
        r["startup_s"] = tune_s + r["first_run_s"]
        print(f"{key} (static KV cache, decode kernels {with_gemv}, PDL {r['programmatic_dependent_launch']}, "
              f"W prefetched before the wait {r['gemv_prefetch']}, "
              f"step {r['step_mode']}, prefill {r['prefill_mode']}, "
              f"compiled={r['compiled']}, coordinate descent {r['coordinate_descent_tuning']}, cudagraph skips "
              f"{r['cudagraph_skips']}): {r['tokens_per_s']:.1f} tokens/s ({r['decode_tokens_per_s']:.1f} "
              f"decode-only; start-up {r['startup_s']:.1f} s: GEMV tuning {tune_s:.1f} s)", flush=True)
    kernels_gemv.PREFETCH_W = prefetch_default
    ours = res["ours"]
    res["startup_s"] = ours["startup_s"]
    if "ours_no_gemv" in res:
        res["gemv_speedup"] = ours["decode_tokens_per_s"] / res["ours_no_gemv"]["decode_tokens_per_s"]
        print(f"decode kernels: {res['gemv_speedup']:.3f}x decode tokens/s", flush=True)
    if "ours_no_prefetch" in res:
        res["prefetch_speedup"] = ours["decode_tokens_per_s"] / res["ours_no_prefetch"]["decode_tokens_per_s"]
        print(f"W prefetched before the PDL wait: {res['prefetch_speedup']:.3f}x decode tokens/s", flush=True)
    # ratios, ours sampled against each transformers row (the static compiled one is the peer)
    for row in ("hf_static_compiled", "hf_eager_dynamic"):
        if row in res and "error" not in res[row]:
            peer = row.replace("hf_", "")
            for name in ("sampled", "greedy"):
                res[f"ours_vs_{peer}_{name}"] = ours["tokens_per_s"] / res[row][name]["tokens_per_s"]
            print(f"ours (sampled) / transformers {peer.replace('_', ' ')}: "
                  f"{res[f'ours_vs_{peer}_sampled']:.2f}x its sampled, {res[f'ours_vs_{peer}_greedy']:.2f}x its greedy",
                  flush=True)
    if "hf_eager_dynamic" in res:
        res["speedup_vs_hf"] = res["ours_vs_eager_dynamic_sampled"]  # the earlier JSON's key: eager, sampled
    res["fraction_of_floor"] = ours["decode_tokens_per_s"] / res["floor_tokens_per_s"]
    res["fraction_of_floor_with_prefill"] = ours["tokens_per_s"] / res["floor_tokens_per_s"]
    print(f"ours: {res['fraction_of_floor']:.1%} of the floor decode-only, {res['fraction_of_floor_with_prefill']:.1%} "
          f"prefill included (goal: >= 80 %)", flush=True)
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
                                        args.warmup, args.repeats, tune=args.coordinate_descent,
                                        prefill=args.prefill)}
            print(f"coeus {args.coeus_config}: {res['coeus']['tokens_per_s']:.1f} tokens/s "
                  f"({res['coeus']['decode_tokens_per_s']:.1f} decode-only)", flush=True)
    if cuda:
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    res["wall_s"] = time.perf_counter() - t_start
    print(f"our start-up {res['startup_s']:.1f} s (GEMV tuning, compilation, first run), whole benchmark "
          f"{res['wall_s']:.0f} s", flush=True)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
