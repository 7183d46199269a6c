"""Batch top-k of fp32 logits in two Triton kernels, for the decode sampler (utils/sampling.py).

torch.topk(logits, K) on a (B, 32000) row with K = 114 is about twelve small kernels on CUDA (radix-select
passes, a scan, a sort of the result), ~47 us a step inside a CUDA graph on an H200; these two take 10 us.
Each logit becomes one int64 key whose descending order is the logits' (value, then lower index: _keys), and
bitonic networks on those keys (tl.sort's hypercube form: registers, warp shuffles, a little shared memory) do:

  1. grid (n_chunks, B): each program keeps its chunk's K_PAD largest keys (K_PAD = k rounded up to a power
     of 2), sorted: runs of K_PAD sorted, then halved by "elementwise max of two runs sorted in opposite
     directions (their K_PAD largest, as a bitonic sequence) + a log2(K_PAD)-step bitonic merge" until one
     is left. -> workspace (B, n_chunks, K_PAD), the lists in the directions stage 2 pairs them in.
  2. grid (B,): one program halves a row's n_chunks lists the same way (no sort from scratch: log2(K_PAD)
     steps a halving) and stores the first k keys, decoded to (value, index).

    values, indices = topk(logits, k)   # logits (B, V) fp32 -> (B, k) fp32, (B, k) int64; as torch.topk

Differences from torch.topk (largest=True, sorted=True), all among equal values:
  - ties are deterministic: of equal values the LOWER index is chosen, and comes first;
  - -0.0 and +0.0 are equal (a tie), and a -0.0 logit is returned as +0.0;
  - NaN ranks above +inf, as in torch.topk; every NaN is returned as one canonical NaN (0x7FFFFFFF), lower
    index first.
-inf is an ordinary value (the sampler's banned tokens): k may exceed the number of finite logits.
An opaque custom op to torch.compile (shape from the fake); in a CUDA graph its two launches are captured.
Off CUDA (unless Triton's interpreter runs, TRITON_INTERPRET=1: tests/test_topk.py), without Triton, for
other dtypes, for fewer than MIN_VOCAB logits, or where k is too large for the kernels' registers
(MAX_CANDIDATES, MAX_CHUNK), it is torch.topk.
"""
import os

import torch

from kernels.launch import cdiv, gdc_launch_dependents, gdc_wait, launch_options, next_power_of_2, tl, triton

# V = 32000, k = 114 (K_PAD 128): 16 chunks of 2048 (the last ragged), stage 2 merges 16 * 128 = 2048 keys.
# The chain of dependent compare-exchange steps is the same for any CHUNK (28 to sort runs of 128, then 7
# per halving); CHUNK moves work between stage 1's parallel programs and stage 2's single one, which is
# instruction-bound. Timed on an H200 in a CUDA graph (V = 32000, k = 114, both kernels, PDL on), of
# CHUNK 512/1024/2048/4096 x 4/8/16 warps each: 2048 at 8 and 8 warps 10.0 us (stage 1 6.7 us, stage 2
# 3.4 us alone), 1024 at 4 and 16 10.8 us, 1024 at 8 and 8 11.5 us (stage 2 6.6 us), 4096 12.5 us or more,
# 512 15 us or more; torch.topk 47 us.
CHUNK = 2048
STAGE1_WARPS, STAGE2_WARPS = 8, 8
# below this many logits torch.topk is a kernel or two and the pair of kernels here does not pay: nano Coeus
# (65 characters) decoded 1.5 % slower with them on an H200
MIN_VOCAB = 4096
MAX_CANDIDATES = 8192  # keys stage 2 holds (n_chunks rounded up to a power of 2, times K_PAD): 32 a thread
MAX_CHUNK = 8192       # keys a stage-1 program holds; larger vocabularies get longer chunks, up to this


