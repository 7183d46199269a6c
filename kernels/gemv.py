"""Matrix-vector products for batch-1 decoding: Triton GEMVs that torch.compile and CUDA graphs see.

At batch 1 every nn.Linear of a decode step is y = W x with one row x: the time is the bytes of W over
memory bandwidth, and the kernels torch.compile or cuBLAS pick reach 38-66 % of it on an H200 for
TinyLlama's shapes (benchmarks/bench_decode.py). These kernels stream W in (BLOCK_N, BLOCK_K) tiles, fp32
products accumulated per tile, and come in four kinds, each a torch.library.custom_op:

    gemv_partials(x, W, ...)            # (SPLIT_K, N) fp32 partial sums: K split over SPLIT_K programs when N
                                        # alone gives too few; the sum fuses into whatever reads them
    gemv_partials(h, W, ..., ss, g)     # the same of RMSNorm(h) (weight g): the norm in the GEMV's prologue
    gemv_swiglu(h, W_gate_up, ..., ss, g)   # silu(gate) * up of RMSNorm(h), in the epilogue
    gemv_residual(x, W, h)              # (h + W x, the parts of its sum of squares): the residual add in the
                                        # epilogue, and the statistic the next RMSNorm prologue needs

so a Llama layer needs no norm, add or activation kernel of its own (kernels/fused_decode.py). On Hopper the
kernels are programmatic dependent launches (kernels/launch.py): each is scheduled while the one before
finishes.

    use_gemv(model, kinds={"o_proj": "residual", ...})  # nn.Linears become DecodeLinears, tuned
    y = gemv(x, weight)                                   # x (..., K) with one row -> (..., N), x's dtype

The tile configuration is chosen per (N, K, dtype, GPU, kind) once, eagerly, by timing a few candidates
(tune_gemv), and kept on disk for the next process (kernels/tune_cache.py); the compiled graph then carries it
as constants. Off CUDA, with several rows, or without
Triton, DecodeLinear is nn.Linear. tests/test_gemv.py runs the kernels in Triton's CPU interpreter against
float64 references.
"""
import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import tune_cache
from kernels.launch import (cdiv, compile_in_parallel, gdc_launch_dependents, gdc_wait, launch_options, next_power_of_2,
                            tl, triton)


