"""Chunked gated linear attention (one log-decay per head and token) in Triton: forward and backward in four kernels,
beside models/gla.py's plain-PyTorch chunk_gla, which stays the readable reference and the CPU path.

The math (per batch row and head; chunk n of C tokens; b_i = g_1 + ... + g_i, the cumsum WITHIN the chunk; h_n the
Dk x Dv state entering chunk n; q already multiplied by scale):
    h_{n+1} = exp(b_C) h_n + sum_j exp(b_C - b_j) k_j v_j^T
    o_i     = exp(b_i) q_i h_n + sum_{j<=i} (q_i . k_j) exp(b_i - b_j) v_j
The design follows fla's chunk_simple_gla (fla/ops/common/chunk_h.py, chunk_o.py, fla/ops/simple_gla/chunk.py):
  forward   _walk    grid (Dk/BK, Dv/BV, B*H*segments): each segment from zero, its end state; _seg_scan: the
                     state entering each segment; then
            _fwd_ho  grid (Dv/BV, B*H*segments): walks the segment's chunks with the state tile in registers, each
                     chunk's output (q exp(b)) @ h_n + causal((q k^T) * exp(b_i - b_j)) @ v read off on the way, so no
                     chunk's state is written (fla writes every h_n, as large as k, and reads it back);
  backward  _walk    the states again, every h_n written this time (recomputed, not kept: O(T/C) memory between
                     forward and backward);
            _walk    REVERSE over (q, do): dh_n = exp(b_C) dh_{n+1} + (q exp(b))^T do, the gradient of the state
                     LEAVING each chunk, and that of the initial state (both walks segmented as in the forward);
            _bwd_dqkvg grid (N, B*H), whole Dk and Dv in one tile: dq, dk, dv and dg of one chunk.
  by default: _fwd_lookback (FWD_LOOKBACK; GLA_FWD_LOOKBACK=0 for the three launches above) the forward in one
                     launch: each segment walks from zero, takes its entering state from its predecessors by decoupled
                     look-back (CUB's single-pass scan) and walks again while its k and v are still in L2 (the
                     three-launch form reads them twice from memory).
The walks are sequential over chunks; with B*H*tiles programs alone (16 at 2 x 32k, H 4) most of a GPU idles. So
they are cut into segments: every segment walks from a zero state (its own end state and total decay), _seg_scan
carries the true state over the segments (a few dozen steps), and the segments walk again from there. A walk that
fills the GPU alone stays one segment. q, k, v, do are read through their strides (Coeus passes views of one
projection); o, dq, dk, dv are written laid out (B, T, H, D).
dg: with b_t treated as free, dL/db_t = q_t . dq_t - k_t . dk_t, plus, at the chunk's last position,
<dh_{n+1}, h_{n+1}> (the state leaving the chunk scales with exp(b_C)); dg is the reverse cumsum of that inside
the chunk (fla's identity; tests/test_gla_kernel.py checks it against autograd through models.gla.chunk_gla).
Decays only enter as exp(x) with x <= 0 (the causal mask is applied to the exponent, -inf above the diagonal), so a
log-decay of -30 underflows to 0, never to Inf/NaN. Accumulation is fp32 (tl.dot into fp32); score matrices are
rounded to the input dtype before their matmul, as in models/gla.py; fp32 inputs use TF32 dots where PyTorch allows
TF32 for fp32 matmuls (torch.backends.cuda.matmul.allow_tf32, as the scripts set it on CUDA), IEEE fp32 dots otherwise.
A last chunk shorter than C is masked: its missing tokens load as q = k = v = 0 and g = 0.

    o, S = chunk_gla_triton(q, k, v, g, chunk_size=64, initial_state=S0, output_final_state=True)
    use_gla_kernels(model)   # every CUDA CoeusMixer's global_attn goes through the kernels; returns the count

Under torch.compile the launches are torch.library custom ops (gla::chunk_fwd, gla::chunk_bwd, with register_fake),
opaque to it; eager calls skip the custom-op dispatch. Off CUDA (and outside Triton's interpreter) they run
models.gla.chunk_gla instead.
"""
import os

import torch

from kernels.launch import cdiv, kernel_ok, next_power_of_2, point_at_kernel, tl, triton
from models.gla import chunk_gla

BLOCK_K = 64   # Dk tile of _walk
BLOCK_V = 32   # Dv tile of _walk: more programs for the sequential walk over chunks (B*H*Dk/BK*Dv/BV)
BLOCK_VO = 64  # Dv tile of _fwd_ho
# _fwd_ho holds a whole Dk, _bwd_dqkvg the whole Dk and Dv of a chunk in one tile: the largest head (after rounding
# up to a power of 2) whose kernels fit a Hopper's 227 KB of shared memory a program, by bytes per element, compiled
# for sm_90 (tests/test_kernels_sm90.py). bf16 at 256 needs 384 KB in the backward, fp32 at 128 288 KB (an H100
# refused it); larger heads take the PyTorch form (kernels_fit)
MAX_D = {2: 128, 4: 64}
NUM_WARPS = 4
SEG_LEN = None  # chunks per segment of the state walks; None: chosen from the GPU's size (segment_length)
# the forward in one launch, segments chained by decoupled look-back (_fwd_lookback): 0.098 against 0.124 ms for the
# three-launch form at 2 x 4 x 32k on an H100 (session 13). GLA_FWD_LOOKBACK=0: the walk from zero, the scan and
# _fwd_ho (three launches, k and v read twice)
FWD_LOOKBACK = os.environ.get("GLA_FWD_LOOKBACK", "1") == "1"
# segments per row of the look-back forward at most: 4 / 8 / 16 / 32 / 64 took 0.42 / 0.22 / 0.12 / 0.099 / 0.109 ms
# at 2 x 4 x 32k on an H100 (session 13): more programs matter more than the longer look-back chains
LOOKBACK_MAX_SEGMENTS = 32
MIN_SEG = 4     # chunks per segment at least: more segments make the scan between the two walks longer
SCAN_BLOCK = 256  # state elements per program of the scan over segments
NUM_WARPS_BWD = 8  # _bwd_dqkvg keeps ~7 (C, C)/(C, D) fp32 tiles live: 4 warps would spill at C = D = 64 (untuned)

