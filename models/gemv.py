"""Matrix-vector products for batch-1 decoding: a split-K Triton GEMV that torch.compile and CUDA graphs see.

At batch 1 every nn.Linear of a decode step is y = W x with one row x: the time is the bytes of W over
memory bandwidth, and the kernels torch.compile or cuBLAS pick reach 38-66 % of it on an H200 for
TinyLlama's shapes (benchmarks/bench_decode.py). This kernel streams W in (BLOCK_N, BLOCK_K) tiles,
fp32 products accumulated per tile, and splits K over SPLIT_K programs when N alone gives too few
programs to keep every multiprocessor's loads in flight. It returns the (SPLIT_K, N) fp32 partial sums;
their sum runs in the next fused kernel (residual add, RMSNorm), so the split costs no launch. For a
stacked (gate | up) weight, gemv_swiglu computes SiLU(gate) * up in the kernel's epilogue (one split).

    use_gemv(model)        # every bias-free nn.Linear becomes a DecodeLinear; tunes each weight shape
    y = gemv(x, weight)    # x (..., K) with one row, weight (N, K) -> (..., N), x's dtype
    h = linear.swiglu(x)   # a DecodeLinear with use_gemv(..., swiglu=(its name,)): (..., K) -> (..., N / 2)

The tile configuration is chosen per (N, K, dtype, GPU) once, eagerly, by timing a few candidates
(tune_gemv); the compiled graph then carries it as constants. Off CUDA, with several rows, or without
Triton, DecodeLinear is nn.Linear. tests/test_gemv.py runs the kernel in Triton's CPU interpreter against a
float64 reference.
"""
import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without Triton
    triton = None


def triton_available():
    return triton is not None


def kernels_by_default(device):
    """Whether batch-1 decoding on this device should go through these kernels: CUDA with Triton."""
    return str(device).startswith("cuda") and triton is not None