if triton is not None:
    @triton.jit
    def _rms_scale(ss_ptr, n_ss, K, eps, N_SS: tl.constexpr):
        # 1 / sqrt(mean of squares + eps) of a K-vector whose squares the producing kernel summed in n_ss parts
        i = tl.arange(0, N_SS)
        ss = tl.load(ss_ptr + i, mask=i < n_ss, other=0.0)
        return tl.rsqrt(tl.sum(ss, axis=0) / K + eps)

    @triton.jit
    def _w_tile(w_rows, rows, cols, N, K, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
        # a (BLOCK_N, BLOCK_K) tile of W; W is read once, so it goes first out of L2 (x stays)
        if EVEN_N and EVEN_K:
            return tl.load(w_rows + cols[None, :], eviction_policy="evict_first")
        return tl.load(w_rows + cols[None, :], mask=(rows[:, None] < N) & (cols < K)[None, :], other=0.0,
                       eviction_policy="evict_first")

    @triton.jit
    def _x_tile(x_ptr, g_ptr, cols, K, rms_scale, EVEN_K: tl.constexpr, NORM: tl.constexpr):
        # the operand's columns cols in fp32: x, or (NORM) its RMSNorm g * (x * rms_scale), rounded as RMSNorm's
        # output is (to x's dtype after the scaling and after the weight)
        if EVEN_K:
            x = tl.load(x_ptr + cols)
        else:
            x = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
        if NORM:
            if EVEN_K:
                g = tl.load(g_ptr + cols)
            else:
                g = tl.load(g_ptr + cols, mask=cols < K, other=0.0)
            x = (g.to(tl.float32) * (x.to(tl.float32) * rms_scale).to(x.dtype).to(tl.float32)).to(x.dtype)
        return x.to(tl.float32)

    @triton.jit
    def _rows_dot_x(x_ptr, w_ptr, rows, pid_s, N, K, stride_wn, K_PER_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, NORM: tl.constexpr,
                    ss_ptr, n_ss, g_ptr, eps, N_SS: tl.constexpr, WAIT: tl.constexpr, PREFETCH: tl.constexpr):
        # rows (BLOCK_N,) of W times x over columns [pid_s*K_PER_SPLIT, (pid_s+1)*K_PER_SPLIT) -> (BLOCK_N,) fp32;
        # NORM: times x's RMSNorm. WAIT (programmatic dependent launch): wait here for the kernel that wrote x
        # and the statistic; PREFETCH: ask for the first tile of W before that wait, since W is no kernel's
        # output, so a program scheduled during the previous kernel's tail streams weights instead of idling
        w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn
        cols = pid_s * K_PER_SPLIT + tl.arange(0, BLOCK_K)
        if PREFETCH:
            w = _w_tile(w_rows, rows, cols, N, K, EVEN_N, EVEN_K)
        if WAIT:
            gdc_wait()
        if not PREFETCH:
            w = _w_tile(w_rows, rows, cols, N, K, EVEN_N, EVEN_K)
        rms_scale = _rms_scale(ss_ptr, n_ss, K, eps, N_SS) if NORM else 1.0
        # (BLOCK_N, BLOCK_K) products, reduced once after the loop
        acc = w.to(tl.float32) * _x_tile(x_ptr, g_ptr, cols, K, rms_scale, EVEN_K, NORM)[None, :]
        for k0 in range(BLOCK_K, K_PER_SPLIT, BLOCK_K):
            cols = pid_s * K_PER_SPLIT + k0 + tl.arange(0, BLOCK_K)
            w = _w_tile(w_rows, rows, cols, N, K, EVEN_N, EVEN_K)
            acc += w.to(tl.float32) * _x_tile(x_ptr, g_ptr, cols, K, rms_scale, EVEN_K, NORM)[None, :]
        return tl.sum(acc, axis=1)

    @triton.jit
    def _gemv_partials_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_wn, ss_ptr, n_ss, g_ptr, eps,
                              K_PER_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, NORM: tl.constexpr, N_SS: tl.constexpr,
                              PREFETCH: tl.constexpr, PDL: tl.constexpr):
        # program (n, s): rows [n*BLOCK_N, (n+1)*BLOCK_N) of W times x (NORM: times RMSNorm(x)) over the s-th
        # split of the columns
        if PDL:  # the next kernel may be scheduled now; this one waits for its inputs in _rows_dot_x
            gdc_launch_dependents()
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        y = _rows_dot_x(x_ptr, w_ptr, rows, pid_s, N, K, stride_wn, K_PER_SPLIT, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K,
                        NORM, ss_ptr, n_ss, g_ptr, eps, N_SS, PDL, PREFETCH)
        if EVEN_N:
            tl.store(out_ptr + pid_s * N + rows, y)
        else:
            tl.store(out_ptr + pid_s * N + rows, y, mask=rows < N)

    @triton.jit
    def _gemv_residual_kernel(x_ptr, w_ptr, res_ptr, out_ptr, ss_ptr, N, stride_wn, K: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                              PREFETCH: tl.constexpr, PDL: tl.constexpr):
        # program n: rows [n*BLOCK_N, (n+1)*BLOCK_N) of residual + W x over all of K (the projection rounded to
        # the dtype, then the sum, as `h + o_proj(a)` rounds them), and the sum of their squares: the next
        # RMSNorm's statistic, finished by its consumer (_rms_scale) without a kernel of its own
        if PDL:
            gdc_launch_dependents()
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        dtype = out_ptr.dtype.element_ty
        y = _rows_dot_x(x_ptr, w_ptr, rows, 0, N, K, stride_wn, K, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K,
                        False, x_ptr, 1, x_ptr, 0.0, 1, PDL, PREFETCH)
        if EVEN_N:
            res = tl.load(res_ptr + rows)
        else:
            res = tl.load(res_ptr + rows, mask=rows < N, other=0.0)
        h = (res.to(tl.float32) + y.to(dtype).to(tl.float32)).to(dtype)
        hf = h.to(tl.float32)
        if EVEN_N:
            tl.store(out_ptr + rows, h)
        else:
            tl.store(out_ptr + rows, h, mask=rows < N)
            hf = tl.where(rows < N, hf, 0.0)
        tl.store(ss_ptr + pid, tl.sum(hf * hf, axis=0))

    @triton.jit
    def _gemv_swiglu_kernel(x_ptr, w_ptr, out_ptr, N, stride_wn, ss_ptr, n_ss, g_ptr, eps, K: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                            NORM: tl.constexpr, N_SS: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr):
        # W = (gate | up) stacked, (2N, K): program n does rows [n*BLOCK_N, (n+1)*BLOCK_N) of both over all of K
        # and writes silu(gate) * up, each product rounded to x's dtype first as nn.Linear's output would be
        if PDL:
            gdc_launch_dependents()
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        dtype = out_ptr.dtype.element_ty
        gate = _rows_dot_x(x_ptr, w_ptr, rows, 0, N, K, stride_wn, K, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K,
                           NORM, ss_ptr, n_ss, g_ptr, eps, N_SS, PDL, PREFETCH)
        up = _rows_dot_x(x_ptr, w_ptr + N * stride_wn, rows, 0, N, K, stride_wn, K, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K,
                         NORM, ss_ptr, n_ss, g_ptr, eps, N_SS, False, PREFETCH)
        gate = gate.to(dtype).to(tl.float32)
        up = up.to(dtype).to(tl.float32)
        h = gate * tl.sigmoid(gate) * up
        if EVEN_N:
            tl.store(out_ptr + rows, h.to(dtype))
        else:
            tl.store(out_ptr + rows, h.to(dtype), mask=rows < N)


