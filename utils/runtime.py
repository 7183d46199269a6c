"""Device, precision, compilation, CUDA graphs and the learning-rate schedule: what every script sets up the same way
(nanoGPT's one block).

    compiled = CompiledBlocks(model.layers, mode="default")   # regional torch.compile, eager fallback
    compiled.warm_up(lambda: model(x).mean().backward())     # or compiled.run(step_fn) inside the loop
    step = GraphedCalls(fn, "the decode step")                # fn replayed from CUDA graphs, no compiler
    lr = base_lr * warmup_cosine(step, warmup, total, min_ratio)
"""
import contextlib
import math
import random
import time
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


def use_kernels(model):
    """Switch on the training kernels of kernels/ for every part of model that sits on CUDA (a no-op elsewhere; call
    after model.to(device)): QLoRA's NF4 dequantisation and the fused loss's cross-entropy. Both compute what the
    PyTorch they replace computes. Returns {kernel: how many modules use it}."""
    from kernels.cross_entropy import use_cross_entropy_kernel
    from kernels.nf4 import use_nf4_kernels
    return dict(nf4=use_nf4_kernels(model), cross_entropy=use_cross_entropy_kernel(model))


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


def cuda_graph(fn, warmup=2):
    """fn's GPU work captured once as a CUDA graph, after `warmup` calls on a side stream (which also compile,
    autotune and fill caches). Returns the replay and the peak bytes allocated while capturing: that is the call's
    memory, since replays allocate nothing (a peak read over them counts only what stays allocated)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay, torch.cuda.max_memory_allocated()


class GraphedCalls:
    """fn(*args) replayed from CUDA graphs, one graph per shape of the tensor arguments, without a compiler.

    A shape's first `eager_calls` calls run eagerly: they are real calls and also the warm-up (Triton's JIT, cuBLAS,
    the attention backend's choice), so a capture never runs fn an extra time; the next call of that shape is
    captured, then replayed, and so is every later one, its tensor arguments copied into the graph's own. fn must
    touch only tensors that keep their addresses between calls (a static KV cache, preallocated buffers): reset()
    forgets every graph, to be called when those are reallocated. Up to max_graphs shapes keep a graph (each holds
    its own memory), and only calls for which capture_if(*args) holds (default: all); others run eagerly. Off a GPU,
    or once a capture has failed (an op that syncs with the host), fn runs eagerly. Returns a copy of the graph's
    output, which the next replay overwrites."""

    def __init__(self, fn, what, eager_calls=1, max_graphs=4, capture_if=None):
        self.fn, self.what, self.eager_calls, self.max_graphs = fn, what, eager_calls, max_graphs
        self.capture_if = capture_if
        self.failed = False
        self.reset()

    def reset(self):
        self.graphs, self.calls = {}, {}

    def captured(self):
        return len(self.graphs)

    @staticmethod
    def _key(args):
        return tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args)

    def __call__(self, *args):
        key = self._key(args)
        entry = self.graphs.get(key)
        if entry is None:
            usable = not self.failed and all(a.is_cuda for a in args if isinstance(a, torch.Tensor))
            n = self.calls[key] = self.calls.get(key, 0) + 1
            if not usable or n <= self.eager_calls or len(self.graphs) >= self.max_graphs \
                    or torch.is_grad_enabled() or (self.capture_if is not None and not self.capture_if(*args)):
                return self.fn(*args)
            entry = self._capture(key, args)
            if entry is None:
                return self.fn(*args)
        static, graph, out = entry
        for s, a in zip(static, args):
            if isinstance(a, torch.Tensor) and a is not s:
                s.copy_(a)
        graph.replay()
        return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)

    def _capture(self, key, args):
        static = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.graph(graph, stream=side):
                out = self.fn(*static)
        except Exception as e:  # pragma: no cover - needs a GPU
            self.failed = True
            warnings.warn(f"CUDA-graph capture of {self.what} failed ({_first_line(e)}); running it eagerly")
            return None
        torch.cuda.current_stream().wait_stream(side)
        self.graphs[key] = entry = (static, graph, out)
        return entry


class CompiledOrEager:
    """torch.compile(fn, **kw) that falls back to fn, with a warning, for good once compiling it fails.
    on_fail(error): called instead of the warning (CompiledBlocks turns a whole group eager at once)."""

    def __init__(self, fn, what, on_fail=None, **compile_kw):
        self.eager, self.what, self.on_fail = fn, what, on_fail
        self.compiled = self.fn = torch.compile(fn, **compile_kw)

    def is_compiled(self):
        return self.fn is self.compiled

    def __call__(self, *args, **kwargs):
        if self.fn is self.eager:
            return self.eager(*args, **kwargs)
        try:
            return self.fn(*args, **kwargs)
        except Exception as e:  # pragma: no cover - depends on the machine's compiler
            self.fn = self.eager
            if self.on_fail is not None:
                self.on_fail(e)
            else:
                warnings.warn(f"torch.compile of {self.what} failed ({_first_line(e)}); running it eagerly")
            return self.eager(*args, **kwargs)


def _first_line(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


class CompiledBlocks:
    """Regional compilation: each block's forward becomes a CompiledOrEager. Dynamo lifts a block's parameters
    into graph inputs, so ONE graph serves all blocks of a class and compile time does not grow with depth
    (nano Coeus compiled whole took 192 s on CPU, per block 72 s). The forward is replaced on the instance,
    so the hooks around __call__ (FSDP2's, DDP's) stay outside the graph and parameter names do not change.

    A failure can surface in backward, outside any forward call: warm_up(fn) runs a throwaway step and run(fn)
    retries a real one; either falls back to eager for good (with one warning) when the compiled path raises.
    enabled=False leaves the blocks eager (the same calls then just run fn).

    whole: (module, method name) pairs compiled as ONE graph each, e.g. (vision_tower, "features"): a stack of
    small blocks launched from one graph instead of one per block (the tower's 23 ViT blocks at batch 8 are about
    as slow to launch as to run). Only where no per-block hooks (FSDP2) or checkpointing sit inside."""

    def __init__(self, blocks, enabled=True, what="the blocks", whole=(), **compile_kw):
        self.what = what
        self.targets = [(b, "forward") for b in blocks] + list(whole)
        self.active = bool(enabled) and bool(self.targets)
        self.compiled = []
        if self.active:
            for obj, name in self.targets:
                setattr(obj, name, CompiledOrEager(getattr(obj, name), what, on_fail=self.uncompile, **compile_kw))
                self.compiled.append(getattr(obj, name))

    def uncompile(self, err=None):
        """Every block back to eager, also where a wrapper (activation checkpointing) now calls the compiled one."""
        if not self.active:
            return
        for (obj, name), c in zip(self.targets, self.compiled):
            c.fn = c.eager
            if obj.__dict__.get(name) is c:
                delattr(obj, name)  # the class's method again (c.eager was the bound method it replaced)
        self.active = False
        torch._dynamo.reset()
        if err is not None:
            warnings.warn(f"torch.compile of {self.what} failed ({_first_line(err)}); running eagerly")

    def warm_up(self, fn):
        """Build the graphs now, on a throwaway call fn() (RNG states restored afterwards); eager if that fails.
        Returns a one-line summary for the log."""
        if not self.active:
            return "eager"
        t = time.time()
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - any compiler failure
                self.uncompile(e)
        return f"compiled {self.what} in {time.time() - t:.1f}s" if self.active else "eager (torch.compile failed)"

    def run(self, fn):
        """fn() (e.g. forward + backward); if it raises while compiled, fall back to eager and run it again."""
        if not self.active:
            return fn()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a compiler failure; a real error raises again eagerly
            self.uncompile(e)
            return fn()


def warmup_cosine(step, warmup, total, min_ratio=0.0, progress=None):
    """The learning-rate multiplier of every script: linear warm-up to 1 over `warmup` steps, then a cosine
    from 1 down to min_ratio over the steps left to `total` (or over `progress` in [0, 1] when given, e.g. the
    fraction of a time budget spent)."""
    if step < warmup:
        return (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(1, total - warmup)
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