if triton is not None:
    @triton.jit
    def _state_tile(i_k, i_v, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr):
        # the (BK, BV) tile (i_k, i_v) of a (DK, DV) state: key and value rows, the chunk's positions, masks and
        # the tile's offsets in a row-major state
        rk = i_k * BK + tl.arange(0, BK)
        rv = i_v * BV + tl.arange(0, BV)
        km, vm = rk < DK, rv < DV
        return rk, rv, tl.arange(0, C), km, vm, rk[:, None] * DV + rv[None, :], km[:, None] & vm[None, :]

    @triton.jit
    def _row(i_bh, H, sb, sh):
        # offset of row (batch, head) = divmod(i_bh, H) in a (B, H, T, D) tensor of strides (sb, sh, st, 1)
        return (i_bh // H).to(tl.int64) * sb + (i_bh % H).to(tl.int64) * sh

    @triton.jit
    def _walk(a, b, g, h, h0, ht, gsum, scale, T, NT, L, H, sab, sah, sat, sbb, sbh, sbt, DK: tl.constexpr,
              DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr,
              USE_START: tl.constexpr, STORE_ALL: tl.constexpr, STORE_END: tl.constexpr, PREC: tl.constexpr,
              L_LOOP: tl.constexpr):
        # program (i_k, i_v, bh * NS + s): the (BK, BV) tile of one state walk over segment s (chunks s*L .. s*L+L-1)
        # of row bh, from h0[bh, s] (or zero); h[n] = the state before chunk n in the walk's order, ht[bh, s] = after.
        #   forward (a, b) = (k, v), in order:           h <- exp(b_C) h + (k exp(b_C - b))^T v   (entering states)
        #   REVERSE (a, b) = (q, do), from the last chunk: h <- exp(b_C) h + (q exp(b) scale)^T do  (gradients of the
        #   states leaving each chunk). Chunks past NT load as zeros and change nothing.
        i_k, i_v, i_bs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        NS = tl.cdiv(NT, L)
        i_bh, i_s = i_bs // NS, i_bs % NS
        rk, rv, rc, km, vm, hoff, hmask = _state_tile(i_k, i_v, DK, DV, C, BK, BV)
        a += _row(i_bh, H, sab, sah)
        b += _row(i_bh, H, sbb, sbh)
        g += i_bh.to(tl.int64) * T
        h += i_bh.to(tl.int64) * NT * DK * DV
        b_h = tl.zeros((BK, BV), dtype=tl.float32)
        if USE_START:
            b_h += tl.load(h0 + i_bs.to(tl.int64) * DK * DV + hoff, mask=hmask, other=0.0).to(tl.float32)
        b_gsum = tl.sum(tl.zeros((C,), dtype=tl.float32), 0)
        for i in range(L_LOOP if L_LOOP > 0 else L):
            n = i_s * L + (L - 1 - i if REVERSE else i)
            if STORE_ALL:
                tl.store(h + n * DK * DV + hoff, b_h.to(h.dtype.element_ty), mask=hmask & (n < NT))
            t = n * C + rc
            tm = t < T
            b_g = tl.load(g + t, mask=tm, other=0.0)
            b_b = tl.cumsum(b_g, 0)                                                           # (C,)
            b_last = tl.sum(b_g, 0)
            b_gsum += b_last
            b_a = tl.load(a + t[:, None] * sat + rk[None, :], mask=tm[:, None] & km[None, :], other=0.0)  # (C, BK)
            b_b2 = tl.load(b + t[:, None] * sbt + rv[None, :], mask=tm[:, None] & vm[None, :], other=0.0)  # (C, BV)
            if REVERSE:
                b_ad = (b_a * (tl.exp(b_b) * scale)[:, None]).to(b_a.dtype)
            else:
                b_ad = (b_a * tl.exp(b_last - b_b)[:, None]).to(b_a.dtype)
            b_h = b_h * tl.exp(b_last) + tl.dot(tl.trans(b_ad), b_b2, input_precision=PREC)
        if STORE_END:
            tl.store(ht + i_bs.to(tl.int64) * DK * DV + hoff, b_h, mask=hmask)
            if (i_k == 0) & (i_v == 0):
                tl.store(gsum + i_bs, b_gsum)

    @triton.jit
    def _seg_scan(local, gsum, out, init, final, NS, E: tl.constexpr, BLOCK: tl.constexpr, USE_INIT: tl.constexpr,
                  REVERSE: tl.constexpr, NS_LOOP: tl.constexpr):
        # program (i_e, bh): elements [i_e*BLOCK, +BLOCK) of row bh's (Dk*Dv) state, scanned over the NS segments:
        # out[s] = the running state before segment s; then cur = exp(gsum[s]) cur + local[s]. REVERSE walks from
        # the last segment (the gradient's scan). final: the state after every segment.
        i_e, i_bh = tl.program_id(0), tl.program_id(1)
        re = i_e * BLOCK + tl.arange(0, BLOCK)
        m = re < E
        cur = tl.zeros((BLOCK,), dtype=tl.float32)
        if USE_INIT:
            cur += tl.load(init + i_bh.to(tl.int64) * E + re, mask=m, other=0.0)
        for i in range(NS_LOOP if NS_LOOP > 0 else NS):
            s = NS - 1 - i if REVERSE else i
            off = (i_bh.to(tl.int64) * NS + s) * E + re
            tl.store(out + off, cur, mask=m)
            cur = cur * tl.exp(tl.load(gsum + i_bh * NS + s)) + tl.load(local + off, mask=m, other=0.0)
        tl.store(final + i_bh.to(tl.int64) * E + re, cur, mask=m)

    @triton.jit
    def _row_ptrs(q, k, v, o, g, i_bh, H, T, sqb, sqh, skb, skh, svb, svh, sob, soh):
        # q, k, v, o and g moved to row (batch, head) i_bh
        return (q + _row(i_bh, H, sqb, sqh), k + _row(i_bh, H, skb, skh), v + _row(i_bh, H, svb, svh),
                o + _row(i_bh, H, sob, soh), g + i_bh.to(tl.int64) * T)

    @triton.jit
    def _out_chunk(q, k, v, g, o, b_h, t, T, rk, rv, km, vm, rc, scale, sqt, skt, svt, sot, PREC: tl.constexpr):
        # one chunk of the output walk: the chunk's outputs (q exp(b)) @ h + causal((q k^T) * exp(b_i - b_j)) @ v are
        # stored, and the state h entering the next chunk is returned
        tm = t < T
        b_g = tl.load(g + t, mask=tm, other=0.0)
        b_b = tl.cumsum(b_g, 0)
        b_last = tl.sum(b_g, 0)
        b_q = tl.load(q + t[:, None] * sqt + rk[None, :], mask=tm[:, None] & km[None, :], other=0.0)  # (C, BK)
        b_k = tl.load(k + t[:, None] * skt + rk[None, :], mask=tm[:, None] & km[None, :], other=0.0)
        b_v = tl.load(v + t[:, None] * svt + rv[None, :], mask=tm[:, None] & vm[None, :], other=0.0)  # (C, BV)
        b_A = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
        causal = rc[:, None] >= rc[None, :]
        b_A = b_A * tl.exp(tl.where(causal, b_b[:, None] - b_b[None, :], float("-inf"))) * scale
        b_o = (tl.dot(b_q, b_h.to(b_q.dtype), input_precision=PREC) * (tl.exp(b_b) * scale)[:, None]
               + tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PREC))
        tl.store(o + t[:, None] * sot + rv[None, :], b_o.to(o.dtype.element_ty), mask=tm[:, None] & vm[None, :])
        b_kd = (b_k * tl.exp(b_last - b_b)[:, None]).to(b_k.dtype)
        return b_h * tl.exp(b_last) + tl.dot(tl.trans(b_kd), b_v, input_precision=PREC)

    @triton.jit
    def _fwd_ho(q, k, v, g, h0, ht, o, scale, T, NT, L, H, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                USE_START: tl.constexpr, STORE_END: tl.constexpr, PREC: tl.constexpr, L_LOOP: tl.constexpr):
        # program (i_v, bh * NS + s): output columns [i_v*BV, +BV) of segment s's chunks. The (BK >= DK, BV) state tile
        # walks the chunks in registers from h0[bh, s] (or zero), each chunk's output read off it on the way: the
        # forward without writing any chunk's state (every h_n is as large as k)
        i_v, i_bs = tl.program_id(0), tl.program_id(1)
        NS = tl.cdiv(NT, L)
        i_bh, i_s = i_bs // NS, i_bs % NS
        rk, rv, rc, km, vm, hoff, hmask = _state_tile(0, i_v, DK, DV, C, BK, BV)
        q, k, v, o, g = _row_ptrs(q, k, v, o, g, i_bh, H, T, sqb, sqh, skb, skh, svb, svh, sob, soh)
        b_h = tl.zeros((BK, BV), dtype=tl.float32)
        if USE_START:
            b_h += tl.load(h0 + i_bs.to(tl.int64) * DK * DV + hoff, mask=hmask, other=0.0).to(tl.float32)
        for i in range(L_LOOP if L_LOOP > 0 else L):
            b_h = _out_chunk(q, k, v, g, o, b_h, (i_s * L + i) * C + rc, T, rk, rv, km, vm, rc, scale, sqt, skt, svt,
                             sot, PREC)
        if STORE_END:
            tl.store(ht + i_bh.to(tl.int64) * DK * DV + hoff, b_h, mask=hmask)

    @triton.jit
    def _fwd_lookback(q, k, v, g, h0, ht, o, agg, incl, gsum, flags, counter, scale, T, NT, L, H, NV, BHV,
                      sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, DK: tl.constexpr, DV: tl.constexpr,
                      C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr,
                      PREC: tl.constexpr, L_LOOP: tl.constexpr, ONLY_AGGREGATES: tl.constexpr):
        # The forward in one launch (experimental, FWD_LOOKBACK): a program per (segment, row, Dv tile) walks its
        # segment from zero, publishes that local state (flag 1), takes the state entering the segment from its
        # predecessors by decoupled look-back (an inclusive state, flag 2, ends the look-back; a local one is decayed
        # and added, and the look-back goes on), publishes its own inclusive state, and walks the segment again for
        # the outputs while its k and v are still in L2. Segments are dealt by an atomic ticket, so every segment's
        # predecessors are already running. ONLY_AGGREGATES (tests): never use an inclusive state but h0's.
        ticket = tl.atomic_add(counter, 1)
        i_s, r = ticket // BHV, ticket % BHV
        i_bh, i_v = r // NV, r % NV
        NS = tl.cdiv(NT, L)
        rk, rv, rc, km, vm, hoff, hmask = _state_tile(0, i_v, DK, DV, C, BK, BV)
        q, k, v, o, g = _row_ptrs(q, k, v, o, g, i_bh, H, T, sqb, sqh, skb, skh, svb, svh, sob, soh)
        b_loc = tl.zeros((BK, BV), dtype=tl.float32)
        b_gs = tl.sum(tl.zeros((C,), dtype=tl.float32), 0)
        for i in range(L_LOOP if L_LOOP > 0 else L):
            t = (i_s * L + i) * C + rc
            tm = t < T
            b_g = tl.load(g + t, mask=tm, other=0.0)
            b_b = tl.cumsum(b_g, 0)
            b_last = tl.sum(b_g, 0)
            b_gs += b_last
            b_k = tl.load(k + t[:, None] * skt + rk[None, :], mask=tm[:, None] & km[None, :], other=0.0)
            b_v = tl.load(v + t[:, None] * svt + rv[None, :], mask=tm[:, None] & vm[None, :], other=0.0)
            b_kd = (b_k * tl.exp(b_last - b_b)[:, None]).to(b_k.dtype)
            b_loc = b_loc * tl.exp(b_last) + tl.dot(tl.trans(b_kd), b_v, input_precision=PREC)
        es = i_bh * NS + i_s                               # the segment's slot in agg, incl, gsum
        tl.store(agg + es.to(tl.int64) * DK * DV + hoff, b_loc, mask=hmask)
        tl.store(gsum + es, b_gs)                          # (every Dv tile stores the same value)
        tl.debug_barrier()                                 # every thread's stores before the flag
        tl.atomic_xchg(flags + es * NV + i_v, 1, sem="release")
        b_h = tl.zeros((BK, BV), dtype=tl.float32)
        dec = tl.sum(tl.zeros((C,), dtype=tl.float32), 0)  # log-decay from the end of segment j to our start
        j = i_s - 1
        while j >= 0:
            ej = i_bh * NS + j
            f = tl.atomic_add(flags + ej * NV + i_v, 0, sem="acquire")
            while f == 0:
                f = tl.atomic_add(flags + ej * NV + i_v, 0, sem="acquire")
            if (f == 2) & (not ONLY_AGGREGATES):
                b_h += tl.exp(dec) * tl.load(incl + ej.to(tl.int64) * DK * DV + hoff, mask=hmask, other=0.0,
                                             volatile=True)
                j = -2                                     # done: the inclusive state holds everything before it
            else:
                b_h += tl.exp(dec) * tl.load(agg + ej.to(tl.int64) * DK * DV + hoff, mask=hmask, other=0.0,
                                             volatile=True)
                dec += tl.load(gsum + ej, volatile=True)
                j -= 1
        if USE_H0:
            if j == -1:                                    # looked back past the first segment: the initial state
                b_h += tl.exp(dec) * tl.load(h0 + i_bh.to(tl.int64) * DK * DV + hoff, mask=hmask, other=0.0)
        b_end = b_h * tl.exp(b_gs) + b_loc
        tl.store(incl + es.to(tl.int64) * DK * DV + hoff, b_end, mask=hmask)
        tl.debug_barrier()
        tl.atomic_xchg(flags + es * NV + i_v, 2, sem="release")
        if i_s == NS - 1:
            tl.store(ht + i_bh.to(tl.int64) * DK * DV + hoff, b_end, mask=hmask)
        for i in range(L_LOOP if L_LOOP > 0 else L):      # the outputs, as _fwd_ho, from the true entering state
            b_h = _out_chunk(q, k, v, g, o, b_h, (i_s * L + i) * C + rc, T, rk, rv, km, vm, rc, scale, sqt, skt, svt,
                             sot, PREC)

    @triton.jit
    def _bwd_dqkvg(q, k, v, g, h, do, dh, dq, dk, dv, dg, scale, T, NT, H, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                   sdb, sdh, sdt, sgqb, sgqh, sgqt, sgkb, sgkh, sgkt, sgvb, sgvh, sgvt, DK: tl.constexpr, DV: tl.constexpr,
                   C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
        # program (n, bh): every gradient of chunk n of row bh; BK >= DK, BV >= DV
        n, i_bh = tl.program_id(0), tl.program_id(1)
        rc = tl.arange(0, C)
        rk = tl.arange(0, BK)
        rv = tl.arange(0, BV)
        t = n * C + rc
        tm, km, vm = t < T, rk < DK, rv < DV
        qkmask = tm[:, None] & km[None, :]
        vmask = tm[:, None] & vm[None, :]
        hoff = rk[:, None] * DV + rv[None, :]
        hmask = km[:, None] & vm[None, :]
        bh64 = i_bh.to(tl.int64)
        q += _row(i_bh, H, sqb, sqh)
        k += _row(i_bh, H, skb, skh)
        v += _row(i_bh, H, svb, svh)
        do += _row(i_bh, H, sdb, sdh)
        dq += _row(i_bh, H, sgqb, sgqh)
        dk += _row(i_bh, H, sgkb, sgkh)
        dv += _row(i_bh, H, sgvb, sgvh)
        g += bh64 * T
        dg += bh64 * T
        h += (bh64 * NT + n) * DK * DV
        dh += (bh64 * NT + n) * DK * DV
        b_q = tl.load(q + t[:, None] * sqt + rk[None, :], mask=qkmask, other=0.0)      # (C, BK)
        b_k = tl.load(k + t[:, None] * skt + rk[None, :], mask=qkmask, other=0.0)
        b_v = tl.load(v + t[:, None] * svt + rv[None, :], mask=vmask, other=0.0)       # (C, BV)
        b_do = tl.load(do + t[:, None] * sdt + rv[None, :], mask=vmask, other=0.0)
        b_h = tl.load(h + hoff, mask=hmask, other=0.0)        # (BK, BV) state entering the chunk
        b_dh = tl.load(dh + hoff, mask=hmask, other=0.0)      # (BK, BV) gradient of the state leaving it
        b_g = tl.load(g + t, mask=tm, other=0.0)
        b_b = tl.cumsum(b_g, 0)
        b_last = tl.sum(b_g, 0)
        causal = rc[:, None] >= rc[None, :]
        dec = tl.exp(tl.where(causal, b_b[:, None] - b_b[None, :], float("-inf"))) * scale   # (C, C) [i, j]
        b_A = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * dec                        # scores
        b_dA = tl.dot(b_do, tl.trans(b_v), input_precision=PREC) * dec                      # their gradient
        e_in = tl.exp(b_b)                   # chunk start -> i
        e_out = tl.exp(b_last - b_b)         # j -> chunk end
        dt = b_q.dtype
        b_dq = (tl.dot(b_dA.to(dt), b_k, input_precision=PREC)
                + tl.dot(b_do, tl.trans(b_h), input_precision=PREC) * (e_in * scale)[:, None])   # (C, BK)
        b_dk_s = tl.dot(b_v, tl.trans(b_dh), input_precision=PREC) * e_out[:, None]              # state part
        b_dk = tl.dot(tl.trans(b_dA).to(dt), b_q, input_precision=PREC) + b_dk_s
        b_dv = (tl.dot(tl.trans(b_A).to(dt), b_do, input_precision=PREC)
                + tl.dot(b_k, b_dh, input_precision=PREC) * e_out[:, None])                      # (C, BV)
        b_qf, b_kf = b_q.to(tl.float32), b_k.to(tl.float32)
        # dL/db: q.dq - k.dk per row, and <dh_{n+1}, h_{n+1}> at the last row (h_{n+1} = exp(b_C) h_n + state part)
        last = tl.sum(tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1), 0) * tl.exp(b_last) \
            + tl.sum(tl.sum(b_kf * b_dk_s, 1), 0)
        row = tl.sum(b_qf * b_dq, 1) - tl.sum(b_kf * b_dk, 1) + tl.where(rc == C - 1, last, 0.0)
        b_dg = tl.sum(row, 0) - tl.cumsum(row, 0) + row          # reverse cumsum within the chunk
        tl.store(dq + t[:, None] * sgqt + rk[None, :], b_dq.to(dq.dtype.element_ty), mask=qkmask)
        tl.store(dk + t[:, None] * sgkt + rk[None, :], b_dk.to(dk.dtype.element_ty), mask=qkmask)
        tl.store(dv + t[:, None] * sgvt + rv[None, :], b_dv.to(dv.dtype.element_ty), mask=vmask)
        tl.store(dg + t, b_dg, mask=tm)


