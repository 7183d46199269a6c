"""Slow, obviously-correct references for the Coeus tests (float64 where it matters)."""
import torch


def naive_gla(q, k, v, g, chunk_size=None, initial_state=None, scale=None, output_final_state=True):
    """Token-by-token S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = (scale q_t)^T S_t, in float64.
    Same signature as models.gla.chunk_gla (chunk_size ignored)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    S = torch.zeros(B, H, Dk, Dv, dtype=torch.float64, device=q.device)
    if initial_state is not None:
        S = S + initial_state.double()
    outs = []
    for t in range(T):
        S = torch.exp(g[:, :, t].double())[..., None, None] * S \
            + k[:, :, t].double()[..., :, None] * v[:, :, t].double()[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t].double() * scale, S))
    o = torch.stack(outs, 2) if outs else v.new_zeros(B, H, 0, Dv).double()
    return o.to(v.dtype), (S if output_final_state else None)


def dense_sliding_window(q, k, v, window, prefix_k=None, prefix_v=None, prefix_len=0):
    """Full T x T masked softmax attention: query t sees keys t-W+1 .. t. (No prefix support.)"""
    assert prefix_k is None
    T = q.shape[2]
    t = torch.arange(T, device=q.device)
    mask = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ v.double()).to(v.dtype)


def naive_scan(u, a):
    s = torch.zeros_like(u[..., 0, :])
    out = []
    for n in range(u.shape[-2]):
        s = torch.exp(a[..., n])[..., None] * s + u[..., n, :]
        out.append(s)
    return torch.stack(out, -2)


def use_reference(model):
    """Put the naive global branch and the dense local branch into every mixer of a Coeus model."""
    for layer in model.layers:
        layer.mixer.global_attn = naive_gla
        layer.mixer.local_attn = dense_sliding_window
    return model


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
