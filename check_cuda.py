"""Is this machine ready to train? Prints what torch sees and, for each problem, the command that fixes it.

    python check_cuda.py                 # report; exits 0 even on a CPU-only machine
    python check_cuda.py --require-cuda  # exit 1 unless a usable CUDA GPU is there (for job scripts)
    python check_cuda.py --json          # the same facts as one JSON object
    python check_cuda.py --skip-compile  # leave out the (slow on CPU) torch.compile check

Every capability is tested by running it (a tiny matmul in bf16, a tiny SDPA call per backend, a tiny
torch.compile), not by reading flags: a flag can say yes while the kernel still fails.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils.runtime import compile_works  # noqa: E402

INSTALL_CUDA = ("pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/cu126 "
                "(pick the cuXXX that `nvidia-smi` shows your driver supports)")


def first_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def sdpa_backends(device):
    """Which SDPA backends actually run a tiny causal bf16/fp32 call on `device`: {name: "ok" | reason}."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(1, 2, 16, 64, device=device, dtype=dtype)
    out = {}
    names = {"flash": "FLASH_ATTENTION", "memory_efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}
    for name, member in names.items():
        backend = getattr(SDPBackend, member, None)
        if backend is None:
            out[name] = "not in this torch"
            continue
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            if device == "cuda":
                torch.cuda.synchronize()
            out[name] = "ok"
        except Exception as e:  # noqa: BLE001 - the reason is the report
            out[name] = first_line(e)
    return out


def gather(check_compile=True):
    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "torch_cuda_build": torch.version.cuda, "cudnn": None,
            "cuda_available": torch.cuda.is_available(), "devices": [], "problems": []}
    problems = info["problems"]
    if torch.version.cuda is None:
        problems.append(("torch is a CPU-only build", INSTALL_CUDA))
    if info["cuda_available"]:
        info["cudnn"] = torch.backends.cudnn.version()
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                    "memory_gib": round(p.total_memory / 2**30, 1),
                                    "multiprocessors": p.multi_processor_count})
        try:
            x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
            (x @ x).sum().item()
            info["bf16"] = torch.cuda.is_bf16_supported()
        except Exception as e:  # noqa: BLE001
            info["bf16"] = False
            problems.append((f"bf16 matmul fails ({first_line(e)})", "use --dtype float16 or float32, or an Ampere+ GPU"))
        if not info.get("bf16"):
            problems.append(("no bf16 on this GPU", "train with float16 + GradScaler, or use an Ampere or newer GPU"))
        major = torch.cuda.get_device_capability(0)[0]
        info["tf32_capable"] = major >= 8
        info["tf32_matmul_enabled"] = torch.backends.cuda.matmul.allow_tf32
        info["tf32_note"] = "utils.runtime.setup_precision turns TF32 on for every script"
        info["sdpa"] = sdpa_backends("cuda")
        if info["sdpa"].get("flash") != "ok" and info["sdpa"].get("memory_efficient") != "ok":
            problems.append(("no fused SDPA kernel runs (attention falls back to the slow math path)",
                             "use an sm80+ GPU and a recent CUDA build of torch: " + INSTALL_CUDA))
        try:
            import torch.distributed as dist
            info["nccl"] = dist.is_available() and dist.is_nccl_available()
            if info["nccl"]:
                v = torch.cuda.nccl.version()  # a tuple in recent torch, an int in old ones
                info["nccl_version"] = ".".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
        except Exception as e:  # noqa: BLE001
            info["nccl"] = False
            info["nccl_error"] = first_line(e)
        if not info["nccl"]:
            problems.append(("NCCL unavailable (multi-GPU training will not work)", INSTALL_CUDA))
        device = "cuda"
    else:
        if torch.version.cuda is not None:
            problems.append(("torch has CUDA but sees no GPU",
                             "check `nvidia-smi`; check CUDA_VISIBLE_DEVICES (now "
                             f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}); update the NVIDIA driver"))
        info["sdpa"] = sdpa_backends("cpu")
        device = "cpu"
    if not check_compile:
        info["torch_compile"] = "not checked (--skip-compile)"
        return info
    ok, why = compile_works(device)
    info["torch_compile"] = "ok" if ok else why
    if not ok:
        fix = "pip install triton (matching your torch), and a C compiler: apt-get install build-essential" \
            if device == "cuda" else "apt-get install build-essential (inductor needs a C++ compiler on CPU)"
        problems.append((f"torch.compile fails ({why}); scripts fall back to eager", fix))
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--require-cuda", action="store_true", help="exit with status 1 unless a CUDA GPU is usable")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    ap.add_argument("--skip-compile", action="store_true",
                    help="skip the torch.compile check (it compiles a kernel: ~1 min on a busy CPU)")
    args = ap.parse_args(argv)
    info = gather(check_compile=not args.skip_compile)
    if args.json:
        print(json.dumps({**info, "problems": [{"problem": p, "fix": f} for p, f in info["problems"]]}, indent=2))
    else:
        print(f"python {info['python']}  torch {info['torch']}  (CUDA build: {info['torch_cuda_build'] or 'none, CPU-only'})")
        print(f"CUDA available: {info['cuda_available']}" + (f"  cuDNN {info['cudnn']}" if info["cudnn"] else ""))
        for d in info["devices"]:
            print(f"  GPU {d['index']}: {d['name']}  sm{d['capability']}  {d['memory_gib']} GiB  "
                  f"{d['multiprocessors']} SMs")
        if info["cuda_available"]:
            print(f"bf16: {info['bf16']}   TF32 capable: {info['tf32_capable']} "
                  f"(matmul TF32 now {'on' if info['tf32_matmul_enabled'] else 'off'}; {info['tf32_note']})")
            print(f"NCCL: {info['nccl']}" + (f" {info.get('nccl_version')}" if info.get("nccl_version") else ""))
        print("SDPA backends (tiny causal call, " + ("cuda bf16" if info["cuda_available"] else "cpu fp32") + "):")
        for name, status in info["sdpa"].items():
            print(f"  {name:17s} {status}")
        print(f"torch.compile: {info['torch_compile']}")
        if info["problems"]:
            print("\nproblems:")
            for problem, fix in info["problems"]:
                print(f"  - {problem}\n    fix: {fix}")
        else:
            print("\nno problems found")
    if args.require_cuda and not info["cuda_available"]:
        print("error: --require-cuda given but no CUDA GPU is usable (see problems above)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