if triton is not None:
    PAD = tl.constexpr(-2 ** 63)  # below every logit's key: masked tails and missing lists

    @triton.jit
    def _keys(x, offs):
        # fp32 logits -> int64 keys, (ordered bits << 32) | ~index: descending keys = descending values, then
        # ascending index. The bit trick flips the magnitude bits of negatives, so signed int32 order is the
        # float order; NaN becomes the largest pattern (torch.topk ranks it first), -0.0 becomes +0.0.
        b = x.to(tl.int32, bitcast=True)
        b = tl.where(x != x, 0x7FFFFFFF, tl.where(x == 0.0, 0, b))
        b = b ^ ((b >> 31) & 0x7FFFFFFF)
        return (b.to(tl.int64) << 32) | (~offs).to(tl.uint32).to(tl.int64)

    # Bitonic networks on a hypercube: keys reshaped to (2,) * N_DIMS, one axis per bit of the position, the
    # J-th innermost axis for bit J (tl.sort's form: Triton keeps it in registers and warp shuffles).

    @triton.jit
    def _indicator(N_DIMS: tl.constexpr, J: tl.constexpr):
        # (bit J of the position): 0/1 along the J-th innermost axis, broadcast along the others
        return tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - J - 1) + [2] + [1] * J)

    @triton.jit
    def _merge(h, N_DIMS: tl.constexpr, STAGE: tl.constexpr, DIR_BIT: tl.constexpr):
        # runs of 2**STAGE keys (the STAGE innermost axes), each bitonic -> each sorted: ascending where bit
        # DIR_BIT of the position is 0, descending where it is 1; descending everywhere if DIR_BIT < STAGE
        if DIR_BIT < STAGE:
            flip = 1
        else:
            flip = _indicator(N_DIMS, DIR_BIT)
        for s in tl.static_range(STAGE):
            # compare-exchange at distance 2**(STAGE-1-s), along the axis of that bit; the partner is the pair's
            # sum less oneself (int64 wraps; tl.sum rather than tl.sort's xor_sum, which Triton's interpreter
            # runs one element at a time in Python)
            y = tl.sum(h, N_DIMS - STAGE + s, keep_dims=True) - h
            h = tl.where((h > y) != (flip ^ _indicator(N_DIMS, STAGE - 1 - s)), y, h)
        return h

    @triton.jit
    def _top_run(h, N_DIMS: tl.constexpr, LOG_K: tl.constexpr):
        # runs of 2**LOG_K sorted keys, run r ascending if r < half the runs and descending otherwise ->
        # (2,) * LOG_K: the 2**LOG_K largest keys, descending. The elementwise max of an ascending and a
        # descending run is their 2**LOG_K largest keys as a bitonic sequence: a halving costs one max and one
        # merge of LOG_K steps. Runs pair by the top bit (axis 0) of their index: Triton tends to keep the top
        # axes in registers, where the max is free and leaves no copies in other threads to keep merging
        for s in tl.static_range(N_DIMS - LOG_K):
            h = _merge(tl.max(h, axis=0), N_DIMS - 1 - s, LOG_K, N_DIMS - 2 - s)
        return h

    @triton.jit
    def _topk_chunks_kernel(logits_ptr, ws_ptr, V, half, CHUNK: tl.constexpr, LOG_CHUNK: tl.constexpr,
                            K_PAD: tl.constexpr, LOG_K: tl.constexpr, PDL: tl.constexpr):
        # program (c, b): logits[b, c*CHUNK : (c+1)*CHUNK] -> ws[b, c, :] its K_PAD largest keys, ascending
        # for c < half (= ROWS / 2, stage 2's _top_run pairs list c with c + half), else descending
        c = tl.program_id(0)
        b = tl.program_id(1)
        if PDL:  # programmatic dependent launch (kernels/launch.py): stage 2 may start and wait for this one
            gdc_launch_dependents()
            gdc_wait()
        offs = c * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(logits_ptr + b.to(tl.int64) * V + offs, mask=offs < V, other=0.0)
        h = tl.reshape(tl.where(offs < V, _keys(x, offs), PAD), [2] * LOG_CHUNK)
        for stage in tl.static_range(1, LOG_K):                         # sorted runs of K_PAD / 2
            h = _merge(h, LOG_CHUNK, stage, stage)
        h = _merge(h, LOG_CHUNK, LOG_K, LOG_CHUNK - 1)                  # sorted runs of K_PAD
        top = tl.reshape(_top_run(h, LOG_CHUNK, LOG_K), [K_PAD])
        j = tl.arange(0, K_PAD)
        j = tl.where(c < half, K_PAD - 1 - j, j)
        tl.store(ws_ptr + (b * tl.num_programs(0) + c).to(tl.int64) * K_PAD + j, top)

    @triton.jit
    def _topk_merge_kernel(ws_ptr, values_ptr, indices_ptr, n_chunks, k, K_PAD: tl.constexpr,
                           LOG_K: tl.constexpr, ROWS: tl.constexpr, LOG_ROWS: tl.constexpr, PDL: tl.constexpr):
        # program b: ws[b] (n_chunks sorted lists of K_PAD keys; ROWS = n_chunks rounded up to a power of 2,
        # the missing lists are PAD) -> values[b, :k], indices[b, :k]
        b = tl.program_id(0).to(tl.int64)
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        r = tl.arange(0, ROWS)[:, None]
        j = tl.arange(0, K_PAD)[None, :]
        keys = tl.load(ws_ptr + (b * n_chunks + r) * K_PAD + j, mask=r < n_chunks, other=PAD)  # (ROWS, K_PAD)
        keys = tl.reshape(_top_run(tl.reshape(keys, [2] * (LOG_ROWS + LOG_K)), LOG_ROWS + LOG_K, LOG_K), [K_PAD])
        o = (keys >> 32).to(tl.int32)
        bits = o ^ ((o >> 31) & 0x7FFFFFFF)                              # _keys' bit trick is its own inverse
        idx = ~keys.to(tl.int32)
        j = tl.arange(0, K_PAD)
        tl.store(values_ptr + b * k + j, bits.to(tl.float32, bitcast=True), mask=j < k)
        tl.store(indices_ptr + b * k + j, idx.to(tl.int64), mask=j < k)


