"""Exact causal sliding-window attention, block-wise with SDPA (no T x T mask).

Query t sees keys t-W+1 .. t (W keys including itself). Queries are cut into blocks of W; block b
attends to the 2W keys of blocks b-1 and b through one fixed (W, 2W) band mask, so memory is O(T*W).
The keys "before" the first block are a prefix: zeros in training, or during chunked prefill the last W
keys/values of the previous chunk (the decode ring buffer in chronological order), of which only the
last `prefix_len` are real.
"""
import torch
import torch.nn.functional as F


def band_mask(W, n_blocks, prefix_len, device):
    """(n_blocks, W, 2W) bool: query r of block b sees key s of [block b-1, block b] iff r < s <= W + r,
    and in block 0 only the last prefix_len prefix keys exist. prefix_len: int or 0-dim tensor."""
    r = torch.arange(W, device=device)[:, None]
    s = torch.arange(2 * W, device=device)[None, :]
    band = (s > r) & (s <= W + r)                                   # (W, 2W)
    b = torch.arange(n_blocks, device=device)[:, None, None]
    exists = (b > 0) | (s[None] >= W - torch.as_tensor(prefix_len, device=device))
    return band[None] & exists                                      # (n_blocks, W, 2W)


def sliding_window_attention(q, k, v, window, prefix_k=None, prefix_v=None, prefix_len=0, dropout_p=0.0):
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


def window_step(q, k_ring, v_ring, pos):
    """One query (B, H, D) against the ring buffer (B, H, W, D) already holding this token's key/value.

    pos: 0-dim long tensor, this token's position; slots 0..pos are filled while pos < W.
    """
    W = k_ring.shape[2]
    valid = torch.arange(W, device=q.device) <= pos                 # (W,)
    o = F.scaled_dot_product_attention(q[:, :, None], k_ring.to(q.dtype), v_ring.to(q.dtype),
                                       attn_mask=valid[None, None, None])
    return o[:, :, 0]
