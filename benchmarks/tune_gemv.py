"""Time every GEMV tile configuration for the batch-1 decode shapes of named configs on this GPU, and ship the winners.

    python benchmarks/tune_gemv.py --out tune_gemv.json                      # five configs' shapes, bf16: a table
    python benchmarks/tune_gemv.py --ship kernels/gemv_tuned.json            # ... and merge the winners into it

A decode step's projections run as kernels/gemv.py's four kinds (kernels/fused_decode.py's KINDS): q/k/v "normed"
(the RMSNorm in the prologue), o_proj and down_proj "residual", gate/up "swiglu", the head "partials". For each
distinct (kind, N, K) of the configs, every candidate of kernels.gemv.CANDIDATES is compiled (all at once, on a
pool of threads) and timed as tune_gemv times it (kernels.gemv.candidate_times: replayed in a CUDA graph over enough
copies of the weight that L2 never holds the one being read). The JSON holds every candidate's microseconds, the
winner, and the winner's share of the device bandwidth measured in this run (bytes of the weight / time / bandwidth).

--ship merges the winners, under this GPU's name, into the table that kernels/tune_cache.shipped reads when the disk
cache misses: a cold generate.py on this GPU model then times no GEMV candidate for these shapes (issue 19's
start-up). Other shapes and GPUs are still tuned on first use.
"""
import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.bench_decode import measure_bandwidth  # noqa: E402
from kernels import gemv as G  # noqa: E402
from kernels import tune_cache  # noqa: E402
from models.llama import LLAMA_CONFIGS, llama_config  # noqa: E402

DEFAULT_CONFIGS = "tinyllama-1.1b,llama3.2-1b,qwen2.5-0.5b,qwen2.5-1.5b,llama3-8b"


def decode_shapes(config):
    """{(kind, N, K)} of one named config's batch-1 decode step: (out, in) features of each fused projection."""
    c = llama_config(config)
    D = c.dim // c.n_heads
    return {("normed", (c.n_heads + 2 * c.n_kv_heads) * D, c.dim), ("residual", c.dim, c.n_heads * D),
            ("swiglu", 2 * c.ffn_dim, c.dim), ("residual", c.dim, c.ffn_dim), ("partials", c.vocab_size, c.dim)}


def ship(path, gpu, winners):
    """Merge {shipped_key: config} under gpu into the table at path (written atomically)."""
    table = {"about": "GEMV tile configurations (split_k, block_n, block_k, num_warps) per GPU model, written by "
                      "benchmarks/tune_gemv.py --ship; read by kernels/tune_cache.shipped", "gpus": {}}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    table["gpus"].setdefault(gpu, {}).update(winners)
    table["gpus"][gpu] = dict(sorted(table["gpus"][gpu].items()))
    text = json.dumps(table, indent=1)
    text = re.sub(r"\[\s+([-\d,\s]+?)\s+\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]",
                  text)  # one configuration a line
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                    help=f"comma-separated named configs whose decode shapes are tuned (of {', '.join(LLAMA_CONFIGS)})")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="the weights' dtype")
    ap.add_argument("--out", default=None, help="JSON of every candidate's time per shape (default: none)")
    ap.add_argument("--ship", default=None,
                    help="merge the winners, under this GPU's name, into this table (kernels/gemv_tuned.json is "
                         "the one generate.py reads)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or G.triton is None:
        sys.exit("tune_gemv.py times Triton kernels on a CUDA GPU; none is available here")
    unknown = [c for c in args.configs.split(",") if c not in LLAMA_CONFIGS]
    if unknown:
        ap.error(f"unknown --configs {unknown}; known: {', '.join(LLAMA_CONFIGS)}")
    dtype = getattr(torch, args.dtype)
    shapes = {}
    for config in args.configs.split(","):
        for shape in decode_shapes(config):
            shapes.setdefault(shape, []).append(config)
    gpu = torch.cuda.get_device_name()
    bandwidth = measure_bandwidth("cuda", 1 << 30)
    t0 = time.perf_counter()
    G.precompile_candidates([(torch.empty(N, K, device="cuda", dtype=dtype), kind) for kind, N, K in shapes])
    compile_s = time.perf_counter() - t0
    print(f"{gpu}: compiled every candidate for {len(shapes)} shapes in {compile_s:.1f} s; measured bandwidth "
          f"{bandwidth:.2f} TB/s", flush=True)
    rows, winners = {}, {}
    for (kind, N, K), configs in sorted(shapes.items()):
        times = {",".join(map(str, cfg)): us for cfg, us in
                 G.candidate_times(torch.empty(N, K, device="cuda", dtype=dtype), kind).items()}
        best = min(times, key=times.get)
        floor_us = N * K * dtype.itemsize / (bandwidth * 1e6)
        rows[f"{kind}|{N}x{K}"] = dict(configs=configs, best=best, best_us=round(times[best], 3),
                                       of_bandwidth=round(floor_us / times[best], 3),
                                       times={k: round(v, 3) for k, v in sorted(times.items(), key=lambda kv: kv[1])})
        winners[tune_cache.shipped_key(kind, N, K, dtype)] = [int(v) for v in best.split(",")]
        print(f"{kind:9s} {N:6d} x {K:5d}  best {best:14s} {times[best]:7.2f} us  {floor_us / times[best]:5.1%} of "
              f"the bandwidth  ({len(times)} candidates; {', '.join(configs)})", flush=True)
    total_s = time.perf_counter() - t0
    print(f"compiled and timed in {total_s:.1f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(gpu=gpu, dtype=args.dtype, bandwidth_tbs=bandwidth, compile_s=compile_s, total_s=total_s,
                           torch=torch.__version__, triton=G.triton.__version__, shapes=rows), f, indent=1)
    if args.ship:
        ship(args.ship, gpu, winners)
        print(f"winners for {gpu} merged into {args.ship}")


if __name__ == "__main__":
    main()
