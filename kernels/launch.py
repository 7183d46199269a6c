"""What the kernels share: the Triton import guard, where they run (kernel_ok, point_at_kernel), plain-Python
cdiv / next_power_of_2, and the decode kernels' launch options.

On Hopper and later the kernels are programmatic dependent launches (PDL): each is scheduled while the one
before it finishes, its launch and ramp-up overlapping that kernel's tail (~2 us a kernel on an H200
otherwise). A kernel opts in through its PDL constexpr: gdc_launch_dependents() at its start, gdc_wait() before
it reads what the kernel before it wrote (loads of anything else, weights or an old KV cache, may go before the
wait), and launch_options turns it on only where the GPU and Triton can.
"""
import contextlib
import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without Triton
    triton = tl = None
try:  # programmatic dependent launch (Hopper and later): a kernel starts while the one before it finishes
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton
    gdc_launch_dependents = gdc_wait = None


def cdiv(a, b):
    """ceil(a / b) for ints. triton.cdiv and triton.next_power_of_2 are ConstexprFunctions since Triton 3.5: ~4 us a
    call from Python, and a GLA launch made 17 such calls (half its host time)."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of 2 >= n (0 for 0, as Triton's)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def kernel_ok(device):
    """Whether Triton kernels run for tensors on device: CUDA with Triton, or anywhere under Triton's interpreter."""
    return triton is not None and (torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def point_at_kernel(model, cls, device_of, attr, fn):
    """Set attr = fn on every cls module m of model whose device_of(m) is a device the kernels run on; returns how
    many. The models keep their plain-PyTorch default elsewhere (the use_*_kernel(s) switches)."""
    n = 0
    for m in model.modules():
        if isinstance(m, cls) and kernel_ok(device_of(m)):
            setattr(m, attr, fn)
            n += 1
    return n


@contextlib.contextmanager
def compile_in_parallel(workers=None):
    """Inside, a Triton launch only compiles its kernel, on a pool of threads; on leaving, every compile has
    finished and sits in Triton's caches (in memory and on disk), so the same launches afterwards run at once.
    Triton's compiler releases the GIL in its MLIR passes and runs ptxas as a process: 1.5-2x on a 2-core CPU,
    more on a GPU host's cores, for the GEMV tuner's candidates. A compile that fails is left for the real
    launch to raise. Without Triton's AsyncCompileMode (before 3.4) the launches compile one by one later."""
    try:
        from concurrent.futures import ThreadPoolExecutor
        from triton.runtime._async_compile import AsyncCompileMode
        from triton.runtime.jit import JITFunction
    except ImportError:  # pragma: no cover - older Triton, or none
        yield
        return
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    # at least 2 threads: one compiles while the other waits on its ptxas process
    with ThreadPoolExecutor(workers or max(2, os.cpu_count() or 1)) as pool, AsyncCompileMode(pool, ignore_errors=True):
        JITFunction.run = compile_only
        try:
            yield
        finally:
            JITFunction.run = run


def triton_available():
    return triton is not None


def kernels_by_default(device):
    """Whether batch-1 decoding on this device should go through these kernels: CUDA with Triton."""
    return str(device).startswith("cuda") and triton is not None


PDL = True  # launch the kernels as programmatic dependent launches where the GPU can


@functools.cache
def _pdl_on(device_index):
    return (PDL and gdc_wait is not None and not os.environ.get("TRITON_INTERPRET")
            and torch.cuda.get_device_capability(device_index)[0] >= 9)


def pdl_enabled(device):
    """Whether the decode kernels launch as programmatic dependent launches on this device (CUDA, Hopper on)."""
    device = torch.device(device)
    if device.type != "cuda" or triton is None:
        return False
    return _pdl_on(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(x, num_warps):
    """Keyword arguments of every decode kernel's launch on x's device."""
    pdl = pdl_enabled(x.device)
    return dict(PDL=pdl, launch_pdl=pdl, num_warps=num_warps)
