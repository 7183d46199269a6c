"""Exact causal sliding-window attention: a banded-SDPA reference (no T x T mask) and a FlexAttention path.

Query t sees keys t-W+1 .. t (W keys including itself).

Banded form (the readable reference, the CPU path, and the prefill path): queries are cut into blocks of W;
block b attends to the 2W keys of blocks b-1 and b through one fixed (W, 2W) band mask, so memory is
O(T*W). The keys "before" the first block are a prefix: zeros in training, or during chunked prefill the
last W keys/values of the previous chunk (the decode ring buffer in chronological order), of which only the
last `prefix_len` are real.

Flex form (CUDA, training/parallel form without a prefix): torch.nn.attention.flex_attention with a
sliding-window block mask, so only the (query block, key block) tiles the window touches are computed and
nothing of size T x T (nor the banded form's padded (nb, W, 2W) copies of k and v) is materialised. The
block mask is built once per (T, W, device) straight from the block geometry (create_block_mask would
evaluate the mask on all T x T pairs first) and cached; flex_attention is torch.compile'd once, lazily,
since uncompiled it falls back to a dense reference implementation.
"""
import torch
import torch.nn.functional as F

FLEX_BLOCK = 128           # FlexAttention's default tile (queries and keys)
_BLOCK_MASKS = {}          # (T, W, device) -> BlockMask
_COMPILED_FLEX = None      # torch.compile(flex_attention), built on first CUDA use


def band_mask(W, n_blocks, prefix_len, device):
    """(n_blocks, W, 2W) bool: query r of block b sees key s of [block b-1, block b] iff r < s <= W + r,
    and in block 0 only the last prefix_len prefix keys exist. prefix_len: int or 0-dim tensor."""
    r = torch.arange(W, device=device)[:, None]
    s = torch.arange(2 * W, device=device)[None, :]
    band = (s > r) & (s <= W + r)                                   # (W, 2W)
    b = torch.arange(n_blocks, device=device)[:, None, None]
    exists = (b > 0) | (s[None] >= W - torch.as_tensor(prefix_len, device=device))
    return band[None] & exists                                      # (n_blocks, W, 2W)


def banded_sliding_window_attention(q, k, v, window, prefix_k=None, prefix_v=None, prefix_len=0, dropout_p=0.0):
    """q, k, v (B, H, T, D) -> (B, H, T, D). prefix_k/v (B, H, W, D) precede the sequence (chronological).
    dropout_p: dropout on the attention probabilities (training)."""
    B, H, T, D = q.shape
    W = window
    pad = (-T) % W
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    nb = (T + pad) // W
    if prefix_k is None:
        prefix_k = k.new_zeros(B, H, W, D)
        prefix_v = v.new_zeros(B, H, W, D)
        prefix_len = 0
    kf = torch.cat([prefix_k.to(k.dtype), k], 2)                    # (B, H, (nb+1) W, D)
    vf = torch.cat([prefix_v.to(v.dtype), v], 2)
    # keys of block b = kf[b W : b W + 2W]: the previous block followed by its own
    kb = torch.cat([kf[:, :, :-W].unflatten(2, (nb, W)), kf[:, :, W:].unflatten(2, (nb, W))], 3)  # (B, H, nb, 2W, D)
    vb = torch.cat([vf[:, :, :-W].unflatten(2, (nb, W)), vf[:, :, W:].unflatten(2, (nb, W))], 3)
    qb = q.unflatten(2, (nb, W))                                    # (B, H, nb, W, D)
    mask = band_mask(W, nb, prefix_len, q.device)                   # (nb, W, 2W)
    # SDPA wants 4-D: fold (B, H) together, blocks in the "head" slot so the mask broadcasts
    o = F.scaled_dot_product_attention(qb.flatten(0, 1), kb.flatten(0, 1), vb.flatten(0, 1), attn_mask=mask,
                                       dropout_p=dropout_p)
    o = o.unflatten(0, (B, H)).flatten(2, 3)[:, :, :T]              # (B, H, T, D)
    return o


def _window_mask_mod(W):
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < W)
    return mask_mod