def _np2(x):
    return max(16, next_power_of_2(x))  # tl.dot needs every dimension >= 16


def _nt_loop(nt):
    # the scans' loop bound: the runtime NT on a GPU (0 here: one compile for every T); under the interpreter a
    # constant, since its range() cannot take a runtime scalar (a 1-element array, refused by NumPy 2)
    return nt if os.environ.get("TRITON_INTERPRET") == "1" else 0


def _prec(x):
    # fp32 inputs follow PyTorch's own setting for fp32 matmuls: TF32 where it is allowed (the scripts allow it on
    # CUDA), exact fp32 otherwise (the interpreter tests). An exact fp32 dot has no tensor-core form, and Triton's
    # FMA form spills on Hopper: 11.5 KB of stack a thread in _fwd_ho at D 64 (tests/test_kernels_sm90.py).
    # bf16/fp16 inputs ignore it
    return "tf32" if x.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _programs_wanted(device):
    # enough programs in each state walk to fill the GPU a few times over; the interpreter's value only decides
    # how the tests' small inputs are cut into segments
    if torch.device(device).type != "cuda":
        return 8
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def segment_length(nt, tiles, seg_len=None, programs=8):
    """Chunks per segment of the state walks. With B*H*tiles programs alone a walk over NT chunks leaves most of
    the GPU idle (16 programs at 2 x 32k, H 4); cut into segments, each segment walks its chunks from zero in
    parallel, a short scan over the segments gives the state entering each, and a second parallel walk from there
    writes every chunk's state. One segment (L = NT) is the plain walk. programs: how many the device wants."""
    seg_len = SEG_LEN if seg_len is None else seg_len
    if seg_len is not None:
        return max(1, min(int(seg_len), nt))
    segments = max(1, programs // max(1, tiles))
    return max(MIN_SEG, cdiv(nt, segments)) if segments > 1 else nt


def _seg_scan_launch(local, gsum, init, reverse):
    """Scan the per-segment states local (BH, NS, Dk, Dv) fp32 with the segments' log-decays gsum (BH, NS):
    returns the running state before each segment (same shape) and the one after all of them (BH, Dk, Dv)."""
    BH, NS, DK, DV = local.shape
    out = torch.empty_like(local)
    final = local.new_empty(BH, DK, DV)
    E = DK * DV
    _seg_scan[(cdiv(E, SCAN_BLOCK), BH)](local, gsum, out, init if init is not None else final, final, NS,
                                         E=E, BLOCK=SCAN_BLOCK, USE_INIT=init is not None, REVERSE=reverse,
                                         NS_LOOP=_nt_loop(NS), num_warps=NUM_WARPS)
    return out, final


def _last_dim_dense(x):
    # the kernels take any batch/head/token strides, but a contiguous last dimension
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x):
    # (batch, head, token) strides of a (B, H, T, D) tensor whose last dimension is contiguous
    return x.stride(0), x.stride(1), x.stride(2)