# request each program's first tile of W before waiting for the kernel before (programmatic dependent launch);
# False waits first, as before (bench_decode.py --gemv-prefetch both times the two in one run)
PREFETCH_W = True


def _options(x, num_warps):
    return dict(**launch_options(x, num_warps), PREFETCH=PREFETCH_W)


def _geometry(N, K, split_k, block_n, block_k):
    """Columns per split, rounded up to whole tiles, and whether no tile needs a mask."""
    k_per_split = cdiv(cdiv(K, split_k), block_k) * block_k
    return k_per_split, N % block_n == 0, k_per_split * split_k == K


def _norm_args(x, norm):
    """Kernel arguments of the RMSNorm prologue: norm = (ss, weight, eps) or None (unused pointers then)."""
    if norm is None:
        return dict(ss_ptr=x, n_ss=1, g_ptr=x, eps=0.0, NORM=False, N_SS=1)
    ss, g, eps = norm
    return dict(ss_ptr=ss, n_ss=ss.numel(), g_ptr=g, eps=eps, NORM=True, N_SS=next_power_of_2(ss.numel()))


def launch_gemv_partials(x, weight, out, split_k, block_n, block_k, num_warps, norm=None):
    """Run the kernel: x (K,) contiguous, weight (N, K) with unit column stride, out (split_k, N) fp32.
    norm: (ss, g, eps) to multiply RMSNorm(x) (weight g, x's squares summed in the parts ss) instead of x."""
    N, K = weight.shape
    k_per_split, even_n, even_k = _geometry(N, K, split_k, block_n, block_k)
    grid = (cdiv(N, block_n), split_k)
    _gemv_partials_kernel[grid](x, weight, out, N, K, weight.stride(0), **_norm_args(x, norm), K_PER_SPLIT=k_per_split,
                                BLOCK_N=block_n, BLOCK_K=block_k, EVEN_N=even_n, EVEN_K=even_k,
                                **_options(x, num_warps))
    return out


