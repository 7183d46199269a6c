"""Chunked gated linear attention with a per-head scalar decay, in plain PyTorch (torch.compile friendly).

Recurrence, per batch row and head (Dk x Dv state S, log-decay g_t <= 0):
    S_t = exp(g_t) * S_{t-1} + k_t v_t^T        o_t = q_t^T S_t
Chunked parallel form (Mamba-2's SSD / fla's chunk_gla with a scalar gate), chunk of C tokens:
  * intra-chunk: o_i += sum_{j<=i} (q_i . k_j) exp(seg[i, j]) v_j                 -- batched (C x C) matmuls
    where seg[i, j] = g_{j+1} + ... + g_i: by default the difference of the cumsum WITHIN the chunk (never
    of one long cumsum over T, which loses all precision), or, with exact_segsum=True, a masked cumsum
    (ssd_minimal's segsum) in which every entry sums only its own terms;
  * each chunk's own state contribution U_n = sum_j exp(segsum(g)[C-1, j]) k_j v_j^T  -- one batched matmul;
  * the states entering every chunk come from a scan over chunks of S_n = exp(G_n) S_{n-1} + U_n (G_n the
    chunk's total log-decay). The scan is itself chunked: groups of 64 chunks are done as one (64 x 64)
    decay-matrix matmul each, and the group boundaries are scanned the same way, recursively. So there
    is no Python loop over the T/C chunks, and no T x T (nor (T/C) x (T/C)) tensor;
  * inter-chunk: o_i += exp(cumsum(g)_i) q_i^T S_{entering chunk}.
Memory is O(T*C + (T/C)*Dk*Dv) per head. Decays only ever enter as exp(x) with x <= 0, so a log-decay of
-30 (or -inf) underflows to an exact 0 instead of overflowing: no NaN/Inf in fp32 or bf16.

Precision: q/k/v stay in their dtype (bf16 under AMP) for the big matmuls (fp32 accumulation inside the
GEMM); decays, the decay-weighted score matrix and the states are fp32, as in fla.
"""
import torch
import torch.nn.functional as F

SCAN_GROUP = 64  # chunks per group in the state scan


def segsum(g):
    """g (..., C) -> (..., C, C) with out[i, j] = g[j+1] + ... + g[i] for i >= j, -inf above the diagonal.

    Built as a masked cumsum (ssd_minimal's stable segsum): each entry sums only its own terms.
    """
    C = g.shape[-1]
    x = g[..., None].expand(*g.shape, C)  # x[..., i, j] = g[i]
    strict = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1)
    x = x.masked_fill(~strict, 0.0)
    s = x.cumsum(-2)  # s[i, j] = sum_{j < m <= i} g[m]
    lower = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    return s.masked_fill(~lower, float("-inf"))


def scan_states(u, a, group=SCAN_GROUP):
    """Inclusive linear scan s[n] = exp(a[n]) * s[n-1] + u[n] (s[-1] = 0), parallel over n.

    u (..., N, K) fp32, a (..., N) fp32 log-decays <= 0. Groups of `group` steps are one decay-matrix
    matmul each; the group ends are scanned recursively (depth log_group(N)).
    """
    N = u.shape[-2]
    if N <= group:
        return torch.exp(segsum(a)) @ u
    pad = (-N) % group
    if pad:
        u = F.pad(u, (0, 0, 0, pad))
        a = F.pad(a, (0, pad))
    M = (N + pad) // group
    u = u.unflatten(-2, (M, group))                 # (..., M, G, K)
    a = a.unflatten(-1, (M, group))                 # (..., M, G)
    local = torch.exp(segsum(a)) @ u                # scan inside each group, from a zero state
    ends = scan_states(local[..., -1, :], a.sum(-1), group)  # (..., M, K) true state at each group's end
    carry = F.pad(ends[..., :-1, :], (0, 0, 1, 0))  # state entering each group
    s = local + torch.exp(a.cumsum(-1))[..., None] * carry[..., None, :]
    return s.flatten(-3, -2)[..., :N, :]