def bthd(B, H, T, D, like):
    """An empty (B, H, T, D) tensor laid out as (B, T, H, D): the layout of the projections q, k, v are views of and
    that o feeds (o_proj reads (B, T, H*D)), so neither side needs a transposing copy."""
    return like.new_empty(B, T, H, D).transpose(1, 2)


def _walk_tiles(DK, DV):
    # the (BK, BV) state tile of _walk, and how many tiles a head's state has
    BK, BV = min(BLOCK_K, _np2(DK)), min(BLOCK_V, _np2(DV))
    return BK, BV, cdiv(DK, BK) * cdiv(DV, BV)


def _walker(reverse, a, b, g, scale, chunk_size, L, keep_states=True):
    """A launcher of one state walk (_walk over (k, v) in order, or reverse over (q, do)) in segments of L chunks:
    walk(begin, end, use_start, store_all, store_end) -> fills `states` (B, H, N, Dk, Dv) in a's dtype when store_all
    (allocated only if keep_states: it is as large as k). Returns walk, states, gsum (B*H, NS) (each segment's total
    log-decay, written by a store_end walk) and NS."""
    B, H, T, DK = a.shape
    DV = b.shape[-1]
    NT = cdiv(T, chunk_size)
    BK, BV, _ = _walk_tiles(DK, DV)
    NS = cdiv(NT, L)
    states = a.new_empty(B, H, NT, DK, DV) if keep_states else None
    gsum = a.new_empty(B * H, NS, dtype=torch.float32)
    grid = (cdiv(DK, BK), cdiv(DV, BV), B * H * NS)

    def walk(begin, end, use_start, store_all, store_end):
        assert states is not None or not store_all
        _walk[grid](a, b, g, states if states is not None else gsum, begin, end, gsum, scale, T, NT, L, H,
                    *_strides(a), *_strides(b), DK=DK, DV=DV, C=chunk_size, BK=BK, BV=BV, REVERSE=reverse,
                    USE_START=use_start, STORE_ALL=store_all, STORE_END=store_end, PREC=_prec(a),
                    L_LOOP=_nt_loop(L), num_warps=NUM_WARPS)
    return walk, states, gsum, NS


