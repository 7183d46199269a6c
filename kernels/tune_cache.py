"""Tuned kernel configurations on disk, so a second run starts without re-timing them (issue #19, item 4).

    key = tune_key("gemv", kind, N, K, dtype, device)   # GPU name, torch and Triton versions, kind, shape, dtype
    cfg = get(key)                                       # None on a miss (or a corrupt file: warned, retuned)
    put(key, cfg)                                        # atomic: a temp file in the same folder, then os.replace

One JSON file, {key: value}, in $KERNELS_CACHE_DIR (default ~/.cache/coeus-kernels/), named tune.json. The
key holds every thing a configuration depends on, so a new GPU, driver stack or Triton simply misses. A
file that does not parse is set aside (warned about) and rebuilt; a file that cannot be written is only
warned about (the configuration is still used, just not kept). KERNELS_CACHE_DIR=off turns the cache off.

shipped(...) is the other source, read when the disk cache misses: kernels/gemv_tuned.json, the winners that
benchmarks/tune_gemv.py timed for the named configs' decode shapes on the GPUs it ran on (as vLLM ships its fused-MoE
tiles per GPU), so a cold start on such a GPU times nothing. Keyed by GPU name, kind, shape and dtype, not by
versions: a tile configuration stays valid across them, if perhaps no longer the fastest. KERNELS_SHIPPED=off
ignores it (every shape is timed here again).

compile_caches() reports (and switches on, where off) torch.compile's own on-disk caches: inductor's FX graph
cache, its autotune cache and AOTAutograd's cache are on by default since torch 2.5 (torch._inductor.config
fx_graph_cache / autotune_local_cache, torch._functorch.config.enable_autograd_cache), under
$TORCHINDUCTOR_CACHE_DIR (default /tmp/torchinductor_$USER); Triton keeps its binaries in ~/.triton/cache.
"""
import functools
import json
import os
import tempfile
import threading
import warnings

import torch

FILE_NAME = "tune.json"
_LOCK = threading.Lock()


def cache_dir():
    """The folder of the cache file, or None when KERNELS_CACHE_DIR is off (or 0, none, false)."""
    d = os.environ.get("KERNELS_CACHE_DIR")
    if d is not None and d.strip().lower() in ("off", "0", "none", "false"):
        return None
    return d or os.path.join(os.path.expanduser("~"), ".cache", "coeus-kernels")


def cache_path():
    d = cache_dir()
    return None if d is None else os.path.join(d, FILE_NAME)


def _versions():
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    return f"torch {torch.__version__}|triton {tv}"


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def tune_key(op, kind, N, K, dtype, device):
    """The string a configuration is stored under: op and kind, shape, dtype, GPU name, torch and Triton."""
    return f"{op}|{kind}|{N}x{K}|{str(dtype).replace('torch.', '')}|{device_name(device)}|{_versions()}"


def _load(path):
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        return data
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        warnings.warn(f"kernel tuning cache {path} is unreadable ({type(e).__name__}: {e}); "
                      f"ignoring it and tuning again")
        try:
            os.replace(path, path + ".corrupt")  # kept for a look, out of the way of the next write
        except OSError:
            pass
        return {}


def get(key):
    """The stored value of key, or None (miss, cache off, or an unreadable file)."""
    path = cache_path()
    if path is None:
        return None
    with _LOCK:
        return _load(path).get(key)


def put(key, value):
    """Store value (JSON-able) under key: read, update, write a temp file in the folder, os.replace it over the
    file (readers never see half a file). Returns whether it was written."""
    path = cache_path()
    if path is None:
        return False
    with _LOCK:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            data = _load(path)
            data[key] = value
            fd, tmp = tempfile.mkstemp(prefix=FILE_NAME + ".", suffix=".tmp", dir=os.path.dirname(path))
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
            return True
        except OSError as e:
            warnings.warn(f"could not write the kernel tuning cache {path} ({type(e).__name__}: {e})")
            return False


def cached(key, tune):
    """get(key), or tune() -> value, put(key, value), value. Returns (value, hit)."""
    value = get(key)
    if value is not None:
        return value, True
    value = tune()
    put(key, value)
    return value, False


SHIPPED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemv_tuned.json")
_OFF = ("off", "0", "none", "false")


@functools.lru_cache(maxsize=None)
def _shipped_table(path):
    try:
        with open(path) as f:
            table = json.load(f)["gpus"]
        if not isinstance(table, dict):
            raise ValueError("'gpus' is not an object")
        return table
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"shipped kernel configurations {path} are unreadable ({type(e).__name__}: {e}); ignoring them")
        return {}


def shipped_key(kind, N, K, dtype):
    return f"{kind}|{N}x{K}|{str(dtype).replace('torch.', '')}"


def shipped(kind, N, K, dtype, device, path=None):
    """The configuration shipped in kernels/gemv_tuned.json for this GPU model, kind, shape and dtype, or None
    (none shipped, or KERNELS_SHIPPED=off)."""
    if os.environ.get("KERNELS_SHIPPED", "").strip().lower() in _OFF:
        return None
    return _shipped_table(path or SHIPPED_PATH).get(device_name(device), {}).get(shipped_key(kind, N, K, dtype))


def compile_caches():
    """Switch on torch.compile's on-disk caches where they are off; returns {setting: value} for a report."""
    import torch._inductor.config as ic
    report = {}
    for name in ("fx_graph_cache", "autotune_local_cache"):
        if hasattr(ic, name):
            if not getattr(ic, name) and not ic.force_disable_caches:
                setattr(ic, name, True)
            report[name] = getattr(ic, name)
    try:
        import torch._functorch.config as fc
        if hasattr(fc, "enable_autograd_cache"):
            if not fc.enable_autograd_cache and not ic.force_disable_caches:
                fc.enable_autograd_cache = True
            report["autograd_cache"] = fc.enable_autograd_cache
    except ImportError:  # pragma: no cover - older torch
        pass
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_dir
        report["inductor_cache_dir"] = inductor_dir()
    except ImportError:  # pragma: no cover - older torch
        report["inductor_cache_dir"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    report["kernels_cache"] = cache_path()
    return report