if triton is not None:
    @triton.jit
    def _rows_dot_x(x_ptr, w_ptr, rows, pid_s, N, K, stride_wn, K_PER_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
        # rows (BLOCK_N,) of W times x over columns [pid_s*K_PER_SPLIT, (pid_s+1)*K_PER_SPLIT) -> (BLOCK_N,) fp32
        w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)   # reduced once, after the loop
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            cols = pid_s * K_PER_SPLIT + k0 + tl.arange(0, BLOCK_K)
            if EVEN_N and EVEN_K:
                x = tl.load(x_ptr + cols)
                w = tl.load(w_rows + cols[None, :], eviction_policy="evict_first")  # W is read once: keep x in L2
            else:
                col_ok = cols < K
                x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
                w = tl.load(w_rows + cols[None, :], mask=(rows[:, None] < N) & col_ok[None, :], other=0.0,
                            eviction_policy="evict_first")
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        return tl.sum(acc, axis=1)

    @triton.jit
    def _gemv_partials_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_wn,
                              K_PER_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
        # program (n, s): rows [n*BLOCK_N, (n+1)*BLOCK_N) of W times x over the s-th split of the columns
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        y = _rows_dot_x(x_ptr, w_ptr, rows, pid_s, N, K, stride_wn, K_PER_SPLIT, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K)
        if EVEN_N:
            tl.store(out_ptr + pid_s * N + rows, y)
        else:
            tl.store(out_ptr + pid_s * N + rows, y, mask=rows < N)

    @triton.jit
    def _gemv_swiglu_kernel(x_ptr, w_ptr, out_ptr, N, stride_wn, K: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
        # W = (gate | up) stacked, (2N, K): program n does rows [n*BLOCK_N, (n+1)*BLOCK_N) of both over all of K
        # and writes silu(gate) * up, each product rounded to x's dtype first as nn.Linear's output would be
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        dtype = out_ptr.dtype.element_ty
        gate = _rows_dot_x(x_ptr, w_ptr, rows, 0, N, K, stride_wn, K, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K)
        up = _rows_dot_x(x_ptr, w_ptr + N * stride_wn, rows, 0, N, K, stride_wn, K, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K)
        gate = gate.to(dtype).to(tl.float32)
        up = up.to(dtype).to(tl.float32)
        h = gate * tl.sigmoid(gate) * up
        if EVEN_N:
            tl.store(out_ptr + rows, h.to(dtype))
        else:
            tl.store(out_ptr + rows, h.to(dtype), mask=rows < N)


def _geometry(N, K, split_k, block_n, block_k):
    """Columns per split, rounded up to whole tiles, and whether no tile needs a mask."""
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    return k_per_split, N % block_n == 0, k_per_split * split_k == K


def launch_gemv_partials(x, weight, out, split_k, block_n, block_k, num_warps):
    """Run the kernel: x (K,) contiguous, weight (N, K) with unit column stride, out (split_k, N) fp32."""
    N, K = weight.shape
    k_per_split, even_n, even_k = _geometry(N, K, split_k, block_n, block_k)
    grid = (triton.cdiv(N, block_n), split_k)
    _gemv_partials_kernel[grid](x, weight, out, N, K, weight.stride(0), K_PER_SPLIT=k_per_split,
                                BLOCK_N=block_n, BLOCK_K=block_k, EVEN_N=even_n, EVEN_K=even_k, num_warps=num_warps)
    return out


@torch.library.custom_op("decode::gemv_partials", mutates_args=())
def gemv_partials(x: torch.Tensor, weight: torch.Tensor, split_k: int, block_n: int, block_k: int,
                  num_warps: int) -> torch.Tensor:
    """x (K,), weight (N, K) -> (split_k, N) fp32 partial sums of weight @ x. An opaque op to torch.compile (its
    shape comes from the fake below); inside a CUDA graph its launch is captured like any kernel's."""
    out = torch.empty((split_k, weight.shape[0]), device=x.device, dtype=torch.float32)
    return launch_gemv_partials(x, weight, out, split_k, block_n, block_k, num_warps)


@gemv_partials.register_fake
def _(x, weight, split_k, block_n, block_k, num_warps):
    return x.new_empty((split_k, weight.shape[0]), dtype=torch.float32)


def launch_gemv_swiglu(x, weight, out, split_k, block_n, block_k, num_warps):
    """x (K,), weight (2N, K) = (gate | up), out (N,) in x's dtype <- silu(gate @ x) * (up @ x). One split only
    (the epilogue needs whole sums); split_k is there for tune_gemv's common signature."""
    assert split_k == 1, "the SwiGLU GEMV does not split K"
    N, K = weight.shape[0] // 2, weight.shape[1]
    _gemv_swiglu_kernel[(triton.cdiv(N, block_n),)](x, weight, out, N, weight.stride(0), K=K, BLOCK_N=block_n,
                                                    BLOCK_K=block_k, EVEN_N=N % block_n == 0, EVEN_K=K % block_k == 0,
                                                    num_warps=num_warps)
    return out


@torch.library.custom_op("decode::gemv_swiglu", mutates_args=())
def gemv_swiglu(x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int, num_warps: int) -> torch.Tensor:
    """x (K,), weight (2N, K) stacked (gate | up) -> silu(gate @ x) * (up @ x), (N,) in x's dtype: a SwiGLU
    MLP's first half in one kernel, no partial sums and no separate activation kernel."""
    out = torch.empty(weight.shape[0] // 2, device=x.device, dtype=x.dtype)
    return launch_gemv_swiglu(x, weight, out, 1, block_n, block_k, num_warps)


@gemv_swiglu.register_fake
def _(x, weight, block_n, block_k, num_warps):
    return x.new_empty(weight.shape[0] // 2)


# (split_k, block_n, block_k, num_warps): the candidates tune_gemv times, and the configuration of an untuned DecodeLinear
CANDIDATES = [(s, bn, bk, w) for s in (1, 2, 4, 8) for bn in (4, 8, 16, 32) for bk in (256, 512) for w in (4, 8)
              if bn * bk <= 8192]
DEFAULT = (4, 8, 512, 4)
_TUNED = {}


def _key(weight, kind):
    return (kind, *weight.shape, weight.dtype, torch.cuda.get_device_name(weight.device))


def graph_time_us(launches, reps=10):
    """Mean microseconds per call of zero-argument CUDA callables, replayed back to back as one CUDA graph (as
    in a compiled decode step: no host launch cost, no idle gaps that a per-call timer would count)."""
    for f in launches:
        f()  # compiles, and warms the allocator outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in launches:
            f()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(launches))


def tune_gemv(weight, candidates=None, l2_flush_bytes=256e6, swiglu=False, max_split_k=None):
    """Time each candidate configuration on weights of this one's shape (CUDA) and keep the fastest for its
    (N, K, dtype, GPU). Returns (config, microseconds). Eager: call before torch.compile traces the model.
    swiglu: tune gemv_swiglu (one split) instead; max_split_k: leave out configurations with more splits.

    The candidates run on enough copies of the weight (l2_flush_bytes in all) that the L2 cache never holds
    the one being read, as in decoding, where every weight is read once per token."""
    limit = 1 if swiglu else (max_split_k or CANDIDATES[-1][0])
    key = (*_key(weight, "swiglu" if swiglu else "partials"), limit)
    if key in _TUNED:
        return _TUNED[key]
    N, K = weight.shape
    copies = max(2, int(l2_flush_bytes // weight.nbytes))
    ws = [torch.randn_like(weight) for _ in range(copies)]
    x = torch.randn(K, device=weight.device, dtype=weight.dtype)
    launch = launch_gemv_swiglu if swiglu else launch_gemv_partials
    best = (None, float("inf"))
    for cfg in candidates or CANDIDATES:
        if cfg[2] > K or cfg[0] > limit:
            continue
        out = (torch.empty(N // 2, device=weight.device, dtype=weight.dtype) if swiglu else
               torch.empty((cfg[0], N), device=weight.device, dtype=torch.float32))
        t = graph_time_us([functools.partial(launch, x, w, out, *cfg) for w in ws])
        if t < best[1]:
            best = (cfg, t)
    if best[0] is None:  # K smaller than every candidate's tile: one tile of K columns
        best = ((1, 16, max(16, triton.next_power_of_2(K)), 4), None)
    _TUNED[key] = best
    return best


def gemv(x, weight, config=DEFAULT):
    """weight @ x for an x with exactly one row: (..., K) -> (..., N) in x's dtype (CUDA, Triton).
    config: (split_k, block_n, block_k, num_warps), e.g. from tune_gemv."""
    N, K = weight.shape
    part = gemv_partials(x.reshape(K), weight, config[0], config[1], config[2], config[3])  # (split_k, N) fp32
    return sum_partials(part).to(x.dtype).view(*x.shape[:-1], N)


def sum_partials(part):
    """(S, N) -> (N,): the split-K partials added row by row. Pointwise adds, where part.sum(0) would be a
    reduction: inductor fuses them into the consumer's kernel (RMSNorm, SwiGLU) instead of launching its own."""
    y = part[0]
    for s in range(1, part.shape[0]):
        y = y + part[s]
    return y


class DecodeLinear(nn.Linear):
    """A bias-free nn.Linear whose one-row calls on CUDA go to the GEMV kernel; all others are nn.Linear's.
    gemv_config is the kernel's tile configuration (set by use_gemv), a constant for torch.compile;
    swiglu_config, when use_gemv sets it, that of swiglu(), for a stacked (gate | up) weight."""

    gemv_config = DEFAULT
    swiglu_config = None
    kernel_devices = ("cuda",)  # the tests add "cpu" to run the kernel in Triton's interpreter

    def runs_kernel(self, x):
        """One row, on a device the kernel runs on, with a row-major weight."""
        return x.device.type in self.kernel_devices and x.numel() == self.in_features and self.weight.stride(1) == 1

    def runs_swiglu(self, x):
        return self.swiglu_config is not None and self.runs_kernel(x)

    def forward(self, x):
        if self.runs_kernel(x):
            return gemv(x, self.weight, self.gemv_config)
        return F.linear(x, self.weight, self.bias)

    def swiglu(self, x):
        """silu(gate) * up of this (gate | up) projection of one row x, in one kernel: (..., K) -> (..., N / 2)."""
        cfg = self.swiglu_config  # indexed, not unpacked: dynamo cannot iterate a module attribute's tuple here
        y = gemv_swiglu(x.reshape(self.in_features), self.weight, cfg[1], cfg[2], cfg[3])
        return y.view(*x.shape[:-1], self.out_features // 2)


def use_gemv(model, tune=True, max_split_k=None, swiglu=()):
    """Turn every bias-free nn.Linear of model into a DecodeLinear (same parameters, same names) and, on CUDA,
    tune the kernel for each distinct weight shape. Returns {"NxK" (+ " split<=S" / " swiglu"): (config,
    microseconds)}, or None (with a warning, the model left as it was) when Triton is missing or the kernel
    fails on this GPU.

    max_split_k: {attribute name: most splits}, e.g. for projections whose partial sums one program must add
    up (an RMSNorm of a single row) and where each extra split costs more there than it saves in the GEMV.
    swiglu: attribute names of stacked (gate | up) projections to tune DecodeLinear.swiglu for too."""
    if triton is None:
        warnings.warn("no Triton: decoding keeps nn.Linear (pip install triton; CUDA builds of PyTorch ship it)")
        return None
    max_split_k = max_split_k or {}
    swapped = [(name.rsplit(".", 1)[-1], m) for name, m in model.named_modules()
               if type(m) is nn.Linear and m.bias is None]
    for _, m in swapped:
        m.__class__ = DecodeLinear
    report = {}
    try:
        for attr, m in swapped:
            if attr in swiglu:
                m.swiglu_config = (1, 16, 256, 4)  # untuned (CPU): a tile that fits the tests' tiny models
            if not (m.weight.is_cuda and tune):
                continue
            # a SwiGLU projection's one-row calls all go to swiglu(): only that kernel is tuned for it
            limit = max_split_k.get(attr)
            key = "x".join(map(str, m.weight.shape)) + (" swiglu" if attr in swiglu else
                                                         f" split<={limit}" if limit else "")
            if key not in report:
                report[key] = tune_gemv(m.weight, swiglu=attr in swiglu, max_split_k=limit)
            if attr in swiglu:
                m.swiglu_config = report[key][0]
            else:
                m.gemv_config = report[key][0]
    except Exception as e:  # pragma: no cover - depends on the GPU and its Triton
        for _, m in swapped:
            m.__class__ = nn.Linear
        warnings.warn(f"the GEMV kernel failed on this GPU ({type(e).__name__}: {e}); decoding keeps nn.Linear")
        return None
    return report