def _segment_starts(walk, gsum, start, shape, reverse):
    """The true state at the start of every segment (B*H, NS, Dk, Dv) fp32, and the walk's end (B, H, Dk, Dv): each
    segment walks from zero (its own end state and total log-decay), then the scan over the segments."""
    B, H, NS, DK, DV = shape
    local = gsum.new_empty(B * H, NS, DK, DV)
    walk(local, local, False, False, True)
    begins, end = _seg_scan_launch(local, gsum, start, reverse=reverse)
    return begins, end.view(B, H, DK, DV)


def _walk_states(reverse, a, b, g, start, scale, chunk_size, seg_len):
    """One state walk over the chunks: over (k, v) in order (every chunk's entering state), or reverse over (q, do)
    from the last chunk (every chunk's leaving-state gradient). start (B, H, Dk, Dv) or None.
    Returns all states (B, H, N, Dk, Dv) in a's dtype and the end of the walk (B, H, Dk, Dv) fp32. Cut into
    segments (segment_length) where the rows alone leave the GPU idle."""
    B, H, T, DK = a.shape
    DV = b.shape[-1]
    NT = cdiv(T, chunk_size)
    L = segment_length(NT, _walk_tiles(DK, DV)[2] * B * H, seg_len, _programs_wanted(a.device))
    walk, states, gsum, NS = _walker(reverse, a, b, g, scale, chunk_size, L)
    if NS == 1:
        end = a.new_empty(B, H, DK, DV, dtype=torch.float32)
        walk(start if start is not None else end, end, start is not None, True, True)
        return states, end
    begins, end = _segment_starts(walk, gsum, start, (B, H, NS, DK, DV), reverse=reverse)
    walk(begins, begins, True, True, False)
    return states, end


