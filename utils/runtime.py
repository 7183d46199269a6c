"""Device, precision and compile set-up that every script does the same way (nanoGPT's one block)."""
import contextlib
import os
import random
import warnings

import numpy as np
import torch


def pick_device(name="auto"):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} asked for, but torch.cuda.is_available() is False (run check_cuda.py)")
    return name


def setup_precision(device, dtype="auto"):
    """Turn on TF32 and return (autocast context, dtype name). bf16 autocast on a GPU that has it, fp32 on CPU."""
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    if dtype == "float32":
        return contextlib.nullcontext(), dtype
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype)), dtype


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def maybe_compile(module_or_fn, enabled=True, **kwargs):
    """torch.compile with an eager fallback: a machine without a working Triton/compiler still runs."""
    if not enabled:
        return module_or_fn
    try:
        return torch.compile(module_or_fn, **kwargs)
    except Exception as e:  # pragma: no cover - depends on the machine
        warnings.warn(f"torch.compile unavailable ({type(e).__name__}: {e}); running eagerly")
        return module_or_fn


def compile_works(device):
    """Run one tiny compiled function; False (with the reason) if the toolchain is missing."""
    try:
        f = torch.compile(lambda x: torch.sin(x) * 2)
        f(torch.randn(8, device=device))
        return True, ""
    except Exception as e:
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def peak_rss_bytes():
    """The process's peak resident set size (CPU peak memory)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def is_rank0():
    return int(os.environ.get("RANK", "0")) == 0