def _norm(ss, norm_weight, eps):
    return None if ss is None else (ss, norm_weight, eps)


@torch.library.custom_op("decode::gemv_partials", mutates_args=())
def gemv_partials(x: torch.Tensor, weight: torch.Tensor, split_k: int, block_n: int, block_k: int, num_warps: int,
                  ss: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                  eps: float = 0.0) -> torch.Tensor:
    """x (K,), weight (N, K) -> (split_k, N) fp32 partial sums of weight @ x. An opaque op to torch.compile (its
    shape comes from the fake below); inside a CUDA graph its launch is captured like any kernel's.
    With ss (the parts of x's sum of squares, from gemv_residual) and norm_weight: weight @ RMSNorm(x)."""
    out = torch.empty((split_k, weight.shape[0]), device=x.device, dtype=torch.float32)
    return launch_gemv_partials(x, weight, out, split_k, block_n, block_k, num_warps, _norm(ss, norm_weight, eps))


@gemv_partials.register_fake
def _(x, weight, split_k, block_n, block_k, num_warps, ss=None, norm_weight=None, eps=0.0):
    return x.new_empty((split_k, weight.shape[0]), dtype=torch.float32)


def launch_gemv_swiglu(x, weight, out, split_k, block_n, block_k, num_warps, norm=None):
    """x (K,), weight (2N, K) = (gate | up), out (N,) in x's dtype <- silu(gate @ x) * (up @ x). One split only
    (the epilogue needs whole sums); split_k is there for tune_gemv's common signature. norm: as for
    launch_gemv_partials."""
    assert split_k == 1, "the SwiGLU GEMV does not split K"
    N, K = weight.shape[0] // 2, weight.shape[1]
    _gemv_swiglu_kernel[(cdiv(N, block_n),)](x, weight, out, N, weight.stride(0), **_norm_args(x, norm), K=K,
                                             BLOCK_N=block_n, BLOCK_K=block_k, EVEN_N=N % block_n == 0,
                                             EVEN_K=K % block_k == 0, **_options(x, num_warps))
    return out


