"""A batch-1 decode step's attention in one Triton kernel: q/k/v from the GEMV's partial sums, RoPE, the
KV-cache write and grouped-query attention over the cache.

Compiled, that part of a layer was five to seven kernels (the q/k/v sum, two RoPE kernels, the cache copy,
q K^T, softmax, P V), ~15 us a layer on an H200 for TinyLlama, almost all of it launch and ramp time: the
cache of a short context is a few hundred KB. Here one program per (KV head, block of BLOCK_L cache slots),
flash-decoding style: each sums the partials of its G query heads (and block 0 those of the key and value),
adds Qwen2's q/k/v bias where there is one, rounds to the model's dtype as the unfused path rounds them, rotates
q and k, and runs an online softmax over its block's visible slots; block 0 also stores k and v at slot pos and
starts from the new token, whose key and value it already holds (no read-after-write of the cache inside the
kernel). The last of a head's
blocks to finish (an arrival counter per KV head, allocated zeroed by the caller and reset by that block)
merges the blocks' (max, sum, output) triples, so the step stays one launch however long the cache.

Used by kernels/fused_decode.py (batch-1 decoding in bf16/fp16 through kernels/gemv.py's kernels);
tests/test_gemv.py holds it to models.llama's unfused path in Triton's CPU interpreter.
"""
import torch

from kernels.launch import cdiv, gdc_launch_dependents, gdc_wait, launch_options, next_power_of_2, tl, triton