def chunk_gla(q, k, v, g, chunk_size=64, initial_state=None, scale=None, output_final_state=True,
              exact_segsum=False, dropout_p=0.0):
    """Gated linear attention, chunked parallel form.

    q, k (B, H, T, Dk); v (B, H, T, Dv); g (B, H, T) log-decays <= 0 (per head, per token).
    initial_state (B, H, Dk, Dv) or None. scale multiplies q (default Dk ** -0.5).
    exact_segsum: build the intra-chunk decays with segsum() instead of differences of the within-chunk
    cumsum (exact to the last bit for log-decays of very different sizes; the default is faster and its
    error is an absolute ~1e-7 * |cumsum within the chunk| in the exponent).
    dropout_p: dropout on the intra-chunk scores (training regulariser, the analogue of attention dropout;
    the state passed between chunks is left whole).
    Returns o (B, H, T, Dv) in v's dtype and the final state (B, H, Dk, Dv) fp32 (or None).
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    scale = Dk ** -0.5 if scale is None else scale
    dtype = q.dtype
    acc = torch.promote_types(dtype, torch.float32)  # fp32, or float64 for the reference tests
    with torch.autocast(q.device.type, enabled=False):
        q = q * scale
        g = g.to(acc)
        pad = (-T) % C
        if pad:  # zero keys and zero log-decay at the end: they change neither outputs nor the final state
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            g = F.pad(g, (0, pad))
        N = (T + pad) // C
        q, k, v = (t.unflatten(2, (N, C)) for t in (q, k, v))  # (B, H, N, C, D)
        g = g.unflatten(2, (N, C))                               # (B, H, N, C)

        decay_in = g.cumsum(-1)                                  # (B, H, N, C) log-decay chunk start -> i (incl.)
        causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
        if exact_segsum:  # every entry summed from its own terms: (C, C) cumsum per chunk, slower
            seg = segsum(g)
        else:             # difference of the within-chunk cumsum: elementwise, fuses into the scores
            seg = torch.where(causal, decay_in[..., :, None] - decay_in[..., None, :], float("-inf"))
        decay_out = seg[..., -1, :]                              # log-decay from j (excl.) to the chunk end
        chunk_decay = decay_in[..., -1]                          # (B, H, N)

        # intra-chunk: decay-weighted causal scores, fp32, then back to the input dtype for the matmul
        scores = (q @ k.transpose(-1, -2)).to(acc) * torch.exp(seg)   # (B, H, N, C, C)
        if dropout_p:
            scores = F.dropout(scores, dropout_p)
        o = scores.to(dtype) @ v                                       # (B, H, N, C, Dv)

        # each chunk's state contribution, then the scan over chunks
        k_out = (k.to(acc) * torch.exp(decay_out)[..., None]).to(dtype)
        u = (k_out.transpose(-1, -2) @ v).to(acc)                      # (B, H, N, Dk, Dv)
        states = scan_states(u.flatten(-2), chunk_decay)               # (B, H, N, Dk*Dv) inclusive
        if initial_state is not None:
            s0 = initial_state.to(acc).flatten(-2)                     # (B, H, Dk*Dv)
            states = states + torch.exp(chunk_decay.cumsum(-1))[..., None] * s0[:, :, None]
        else:
            s0 = states.new_zeros(B, H, Dk * Dv)
        entering = torch.cat([s0[:, :, None], states[:, :, :-1]], 2).unflatten(-1, (Dk, Dv))  # (B, H, N, Dk, Dv)

        # inter-chunk: queries read the state that entered their chunk, decayed to their position
        q_in = (q.to(acc) * torch.exp(decay_in)[..., None]).to(dtype)
        o = o + q_in @ entering.to(dtype)
        o = o.flatten(2, 3)[:, :, :T]
        final = states[:, :, -1].unflatten(-1, (Dk, Dv)) if output_final_state else None
    return o.to(v.dtype), final


def gla_step(q, k, v, g, state, scale=None):
    """One token: q, k (B, H, Dk), v (B, H, Dv), g (B, H), state (B, H, Dk, Dv) fp32 -> o (B, H, Dv), state."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = state.dtype
    state = torch.exp(g.to(acc))[..., None, None] * state + k.to(acc)[..., :, None] * v.to(acc)[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q.to(acc) * scale, state)
    return o.to(v.dtype), state