def launch_fwd_h(k, v, g, h0, chunk_size, seg_len=None):
    """States entering every chunk (B, H, N, Dk, Dv) in k's dtype, and the final state (B, H, Dk, Dv) fp32."""
    return _walk_states(False, k, v, g, h0, 1.0, chunk_size, seg_len)


def launch_fwd(q, k, v, g, h0, scale, chunk_size, seg_len=None):
    """The forward (o laid out (B, T, H, Dv), final state fp32) without writing every chunk's state: the segments'
    starts (a walk from zero per segment and the scan), then _fwd_ho per segment. The head must fit (kernels_fit)."""
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    _check_head(q, v)
    NT = cdiv(T, chunk_size)
    BK, BV = _np2(DK), min(BLOCK_VO, _np2(DV))
    L = segment_length(NT, cdiv(DV, BV) * B * H, seg_len, _programs_wanted(q.device))
    o = bthd(B, H, T, DV, v)
    if FWD_LOOKBACK and cdiv(NT, L) > 1:
        # a look-back is a chain of dependent steps (an atomic and a state tile each): few long segments
        L = max(L, cdiv(NT, LOOKBACK_MAX_SEGMENTS)) if seg_len is None and SEG_LEN is None else L
        return _launch_fwd_lookback(q, k, v, g, h0, o, scale, chunk_size, L, BK, BV)
    if cdiv(NT, L) == 1:
        begins, end, use_start = h0, q.new_empty(B, H, DK, DV, dtype=torch.float32), h0 is not None
    else:
        walk, _, gsum, NS = _walker(False, k, v, g, 1.0, chunk_size, L, keep_states=False)
        begins, end = _segment_starts(walk, gsum, h0, (B, H, NS, DK, DV), reverse=False)
        use_start = True
    NS = cdiv(NT, L)
    _fwd_ho[(cdiv(DV, BV), B * H * NS)](
        q, k, v, g, begins if use_start else end, end, o, scale, T, NT, L, H, *_strides(q), *_strides(k),
        *_strides(v), *_strides(o), DK=DK, DV=DV, C=chunk_size, BK=BK, BV=BV, USE_START=use_start,
        STORE_END=NS == 1, PREC=_prec(q), L_LOOP=_nt_loop(L),
        num_warps=NUM_WARPS if BK * BV <= 64 * 64 else NUM_WARPS_BWD)  # a larger state tile: more registers
    return o, end