def triton_topk_available(device) -> bool:
    """Whether topk runs the Triton kernels for tensors on this device: CUDA with Triton, or any device under
    Triton's CPU interpreter (TRITON_INTERPRET=1, read when the kernels are defined: tests only)."""
    device = torch.device(device)
    return triton is not None and (device.type == "cuda" or bool(os.environ.get("TRITON_INTERPRET")))


def _geometry(V, k):
    """(chunk, n_chunks, K_PAD, ROWS) of a (B, V) problem, ROWS = n_chunks rounded up to a power of 2: chunks
    of CHUNK, longer where stage 2 would hold more than MAX_CANDIDATES keys; None if that takes a chunk
    longer than MAX_CHUNK."""
    k_pad = max(2, next_power_of_2(k))  # a hypercube needs an axis
    max_rows = max(1, MAX_CANDIDATES // k_pad)
    chunk = max(CHUNK, k_pad, next_power_of_2(cdiv(V, max_rows)))
    if chunk > MAX_CHUNK:
        return None
    n_chunks = cdiv(V, chunk)
    return chunk, n_chunks, k_pad, next_power_of_2(n_chunks)


@torch.library.custom_op("decode::topk", mutates_args=())
def topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) fp32 -> (values (B, k) fp32, indices (B, k) int64), descending: torch.topk(logits, k)'s
    contract, with ties among equal values to the lower index (see the module's docstring)."""
    B, V = logits.shape
    kernels = (triton_topk_available(logits.device) and logits.dtype == torch.float32 and 0 < k <= V
               and V >= MIN_VOCAB)
    geometry = _geometry(V, k) if kernels else None
    if geometry is None:
        return torch.topk(logits, k)
    chunk, n_chunks, k_pad, rows = geometry
    logits = logits.contiguous()
    ws = torch.empty((B, n_chunks, k_pad), device=logits.device, dtype=torch.int64)
    values = torch.empty((B, k), device=logits.device, dtype=torch.float32)
    indices = torch.empty((B, k), device=logits.device, dtype=torch.int64)
    log_k = k_pad.bit_length() - 1
    _topk_chunks_kernel[(n_chunks, B)](logits, ws, V, rows // 2, CHUNK=chunk, LOG_CHUNK=chunk.bit_length() - 1,
                                       K_PAD=k_pad, LOG_K=log_k, **launch_options(logits, STAGE1_WARPS))
    _topk_merge_kernel[(B,)](ws, values, indices, n_chunks, k, K_PAD=k_pad, LOG_K=log_k, ROWS=rows,
                             LOG_ROWS=rows.bit_length() - 1, **launch_options(logits, STAGE2_WARPS))
    return values, indices


@topk.register_fake
def _(logits, k):
    B = logits.shape[0]
    return logits.new_empty((B, k)), logits.new_empty((B, k), dtype=torch.int64)