def build_window_block_mask(T, W, device, block=FLEX_BLOCK):
    """FlexAttention BlockMask of causal window W over T queries and keys, from the tile geometry alone.

    Tile (i, j) covers queries [qa, qb] and keys [ka, kb]; the differences q - kv there span [qa - kb, qb - ka].
    A tile is computed iff that span meets [0, W-1], and is "full" (mask_mod skipped) iff it lies inside it and
    the tile is not cut by the end of the sequence. O((T/block)^2) work, never T x T.
    """
    from torch.nn.attention.flex_attention import BlockMask
    n = -(-T // block)
    start = torch.arange(n, device=device) * block
    end = torch.clamp(start + block - 1, max=T - 1)
    qa, qb = start[:, None], end[:, None]                            # (n, 1) query tiles
    ka, kb = start[None, :], end[None, :]                            # (1, n) key tiles
    touched = (qb - ka >= 0) & (qa - kb <= W - 1)                    # (n, n)
    whole = (end - start + 1 == block)
    full = (qa - kb >= 0) & (qb - ka <= W - 1) & whole[:, None] & whole[None, :]
    partial = touched & ~full

    def ordered(m):  # (n, n) bool -> counts (1, 1, n), indices (1, 1, n, n): the set tiles first, in order
        counts = m.sum(-1, dtype=torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None, None], idx[None, None]

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=_window_mask_mod(W), seq_lengths=(T, T))


def window_block_mask(T, W, device):
    """The cached BlockMask for (T, W, device); built inline (uncached) while torch.compile traces."""
    if torch.compiler.is_compiling():
        return build_window_block_mask(T, W, device)
    key = (T, W, str(device))
    if key not in _BLOCK_MASKS:
        _BLOCK_MASKS[key] = build_window_block_mask(T, W, device)
    return _BLOCK_MASKS[key]


def _flex_fn(device):
    """flex_attention itself inside an outer torch.compile or on the CPU (eager, for tests); otherwise the
    module's one compiled copy (uncompiled it would materialise T x T scores)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention
    if torch.compiler.is_compiling() or device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def flex_sliding_window_attention(q, k, v, window):
    """q, k, v (B, H, T, D) -> (B, H, T, D) through FlexAttention; same result as the banded form without prefix."""
    T = q.shape[2]
    return _flex_fn(q.device)(q, k, v, block_mask=window_block_mask(T, window, q.device))


def sliding_window_attention(q, k, v, window, prefix_k=None, prefix_v=None, prefix_len=0, dropout_p=0.0,
                             impl="auto"):
    """q, k, v (B, H, T, D) -> (B, H, T, D). prefix_k/v (B, H, W, D) precede the sequence (chronological).
    dropout_p: dropout on the attention probabilities (training).
    impl: "banded" (SDPA on blocks), "flex" (FlexAttention; no prefix, no dropout), or "auto": flex on CUDA
    when there is no prefix and no dropout, banded otherwise."""
    if impl == "auto":
        impl = "flex" if q.is_cuda and prefix_k is None and not dropout_p else "banded"
    if impl == "flex":
        if prefix_k is not None or dropout_p:
            raise ValueError("the flex path takes no prefix and no attention dropout; use impl='banded'")
        return flex_sliding_window_attention(q, k, v, window)
    if impl != "banded":
        raise ValueError(f"impl must be 'auto', 'flex' or 'banded', not {impl!r}")
    return banded_sliding_window_attention(q, k, v, window, prefix_k, prefix_v, prefix_len, dropout_p)


def window_step(q, k_ring, v_ring, pos):
    """One query (B, H, D) against the ring buffer (B, H, W, D) already holding this token's key/value.

    pos: 0-dim long tensor, this token's position; slots 0..pos are filled while pos < W.
    """
    W = k_ring.shape[2]
    valid = torch.arange(W, device=q.device) <= pos                 # (W,)
    o = F.scaled_dot_product_attention(q[:, :, None], k_ring.to(q.dtype), v_ring.to(q.dtype),
                                       attn_mask=valid[None, None, None])
    return o[:, :, 0]