def _launch_fwd_lookback(q, k, v, g, h0, o, scale, chunk_size, L, BK, BV, only_aggregates=False):
    """launch_fwd in one launch (_fwd_lookback): segments of L chunks take their entering states from each other by
    decoupled look-back instead of a walk from zero in a kernel of its own and the scan."""
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    NT = cdiv(T, chunk_size)
    NS, NV = cdiv(NT, L), cdiv(DV, BV)
    agg = q.new_empty(B * H * NS, DK, DV, dtype=torch.float32)
    incl = torch.empty_like(agg)
    gsum = q.new_empty(B * H * NS, dtype=torch.float32)
    flags = torch.zeros(1 + B * H * NS * NV, dtype=torch.int32, device=q.device)  # [0]: the ticket counter
    end = q.new_empty(B, H, DK, DV, dtype=torch.float32)
    _fwd_lookback[(B * H * NS * NV,)](
        q, k, v, g, h0 if h0 is not None else end, end, o, agg, incl, gsum, flags[1:], flags, scale, T, NT, L, H, NV,
        B * H * NV, *_strides(q), *_strides(k), *_strides(v), *_strides(o), DK=DK, DV=DV, C=chunk_size, BK=BK, BV=BV,
        USE_H0=h0 is not None, PREC=_prec(q), L_LOOP=_nt_loop(L), ONLY_AGGREGATES=only_aggregates,
        num_warps=NUM_WARPS if BK * BV <= 64 * 64 else NUM_WARPS_BWD)
    return o, end


def launch_bwd_dh(q, do, g, dht, scale, chunk_size, seg_len=None):
    """Gradients of the state leaving every chunk (B, H, N, Dk, Dv) in q's dtype, and that of the initial state fp32."""
    return _walk_states(True, q, do, g, dht, scale, chunk_size, seg_len)


def launch_bwd(q, k, v, g, h0, do, dht, scale, chunk_size, seg_len=None):
    """(dq, dk, dv, dg fp32, dh0 fp32) for do = dL/do and dht = dL/d(final state) (or None)."""
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    _check_head(q, v)
    h, _ = launch_fwd_h(k, v, g, h0, chunk_size, seg_len)
    NT = h.shape[2]
    dh, dh0 = launch_bwd_dh(q, do, g, dht, scale, chunk_size, seg_len)
    dq, dk, dv = bthd(B, H, T, DK, q), bthd(B, H, T, DK, k), bthd(B, H, T, DV, v)
    dg = torch.empty_like(g)
    _bwd_dqkvg[(NT, B * H)](q, k, v, g, h, do, dh, dq, dk, dv, dg, scale, T, NT, H, *_strides(q), *_strides(k),
                            *_strides(v), *_strides(do), *_strides(dq), *_strides(dk), *_strides(dv), DK=DK, DV=DV,
                            C=chunk_size, BK=_np2(DK), BV=_np2(DV), PREC=_prec(q), num_warps=NUM_WARPS_BWD)
    return dq, dk, dv, dg, dh0


def kernels_fit(q, v):
    """Whether the kernels hold this head in a GPU's shared memory (MAX_D); else chunk_fwd / chunk_bwd run the
    PyTorch form. Triton's interpreter (the CPU tests) has no such limit."""
    if q.device.type != "cuda":
        return True
    return max(_np2(q.shape[-1]), _np2(v.shape[-1])) <= MAX_D.get(q.element_size(), 0)


def _check_head(q, v):
    if not kernels_fit(q, v):
        raise ValueError(f"the GLA kernels hold a whole head in shared memory: Dk, Dv <= "
                         f"{MAX_D.get(q.element_size(), 0)} in {q.dtype}, got {q.shape[-1]}, {v.shape[-1]}")


def _check_chunk(chunk_size):
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_gla_triton: chunk_size must be a power of 2 >= 16 (tl.dot), got {chunk_size}")


def chunk_fwd(q, k, v, g, initial_state, scale, chunk_size):
    """(o (B, H, T, Dv) in v's dtype, laid out (B, T, H, Dv); final state (B, H, Dk, Dv) fp32). q, k, v: any strides
    (read in place when the last dimension is contiguous); g (B, H, T) fp32."""
    q, k, v = (_last_dim_dense(x) for x in (q, k, v))
    g = g.contiguous()
    initial_state = None if initial_state is None else initial_state.contiguous()
    if not (kernel_ok(q.device) and kernels_fit(q, v)):
        o, ht = chunk_gla(q, k, v, g, chunk_size, initial_state, scale, output_final_state=True)
        return bthd(*o.shape, o).copy_(o), ht.float()
    return launch_fwd(q, k, v, g, initial_state, scale, chunk_size)