@torch.library.custom_op("decode::gemv_swiglu", mutates_args=())
def gemv_swiglu(x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int, num_warps: int,
                ss: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                eps: float = 0.0) -> torch.Tensor:
    """x (K,), weight (2N, K) stacked (gate | up) -> silu(gate @ x) * (up @ x), (N,) in x's dtype: a SwiGLU
    MLP's first half in one kernel, no partial sums and no separate activation kernel. ss/norm_weight/eps: of
    RMSNorm(x) instead of x, as for gemv_partials."""
    out = torch.empty(weight.shape[0] // 2, device=x.device, dtype=x.dtype)
    return launch_gemv_swiglu(x, weight, out, 1, block_n, block_k, num_warps, _norm(ss, norm_weight, eps))


@gemv_swiglu.register_fake
def _(x, weight, block_n, block_k, num_warps, ss=None, norm_weight=None, eps=0.0):
    return x.new_empty(weight.shape[0] // 2)


def launch_gemv_residual(x, weight, residual, out, ss, block_n, block_k, num_warps):
    """out (N,) <- residual + weight @ x in x's dtype, ss (cdiv(N, block_n),) fp32 <- its sum of squares in
    parts; x (K,), weight (N, K), residual (N,)."""
    N, K = weight.shape
    _gemv_residual_kernel[(cdiv(N, block_n),)](x, weight, residual, out, ss, N, weight.stride(0), K=K,
                                               BLOCK_N=block_n, BLOCK_K=block_k, EVEN_N=N % block_n == 0,
                                               EVEN_K=K % block_k == 0, **_options(x, num_warps))
    return out, ss


@torch.library.custom_op("decode::gemv_residual", mutates_args=())
def gemv_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, block_n: int, block_k: int,
                  num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (K,), weight (N, K), residual (N,) -> (residual + weight @ x, the parts of its sum of squares): a
    projection into the residual stream that also leaves the next RMSNorm's statistic, so that norm runs in
    its consumer's prologue (gemv_partials / gemv_swiglu with ss) and the residual add has no kernel either."""
    N = weight.shape[0]
    out = torch.empty(N, device=x.device, dtype=x.dtype)
    ss = torch.empty(cdiv(N, block_n), device=x.device, dtype=torch.float32)
    return launch_gemv_residual(x, weight, residual, out, ss, block_n, block_k, num_warps)


@gemv_residual.register_fake
def _(x, weight, residual, block_n, block_k, num_warps):
    N = weight.shape[0]
    return x.new_empty(N), x.new_empty(-(-N // block_n), dtype=torch.float32)


# (split_k, block_n, block_k, num_warps): the candidates tune_gemv times, and the configuration of an untuned DecodeLinear
CANDIDATES = [(s, bn, bk, w) for s in (1, 2, 4, 8) for bn in (4, 8, 16, 32) for bk in (256, 512) for w in (4, 8)
              if bn * bk <= 8192]
DEFAULT = (4, 8, 512, 4)
_TUNED = {}


def _key(weight, kind):
    return tune_cache.tune_key("gemv", kind, *weight.shape, weight.dtype, weight.device)


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


KINDS = ("partials", "normed", "swiglu", "residual")  # what a projection runs as: see tune_gemv


def _launcher(kind, x, weight, cfg):
    """A zero-argument launch of kind's kernel with configuration cfg on weight (outputs allocated here)."""
    N, K = weight.shape
    dev, dt = weight.device, weight.dtype
    # an RMSNorm statistic in K/4 parts: what gemv_residual's usual 4-row tiles leave for the next projection
    norm = ((torch.rand(max(1, K // 4), device=dev), torch.randn(K, device=dev, dtype=dt), 1e-5)
            if kind in ("normed", "swiglu") else None)
    if kind == "swiglu":
        return functools.partial(launch_gemv_swiglu, x, weight, torch.empty(N // 2, device=dev, dtype=dt), *cfg,
                                 norm=norm)
    if kind == "residual":
        out, ss = torch.empty(N, device=dev, dtype=dt), torch.empty(cdiv(N, cfg[1]), device=dev)
        return functools.partial(launch_gemv_residual, x, weight, torch.randn(N, device=dev, dtype=dt), out, ss,
                                 *cfg[1:])
    out = torch.empty((cfg[0], N), device=dev, dtype=torch.float32)
    return functools.partial(launch_gemv_partials, x, weight, out, *cfg, norm=norm)


def tune_gemv(weight, kind="partials", candidates=None, l2_flush_bytes=256e6):
    """Time each candidate configuration on weights of this one's shape (CUDA) and keep the fastest for its
    (N, K, dtype, GPU) and kind. Returns (config, microseconds). Eager: call before torch.compile traces the model.
    kind: "partials" (gemv_partials), "normed" (gemv_partials with its RMSNorm prologue), "swiglu" (gemv_swiglu,
    RMSNorm prologue, one split) or "residual" (gemv_residual, one split).

    The candidates run on enough copies of the weight (l2_flush_bytes in all) that the L2 cache never holds
    the one being read, as in decoding, where every weight is read once per token.
    The default candidates' winner is kept on disk (kernels/tune_cache.py: keyed by GPU, torch and Triton
    versions, kind, N, K, dtype), so the next process reads it instead of timing them again; on a miss, a winner
    shipped for this GPU model and shape (kernels/gemv_tuned.json, from benchmarks/tune_gemv.py) is used untimed
    (microseconds None)."""
    assert kind in KINDS, kind
    key = _key(weight, kind)
    if key in _TUNED:
        return _TUNED[key]
    stored = tune_cache.get(key) if candidates is None else None
    best = _stored_config(stored)
    if best is None and candidates is None:  # tuned on this GPU model by benchmarks/tune_gemv.py and shipped
        best = _stored_config({"config": tune_cache.shipped(kind, *weight.shape, weight.dtype, weight.device),
                               "us": None})
    if best is None:
        best = _time_candidates(weight, kind, candidates or CANDIDATES, l2_flush_bytes)
        if candidates is None:
            tune_cache.put(key, {"config": list(best[0]), "us": best[1]})
    _TUNED[key] = best
    return best


def is_tuned(weight, kind):
    """Whether tune_gemv(weight, kind) has its answer without timing: in this process, in the disk cache or shipped."""
    key = _key(weight, kind)
    return (key in _TUNED or _stored_config(tune_cache.get(key)) is not None
            or tune_cache.shipped(kind, *weight.shape, weight.dtype, weight.device) is not None)


def _stored_config(stored):
    """(config, us) from a cache entry, or None if there is none or it is not a 4-int config."""
    try:
        cfg, us = tuple(int(v) for v in stored["config"]), stored["us"]
    except (TypeError, KeyError, ValueError):
        return None
    return (cfg, None if us is None else float(us)) if len(cfg) == 4 else None


def _runnable(kind, K, candidates):
    """The candidates whose K tile fits, and only one split for the kinds that take no split."""
    one_split = kind in ("swiglu", "residual")
    return [cfg for cfg in candidates if cfg[2] <= K and not (one_split and cfg[0] > 1)]


def precompile_candidates(jobs, candidates=None):
    """Compile every candidate kernel of each (weight, kind) in jobs at once, on a pool of threads
    (kernels.launch.compile_in_parallel), so that tuning them then only times them: compilation was most of the
    first tuning's ~40 s on an H200; TinyLlama's five shapes took 12.6 s this way on an H100."""
    with compile_in_parallel():
        for weight, kind in jobs:
            x = torch.empty(weight.shape[1], device=weight.device, dtype=weight.dtype)
            for cfg in _runnable(kind, weight.shape[1], candidates or CANDIDATES):
                _launcher(kind, x, weight, cfg)()


def candidate_times(weight, kind, candidates=None, l2_flush_bytes=256e6):
    """{config: microseconds} of every runnable candidate for weight's shape and kind (CUDA): each replayed in a CUDA
    graph over random weights of that shape, enough copies (l2_flush_bytes in all) that L2 never holds the one read.
    tune_gemv keeps the fastest; benchmarks/tune_gemv.py reports them all."""
    K = weight.shape[1]
    ws = [torch.randn_like(weight) for _ in range(max(2, int(l2_flush_bytes // weight.nbytes)))]
    x = torch.randn(K, device=weight.device, dtype=weight.dtype)
    return {cfg: graph_time_us([_launcher(kind, x, w, cfg) for w in ws])
            for cfg in _runnable(kind, K, candidates or CANDIDATES)}


def _time_candidates(weight, kind, candidates, l2_flush_bytes):
    """The fastest of candidates for weight's shape and kind, (config, microseconds): CUDA-graph timings."""
    times = candidate_times(weight, kind, candidates, l2_flush_bytes)
    if not times:  # K smaller than every candidate's tile: one tile of K columns
        return (1, 16, max(16, next_power_of_2(weight.shape[1])), 4), None
    best = min(times, key=times.get)
    return best, times[best]


def gemv(x, weight, config=DEFAULT, bias=None):
    """weight @ x (+ bias) for an x with exactly one row: (..., K) -> (..., N) in x's dtype (CUDA, Triton).
    config: (split_k, block_n, block_k, num_warps), e.g. from tune_gemv."""
    N, K = weight.shape
    y = sum_partials(gemv_partials(x.reshape(K), weight, config[0], config[1], config[2], config[3]))  # (N,) fp32
    if bias is not None:  # added in fp32, one rounding after it, as nn.Linear's epilogue
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], N)


def sum_partials(part):
    """(S, N) -> (N,): the split-K partials added row by row. Pointwise adds, where part.sum(0) would be a
    reduction: inductor fuses them into the consumer's kernel (e.g. the sampler's, for lm_head) instead of
    launching its own."""
    y = part[0]
    for s in range(1, part.shape[0]):
        y = y + part[s]
    return y


class DecodeLinear(nn.Linear):
    """An nn.Linear whose one-row calls on CUDA go to the GEMV kernel; all others are nn.Linear's.
    gemv_config is the tile configuration (split_k, block_n, block_k, num_warps) use_gemv tuned for the kernel
    this projection runs as (its `kind`), a constant for torch.compile; one split for "swiglu" and "residual".
    Only "partials" and "normed" take a bias (Qwen2's q/k/v): the swiglu and residual kernels have none."""

    gemv_config = DEFAULT
    kind = "partials"
    kernel_devices = ("cuda",)  # the tests add "cpu" to run the kernel in Triton's interpreter

    def kernel_ready(self, device):
        """On a device the kernel runs on, with a row-major weight."""
        return device.type in self.kernel_devices and self.weight.stride(1) == 1

    def runs_kernel(self, x):
        """One row, on a device the kernel runs on, with a row-major weight."""
        return x.numel() == self.in_features and self.kernel_ready(x.device)

    def forward(self, x):
        if self.runs_kernel(x) and self.kind != "swiglu":
            return gemv(x, self.weight, self.gemv_config, self.bias)
        return F.linear(x, self.weight, self.bias)


BIASED_KINDS = ("partials", "normed")  # their sums are finished outside the kernel, where a bias is one add
UNTUNED = {"swiglu": (1, 16, 256, 4), "residual": (1, 16, 256, 4)}  # (CPU) one split, tiles for the tests' tiny models


def use_gemv(model, tune=True, kinds=None):
    """Turn every nn.Linear of model into a DecodeLinear (same parameters, same names; a bias only where the
    projection's kind adds one, "partials" or "normed") and, on CUDA,
    tune the kernel for each distinct (weight shape, kind). Returns {"NxK kind": (config, microseconds)}, or
    None (with a warning, the model left as it was) when Triton is missing or the kernel fails on this GPU.

    kinds: {attribute name: kind}, what each projection runs as in the caller's decode step (tune_gemv's
    kinds, e.g. kernels/fused_decode.py's KINDS); the others are "partials"."""
    if triton is None:
        warnings.warn("no Triton: decoding keeps nn.Linear (pip install triton; CUDA builds of PyTorch ship it)")
        return None
    kinds = kinds or {}
    swapped = [(name.rsplit(".", 1)[-1], m) for name, m in model.named_modules()
               if type(m) is nn.Linear
               and (m.bias is None or kinds.get(name.rsplit(".", 1)[-1], "partials") in BIASED_KINDS)]
    for _, m in swapped:
        m.__class__ = DecodeLinear
    report = {}
    try:
        for attr, m in swapped:
            m.kind = kinds.get(attr, "partials")
            m.gemv_config = UNTUNED.get(m.kind, DEFAULT)
        to_tune = [m for _, m in swapped if m.weight.is_cuda and tune]
        # one (weight, kind) per shape and kind with no configuration in memory or on disk: all their candidates
        # compiled at once, in parallel, before any is timed
        untuned = {(tuple(m.weight.shape), m.weight.dtype, m.kind): (m.weight, m.kind) for m in to_tune
                   if not is_tuned(m.weight, m.kind)}
        if untuned:
            precompile_candidates(untuned.values())
        for m in to_tune:
            key = "x".join(map(str, m.weight.shape)) + " " + m.kind
            if key not in report:
                report[key] = tune_gemv(m.weight, m.kind)
            m.gemv_config = report[key][0]
    except Exception as e:  # pragma: no cover - depends on the GPU and its Triton
        for _, m in swapped:
            m.__class__ = nn.Linear
        warnings.warn(f"the GEMV kernel failed on this GPU ({type(e).__name__}: {e}); decoding keeps nn.Linear")
        return None
    return report