if triton is not None:
    @triton.jit
    def _decode_attention_kernel(part_ptr, bias_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, mask_ptr, pos_ptr,
                                 out_ptr, acc_ws_ptr, ml_ws_ptr, arrivals_ptr, n_qkv, scale, L: tl.constexpr,
                                 SPLIT: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                                 G_PAD: tl.constexpr, BLOCK_L: tl.constexpr, N_BLOCKS: tl.constexpr,
                                 HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
        j = tl.program_id(0)                       # KV head; query heads j*G .. j*G+G-1 share it
        b = tl.program_id(1)                       # cache block: slots [b*BLOCK_L, (b+1)*BLOCK_L)
        G: tl.constexpr = H // HKV
        dtype = k_cache_ptr.dtype.element_ty
        if PDL:  # programmatic dependent launch: the next kernel may be scheduled now (kernels/launch.py)
            gdc_launch_dependents()
        pos = tl.load(pos_ptr)
        n_blocks = tl.maximum(tl.cdiv(pos, BLOCK_L), 1)  # blocks with visible slots; block 0 also takes the new token
        if b < n_blocks:
            d = tl.arange(0, D)
            d_rot = (d + D // 2) % D               # rotate_half: [-x2, x1]
            sign = tl.where(d < D // 2, -1.0, 1.0)
            cos = tl.load(cos_ptr + d).to(tl.float32)
            sin = tl.load(sin_ptr + d).to(tl.float32)
            head_k = k_cache_ptr + j * L * D       # batch 1: (HKV, L, D) contiguous
            head_v = v_cache_ptr + j * L * D
            # this block's cache slots before pos: written by earlier steps, so read before waiting for the kernel
            # that made q/k/v (with PDL, while it finishes)
            t = b * BLOCK_L + tl.arange(0, BLOCK_L)
            seen = (t < pos) & (tl.load(mask_ptr + t, mask=t < pos, other=0) != 0)
            kb = tl.load(head_k + t[:, None] * D + d[None, :], mask=seen[:, None], other=0.0)    # (BLOCK_L, D)
            vb = tl.load(head_v + t[:, None] * D + d[None, :], mask=seen[:, None], other=0.0)
            if PDL:
                gdc_wait()
            g = tl.arange(0, G_PAD)
            g_ok = (g < G)[:, None]
            q_cols = (j * G + g)[:, None] * D      # (G_PAD, 1): start of each query head's columns
            k_col, v_col = H * D + j * D, (H + HKV) * D + j * D
            q = tl.zeros((G_PAD, D), tl.float32)
            q_r = tl.zeros((G_PAD, D), tl.float32)
            k = tl.zeros((D,), tl.float32)
            k_r = tl.zeros((D,), tl.float32)
            v = tl.zeros((D,), tl.float32)
            for s in tl.static_range(SPLIT):       # the GEMV's split-K partial sums (every block needs q)
                row = part_ptr + s * n_qkv
                q += tl.load(row + q_cols + d[None, :], mask=g_ok, other=0.0)
                q_r += tl.load(row + q_cols + d_rot[None, :], mask=g_ok, other=0.0)
                k += tl.load(row + k_col + d)
                k_r += tl.load(row + k_col + d_rot)
                v += tl.load(row + v_col + d)
            if HAS_BIAS:  # Qwen2's q/k/v bias, added to the fp32 sums before the one rounding, as nn.Linear's epilogue
                q += tl.load(bias_ptr + q_cols + d[None, :], mask=g_ok, other=0.0).to(tl.float32)
                q_r += tl.load(bias_ptr + q_cols + d_rot[None, :], mask=g_ok, other=0.0).to(tl.float32)
                k += tl.load(bias_ptr + k_col + d).to(tl.float32)
                k_r += tl.load(bias_ptr + k_col + d_rot).to(tl.float32)
                v += tl.load(bias_ptr + v_col + d).to(tl.float32)
            # the projection's output is rounded to the model's dtype, as nn.Linear's would be
            q = q.to(dtype).to(tl.float32) * cos[None, :] + sign[None, :] * q_r.to(dtype).to(tl.float32) * sin[None, :]
            k = k.to(dtype).to(tl.float32) * cos + sign * k_r.to(dtype).to(tl.float32) * sin
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            # dots on fp32 operands: tf32 holds bf16/fp16 values exactly, and the probabilities keep 10 mantissa bits
            qf = q.to(tl.float32)
            # online softmax; block 0 starts from the new token (always visible to itself), whose key and value
            # it holds, so no block reads slot pos while block 0 writes it
            first = b == 0
            if first:
                tl.store(head_k + pos * D + d, k)
                tl.store(head_v + pos * D + d, v)
            m = tl.where(first, tl.sum(qf * k.to(tl.float32)[None, :], axis=1) * scale, -1e30)   # (G_PAD,)
            l_sum = tl.where(first, 1.0, 0.0) + tl.zeros((G_PAD,), tl.float32)
            acc = tl.where(first, 1.0, 0.0) * v.to(tl.float32)[None, :] + tl.zeros((G_PAD, D), tl.float32)
            scores = tl.dot(qf, tl.trans(kb.to(tl.float32))) * scale                            # (G_PAD, BLOCK_L)
            scores = tl.where(seen[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p, vb.to(tl.float32))
            m = m_new
            if n_blocks == 1:
                tl.store(out_ptr + q_cols + d[None, :], (acc / l_sum[:, None]).to(dtype), mask=g_ok)
            else:
                # flash-decoding: every block leaves (m, l, acc); the last of the head's blocks to finish
                # (an arrival counter, reset by that block) merges them, so one launch does it all
                ws = (j * N_BLOCKS + b) * G_PAD
                tl.store(acc_ws_ptr + (ws + g)[:, None] * D + d[None, :], acc)
                tl.store(ml_ws_ptr + 2 * ws + g, m)
                tl.store(ml_ws_ptr + 2 * ws + G_PAD + g, l_sum)
                tl.debug_barrier()                 # all of this program's stores issued before it arrives
                arrived = tl.atomic_add(arrivals_ptr + j, 1, sem="acq_rel")
                if arrived == n_blocks - 1:
                    tl.atomic_xchg(arrivals_ptr + j, 0)
                    m_all = tl.full((G_PAD,), -1e30, tl.float32)
                    l_all = tl.zeros((G_PAD,), tl.float32)
                    acc_all = tl.zeros((G_PAD, D), tl.float32)
                    for c in range(N_BLOCKS):      # a constant bound: the interpreter needs one
                        if c < n_blocks:
                            wc = (j * N_BLOCKS + c) * G_PAD
                            m_c = tl.load(ml_ws_ptr + 2 * wc + g, cache_modifier=".cg")
                            l_c = tl.load(ml_ws_ptr + 2 * wc + G_PAD + g, cache_modifier=".cg")
                            acc_c = tl.load(acc_ws_ptr + (wc + g)[:, None] * D + d[None, :], cache_modifier=".cg")
                            m_new = tl.maximum(m_all, m_c)
                            a_all, a_c = tl.exp(m_all - m_new), tl.exp(m_c - m_new)
                            l_all = l_all * a_all + l_c * a_c
                            acc_all = acc_all * a_all[:, None] + acc_c * a_c[:, None]
                            m_all = m_new
                    tl.store(out_ptr + q_cols + d[None, :], (acc_all / l_all[:, None]).to(dtype), mask=g_ok)


BLOCK_L, NUM_WARPS = 128, 8  # cache slots per program, warps per program (fastest of 16-128 x 2-8 on an H200)


# flexible_layout: inductor may hand over its own layout of cos, sin and mask (reshaped below), where by default
# it would copy them into the eager strides once per layer: two extra kernels a layer (~45 us a token, H200)
@torch.library.custom_op("decode::attention_step", mutates_args=("k_cache", "v_cache", "arrivals"),
                         tags=(torch.Tag.flexible_layout,))
def attention_step(qkv_partials: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, arrivals: torch.Tensor,
                   n_heads: int, qkv_bias: torch.Tensor | None = None) -> torch.Tensor:
    """qkv_partials (S, (H + 2 Hkv) D) fp32, cos/sin (..., D), k_cache/v_cache (1, Hkv, L, D) contiguous, mask
    (..., L) bool (True = visible), pos (1,) the new token's slot, arrivals (Hkv,) int32 zeros (left zero),
    qkv_bias ((H + 2 Hkv) D,) or None -> attention output (H * D,) in the cache's dtype; writes slot pos."""
    S, n_qkv = qkv_partials.shape
    _, n_kv, L, D = k_cache.shape
    cos, sin, mask = cos.reshape(D), sin.reshape(D), mask.reshape(L)  # views unless a layout needs a copy
    assert qkv_partials.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert qkv_bias is None or (qkv_bias.is_contiguous() and qkv_bias.numel() == n_qkv)
    G_PAD = max(16, next_power_of_2(n_heads // n_kv))  # tl.dot's smallest M
    n_blocks = cdiv(L, BLOCK_L)
    out = torch.empty(n_heads * D, device=k_cache.device, dtype=k_cache.dtype)
    acc_ws = torch.empty((n_kv, n_blocks, G_PAD, D), device=k_cache.device, dtype=torch.float32)
    ml_ws = torch.empty((n_kv, n_blocks, 2, G_PAD), device=k_cache.device, dtype=torch.float32)
    bias = qkv_partials if qkv_bias is None else qkv_bias  # any pointer where there is none: HAS_BIAS skips it
    _decode_attention_kernel[(n_kv, n_blocks)](qkv_partials, bias, cos, sin, k_cache, v_cache, mask, pos, out, acc_ws,
                                               ml_ws, arrivals, n_qkv, D ** -0.5, L=L, SPLIT=S, H=n_heads, HKV=n_kv,
                                               D=D, G_PAD=G_PAD, BLOCK_L=BLOCK_L, N_BLOCKS=n_blocks,
                                               HAS_BIAS=qkv_bias is not None, **launch_options(k_cache, NUM_WARPS))
    return out


@attention_step.register_fake
def _(qkv_partials, cos, sin, k_cache, v_cache, mask, pos, arrivals, n_heads, qkv_bias=None):
    return k_cache.new_empty(n_heads * k_cache.shape[-1])