def chunk_bwd(q, k, v, g, initial_state, do, dht, scale, chunk_size):
    """(dq, dk, dv, dg fp32, d initial_state fp32) of chunk_fwd, given do and dht (or None). Any strides, as there."""
    q, k, v, do = (_last_dim_dense(x) for x in (q, k, v, do))
    g = g.contiguous()
    initial_state = None if initial_state is None else initial_state.contiguous()
    dht = None if dht is None else dht.contiguous()
    if not (kernel_ok(q.device) and kernels_fit(q, v)):  # the vjp of the plain-PyTorch form
        s0 = (q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1], dtype=torch.float32)
              if initial_state is None else initial_state)
        _, vjp = torch.func.vjp(lambda *x: chunk_gla(*x[:4], chunk_size, x[4], scale, output_final_state=True),
                                q, k, v, g, s0)
        dq, dk, dv, dg, dh0 = vjp((do, torch.zeros_like(s0) if dht is None else dht))
        return (bthd(*dq.shape, q).copy_(dq), bthd(*dk.shape, k).copy_(dk), bthd(*dv.shape, v).copy_(dv),
                dg.float().contiguous(), dh0.float())
    return launch_bwd(q, k, v, g, initial_state, do, dht, scale, chunk_size)


# the same two as torch.library custom ops: what torch.compile sees (opaque, with fakes of the same layout). Eager
# calls go to the functions directly, without the custom op's Python dispatch on every call.
# flexible_layout: inductor hands over q, k, v in its own layout. By default it copies each into its eager strides,
# and for Coeus's views of one projection (whose rows inductor pads, 1,160 -> 1,216 columns at nano) each copy is a
# whole projection-sized buffer: three of them were live at the compiled forward's peak (H100, 32k: 218 of 414 MiB)
@torch.library.custom_op("gla::chunk_fwd", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def chunk_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                 initial_state: torch.Tensor | None, scale: float,
                 chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return chunk_fwd(q, k, v, g, initial_state, scale, chunk_size)


@chunk_fwd_op.register_fake
def _(q, k, v, g, initial_state, scale, chunk_size):
    B, H, T, DK = q.shape
    return bthd(B, H, T, v.shape[-1], v), q.new_empty(B, H, DK, v.shape[-1], dtype=torch.float32)


@torch.library.custom_op("gla::chunk_bwd", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def chunk_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                 initial_state: torch.Tensor | None, do: torch.Tensor, dht: torch.Tensor | None, scale: float,
                 chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return chunk_bwd(q, k, v, g, initial_state, do, dht, scale, chunk_size)


@chunk_bwd_op.register_fake
def _(q, k, v, g, initial_state, do, dht, scale, chunk_size):
    B, H, T, DK = q.shape
    return (bthd(B, H, T, DK, q), bthd(B, H, T, DK, k), bthd(B, H, T, v.shape[-1], v),
            g.new_empty(g.shape, dtype=torch.float32), q.new_empty(B, H, DK, v.shape[-1], dtype=torch.float32))


class ChunkGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, chunk_size):
        o, ht = (chunk_fwd_op if torch.compiler.is_compiling() else chunk_fwd)(q, k, v, g, initial_state, scale,
                                                                              chunk_size)
        ctx.save_for_backward(q, k, v, g, initial_state)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, initial_state = ctx.saved_tensors
        bwd = chunk_bwd_op if torch.compiler.is_compiling() else chunk_bwd
        dq, dk, dv, dg, dh0 = bwd(q, k, v, g, initial_state, do, dht, ctx.scale, ctx.chunk_size)
        dh0 = dh0.to(initial_state.dtype) if initial_state is not None and ctx.needs_input_grad[4] else None
        return dq, dk, dv, dg, dh0, None, None


def chunk_gla_triton(q, k, v, g, chunk_size=64, scale=None, initial_state=None, output_final_state=False):
    """models.gla.chunk_gla through the Triton kernels, differentiable in q, k, v, g and initial_state.

    q, k (B, H, T, Dk); v (B, H, T, Dv) of one dtype; g (B, H, T) log-decays <= 0 (any float dtype, used in fp32);
    initial_state (B, H, Dk, Dv) or None; scale multiplies q (default Dk ** -0.5); chunk_size a power of 2 >= 16.
    Returns o (B, H, T, Dv) in v's dtype (laid out (B, T, H, Dv): see bthd) and the final state (B, H, Dk, Dv) fp32
    if output_final_state, else None. q, k, v may be strided views (their last dimension contiguous): no copies.
    """
    _check_chunk(chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dtype = v.dtype
    # under autocast the projections may disagree in dtype; views (Coeus's q, k, v of one projection) stay views
    q, k, v = (x.to(dtype) for x in (q, k, v))
    s0 = None if initial_state is None else initial_state.float()
    o, ht = ChunkGLAFunction.apply(q, k, v, g.float(), s0, scale, chunk_size)
    return o, (ht if output_final_state else None)


def gla_attn(q, k, v, g, chunk_size=64, initial_state=None, scale=None, output_final_state=True, dropout_p=0.0,
             exact_segsum=False):
    """A drop-in for models.gla.chunk_gla (same arguments): the kernels, or chunk_gla itself with score dropout,
    exact_segsum, or off the kernels' devices."""
    if dropout_p or exact_segsum or not kernel_ok(q.device) or not kernels_fit(q, v):
        return chunk_gla(q, k, v, g, chunk_size, initial_state, scale, output_final_state, exact_segsum, dropout_p)
    return chunk_gla_triton(q, k, v, g, chunk_size, scale, initial_state, output_final_state)


def use_gla_kernels(model):
    """Point every CoeusMixer of model whose weights the kernels can read (CUDA with Triton) at gla_attn; returns how
    many. Off CUDA nothing changes."""
    from models.coeus import CoeusMixer
    return point_at_kernel(model, CoeusMixer, lambda m: m.q_proj.weight.device, "global_attn", gla_attn)
