"""Coeus: a decoder whose token mixer adds a global gated-linear-attention branch to a local
sliding-window softmax-attention branch. Linear in sequence length for training, O(1) memory per token
for generation.

References: GLA (Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient
Training"), Mamba-2's SSD chunked form (ssd_minimal.py), fla's chunk_gla; sliding-window attention as in
Longformer / Mistral; RMSNorm, SwiGLU and RoPE as in models/llama.py.

Design choices (what the issue asks to document):
  * Gate: per HEAD, a scalar log-decay per head and token, g_t = logsigmoid(w_h . x_t + b_h) / tau with
    tau = gate_temp (16, GLA's normaliser). A scalar gate lets the intra-chunk decays be one (C x C)
    matrix per head that multiplies q k^T, so every big operation is a plain batched matmul and all decays
    are exp of non-positive numbers (stable to log-decay -30 and beyond). The biases b_h start spread so
    the heads' initial memories range from ~32 to ~4096 tokens.
  * Input scale: queries are multiplied by head_dim ** -0.5 before both branches (SDPA's scale for the
    local one, chunk_gla's `scale` for the global one). Keys and values enter the global state unscaled.
  * Output norm: the global branch's per-head output goes through an RMSNorm over head_dim (learnable gain,
    shared across heads), which keeps it O(1) however much the un-normalised state has accumulated. The
    gain starts at 0, so training starts from the local branch alone and mixes the global one in as it
    learns. In a CPU check (4 layers x 128, 200 steps) a unit initial gain gave val 2.165, a zero gain 2.053,
    and the local branch alone 2.042.
  * Fusion: additive, per head: y = RMSNorm(o_global) + o_local, then one output projection. The two
    branches share the q/k/v projections (the local one adds RoPE to q and k; the global one needs no
    positions, its decays order the tokens). The RMSNorm gain is the per-channel mixing weight.
  * Blocks: pre-norm residual, x += drop(mixer(norm(x))); x += drop(swiglu(norm(x))); tied embeddings.
    Optional attention dropout (attn_dropout) on the local branch's probabilities, as nanoGPT's attn_dropout,
    and its analogue on the global branch's intra-chunk scores (gla_dropout).

Inference state per layer: the global state S (B, H, Dk, Dv) fp32 and a ring buffer of the last W rotated
keys and values (slot = position % W), plus the shared position counter. `step` is one token, `prefill`
runs the parallel form chunk by chunk carrying that state.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from models.gla import chunk_gla, gla_step
from models.llama import RMSNorm, apply_rope, causal_lm_loss, rope_cos_sin
from models.sliding_window import sliding_window_attention, window_step


RECOMPUTE_MIXER = ("all", "alternate", "branches", "none")


@dataclass
class CoeusConfig:
    vocab_size: int = 65
    dim: int = 384
    n_layers: int = 6
    n_heads: int = 6
    head_dim: int = 64
    ffn_dim: int = 1024
    window: int = 128          # local branch: each token sees itself and the W-1 before it
    chunk_size: int = 64       # global branch: chunk length of the parallel form
    gate_temp: float = 16.0
    dropout: float = 0.0       # residual and embedding dropout (training only)
    attn_dropout: float = 0.0  # dropout on the local branch's attention probabilities (nanoGPT's attn_dropout)
    gla_dropout: float = 0.0   # dropout on the global branch's intra-chunk scores (its analogue)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    prefill_chunk: int = 4096  # tokens per parallel-form call in prefill()
    # training, what of the mixer backward redoes: "all" keeps only its input and output (norm, projection and both
    # branches are redone), "branches" also keeps the q/k/v/gate projection's output (the branches are redone: a nano
    # training step 11 % faster at 25 % more memory on an H100), "alternate" is "all" in the even layers and
    # "branches" in the odd ones (not yet measured), "none" keeps everything autograd saves. True / False (older
    # checkpoints) mean "all" / "none".
    recompute_mixer: str = "all"

    def __post_init__(self):
        self.recompute_mixer = {True: "all", False: "none"}.get(self.recompute_mixer, self.recompute_mixer)
        if self.recompute_mixer not in RECOMPUTE_MIXER:
            raise ValueError(f"recompute_mixer {self.recompute_mixer!r}: one of {', '.join(RECOMPUTE_MIXER)}")
        if self.prefill_chunk % self.chunk_size:
            raise ValueError(f"prefill_chunk {self.prefill_chunk} must be a multiple of chunk_size {self.chunk_size}")


COEUS_CONFIGS = {
    # ~10.7M parameters with a char vocabulary (nanoGPT shakespeare_char's size)
    "nano": dict(dim=384, n_layers=6, n_heads=6, head_dim=64, ffn_dim=1024),
    "small": dict(dim=768, n_layers=12, n_heads=12, head_dim=64, ffn_dim=2048, vocab_size=32000),
    "medium": dict(dim=1024, n_layers=24, n_heads=16, head_dim=64, ffn_dim=2816, vocab_size=32000),
    # for tests
    "tiny": dict(dim=32, n_layers=2, n_heads=2, head_dim=16, ffn_dim=64, window=8, chunk_size=16,
                 prefill_chunk=32),
}


def coeus_config(name, **overrides):
    if name not in COEUS_CONFIGS:
        raise KeyError(f"unknown coeus config {name!r}; known: {', '.join(COEUS_CONFIGS)}")
    return CoeusConfig(**{**COEUS_CONFIGS[name], **overrides})


class CoeusMixer(nn.Module):
    """Global gated linear attention + local sliding-window attention, fused additively per head."""

    def __init__(self, cfg: CoeusConfig):
        super().__init__()
        self.cfg = cfg
        H, D = cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, H * D, bias=False)
        self.k_proj = nn.Linear(cfg.dim, H * D, bias=False)
        self.v_proj = nn.Linear(cfg.dim, H * D, bias=False)
        self.gate_proj = nn.Linear(cfg.dim, H, bias=True)
        self.global_norm = RMSNorm(D, cfg.norm_eps)
        self.o_proj = nn.Linear(H * D, cfg.dim, bias=False)
        # swappable so the tests can put the slow references in place
        self.global_attn = chunk_gla
        self.local_attn = sliding_window_attention

    def _qkvg(self, x):
        # one matmul for the four projections: under autocast x is cast to bf16 once (not once per Linear, each
        # copy kept for backward), and q, k, v, g are views of one output
        B, T, _ = x.shape
        H, D = self.cfg.n_heads, self.cfg.head_dim
        # zero rows pad the output to a multiple of 8 columns: 3*H*D + H wide, its rows are not 16-byte aligned in
        # bf16 and cuBLAS falls back to a slow kernel for the matmul and both of its gradients (3x at nano, H100)
        pad = -(3 * H * D + H) % 8
        w = self.q_proj.weight
        w = torch.cat([w, self.k_proj.weight, self.v_proj.weight, self.gate_proj.weight, w.new_zeros(pad, w.shape[1])])
        b = self.gate_proj.bias
        b = torch.cat([b.new_zeros(3 * H * D), b, b.new_zeros(pad)])
        q, k, v, g, _ = F.linear(x, w, b).split([H * D, H * D, H * D, H, pad], dim=-1)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        g = F.logsigmoid(g.float()).transpose(1, 2) / self.cfg.gate_temp    # (B, H, T) <= 0
        return q, k, v, g

    def _mix(self, q, k, v, g, cos, sin):
        """Both branches of the training form, fused: (B, H, T, D) x 3, (B, H, T), RoPE's cos/sin (1, T, D) ->
        (B, T, H*D)."""
        # the local branch first: its rotated q and k are freed before the global branch runs, so o_g is never live
        # beside them (the other order kept all three, plus o_l, at the mixer's peak)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = self.cfg.attn_dropout if self.training else 0.0
        o_l = self.local_attn(qr, kr, v, self.cfg.window, dropout_p=p) if p else self.local_attn(qr, kr, v, self.cfg.window)
        del qr, kr
        extra = {"dropout_p": self.cfg.gla_dropout} if self.training and self.cfg.gla_dropout else {}
        o_g, _ = self.global_attn(q, k, v, g, chunk_size=self.cfg.chunk_size, output_final_state=False, **extra)
        return self._fuse(o_g, o_l)

    def _fuse(self, o_g, o_l):
        """The additive per-head fusion: (B, H, T, D) x 2 -> (B, T, H*D), ready for o_proj."""
        B, H, T, D = o_g.shape
        y = self.global_norm(o_g) + o_l.to(o_g.dtype)                   # (B, H, T, D)
        return y.transpose(1, 2).reshape(B, T, H * D)

    def rope(self, positions, dtype=torch.float32):
        """RoPE's cos/sin (1, T, D) for positions (T,), computed in fp32 and stored in dtype. Coeus.forward makes them
        once for all layers: made inside a compiled block, they were fused into the rotation and every sin/cos redone
        per element and head."""
        return rope_cos_sin(positions[None], self.cfg.head_dim, self.cfg.rope_theta, dtype)

    def _rope(self, q, k, positions):
        cos, sin = (t.to(q.dtype) for t in self.rope(positions))  # (1, T, D)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def forward(self, x, cache=None, rope=None):
        """x (B, T, dim). cache None (training), or a dict with pos (0-dim long), S (B, H, Dk, Dv), k, v
        (B, H, W, D) ring buffers: then the new cache is returned as well. rope: (cos, sin) of positions 0..T-1
        from self.rope (training form; made here when not given)."""
        B, T, _ = x.shape
        W = self.cfg.window
        q, k, v, g = self._qkvg(x)
        if cache is None:
            cos, sin = self.rope(torch.arange(T, device=x.device)) if rope is None else rope
            return self.o_proj(self._mix(q, k, v, g, cos, sin)), None
        pos = cache["pos"]
        o_g, S = self.global_attn(q, k, v, g, chunk_size=self.cfg.chunk_size, initial_state=cache["S"],
                                  output_final_state=True)
        qr, kr = self._rope(q, k, pos + torch.arange(T, device=x.device))
        order = (pos + torch.arange(W, device=x.device)) % W  # ring slots, oldest first
        pk, pv = cache["k"][:, :, order], cache["v"][:, :, order]
        o_l = self.local_attn(qr, kr, v, W, prefix_k=pk, prefix_v=pv, prefix_len=torch.clamp(pos, max=W))
        out = self.o_proj(self._fuse(o_g, o_l))
        new_pos = pos + T
        last_k = torch.cat([pk, kr.to(pk.dtype)], 2)[:, :, -W:]          # chronological last W
        last_v = torch.cat([pv, v.to(pv.dtype)], 2)[:, :, -W:]
        slot_to_j = (torch.arange(W, device=x.device) - new_pos) % W     # ring slot s holds chronological j
        return out, dict(pos=new_pos, S=S, k=last_k[:, :, slot_to_j], v=last_v[:, :, slot_to_j])

    def step(self, x, cache):
        """x (B, dim) one token per row; cache as in forward. Returns (B, dim), new cache."""
        B = x.shape[0]
        H, D, W = self.cfg.n_heads, self.cfg.head_dim, self.cfg.window
        pos = cache["pos"]
        q = self.q_proj(x).view(B, H, D)
        k = self.k_proj(x).view(B, H, D)
        v = self.v_proj(x).view(B, H, D)
        g = F.logsigmoid(self.gate_proj(x).float()) / self.cfg.gate_temp  # (B, H)
        o_g, S = gla_step(q, k, v, g, cache["S"])
        qr, kr = self._rope(q[:, :, None], k[:, :, None], pos.view(1))    # (B, H, 1, D)
        slot = (pos % W).view(1)
        k_ring = cache["k"].index_copy(2, slot, kr.to(cache["k"].dtype))
        v_ring = cache["v"].index_copy(2, slot, v[:, :, None].to(cache["v"].dtype))
        o_l = window_step(qr[:, :, 0], k_ring, v_ring, pos)
        y = self.global_norm(o_g) + o_l.to(o_g.dtype)                     # (B, H, D)
        return self.o_proj(y.reshape(B, H * D)), dict(pos=pos + 1, S=S, k=k_ring, v=v_ring)


class SwiGLU(nn.Module):
    def __init__(self, cfg: CoeusConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CoeusBlock(nn.Module):
    def __init__(self, cfg: CoeusConfig, index=0):
        super().__init__()
        self.index = index  # its place in the stack (recompute_mixer "alternate")
        self.mixer_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mixer = CoeusMixer(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def _normed_mix(self, x, cos, sin):
        m = self.mixer
        return m._mix(*m._qkvg(self.mixer_norm(x)), cos, sin)

    def forward(self, x, cache=None, rope=None):
        m = self.mixer
        recompute = m.cfg.recompute_mixer if cache is None and torch.is_grad_enabled() else "none"
        if recompute == "alternate":
            recompute = "branches" if self.index % 2 else "all"
        if recompute != "none":
            cos, sin = m.rope(torch.arange(x.shape[1], device=x.device), x.dtype) if rope is None else rope
        if recompute == "all":
            # of the mixer's work only its input x and its output (o_proj's input) are kept for backward; the norm,
            # the q/k/v/gate projection and both branches (rotated q/k, attention output and lse, the normalised
            # o_g) are redone then. That costs one small matmul and the branches' forward; kept, the projection
            # output alone (3 H D + H columns) is about as large as the Llama's saved q, k, v
            h = m.o_proj(torch.utils.checkpoint.checkpoint(self._normed_mix, x, cos, sin, use_reentrant=False))
        elif recompute == "branches":
            # the projection's output (q, k, v, g) and its normed input stay; only the branches are redone
            mixed = torch.utils.checkpoint.checkpoint(m._mix, *m._qkvg(self.mixer_norm(x)), cos, sin,
                                                      use_reentrant=False)
            h = m.o_proj(mixed)
        else:
            h, cache = m(self.mixer_norm(x), cache, rope)
        x = x + self.drop(h)
        return x + self.drop(self.mlp(self.mlp_norm(x))), cache

    def step(self, x, cache):
        h, cache = self.mixer.step(self.mixer_norm(x), cache)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache


class Coeus(nn.Module):
    def __init__(self, cfg: CoeusConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(CoeusBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied
        self.apply(self._init_weights)
        for layer in self.layers:  # GPT-2: residual projections scaled by 1/sqrt(2 L)
            for lin in (layer.mixer.o_proj, layer.mlp.down_proj):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))
            # gate biases: initial per-head memory 1/(1-decay) spread geometrically over 32 .. 4096 tokens
            mem = torch.logspace(math.log10(32), math.log10(4096), cfg.n_heads)
            target = torch.log1p(-1.0 / mem) * cfg.gate_temp            # logsigmoid(b) = tau * log(decay)
            with torch.no_grad():
                layer.mixer.gate_proj.bias.copy_(target - torch.log(-torch.expm1(target)))  # inverse logsigmoid
                layer.mixer.gate_proj.weight.mul_(0.1)
            # the global branch starts switched off (ReZero-style) and is mixed in as it learns: with a unit
            # gain its normalised output drowned the local branch at init and slowed early training
            nn.init.zeros_(layer.mixer.global_norm.weight)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def num_params(self, exclude_embeddings=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embeddings else n

    # --- training / parallel form -----------------------------------------------------------------
    def forward(self, input_ids, labels=None):
        """input_ids (B, T) -> logits (B, T, V); with labels (HF convention, shifted inside, -100 ignored)
        also the mean loss."""
        x = self.drop(self.embed_tokens(input_ids))
        # in the activations' dtype (fp32 under autocast, where the blocks round them to bf16 as before)
        rope = self.layers[0].mixer.rope(torch.arange(input_ids.shape[1], device=input_ids.device), x.dtype)
        for layer in self.layers:
            x = layer(x, rope=rope)[0]
        logits = self.lm_head(self.norm(x))
        if labels is None:
            return logits
        return logits, causal_lm_loss(logits, labels)

    # --- inference --------------------------------------------------------------------------------
    def init_state(self, batch_size, device=None, dtype=None):
        """Zero state: pos (0-dim long), S (L, B, H, Dk, Dv) fp32, k/v ring buffers (L, B, H, W, D)."""
        cfg = self.config
        p = self.embed_tokens.weight
        device, dtype = device or p.device, dtype or p.dtype
        L, H, D, W = cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.window
        return dict(pos=torch.zeros((), dtype=torch.long, device=device),
                    S=torch.zeros(L, batch_size, H, D, D, dtype=torch.float32, device=device),
                    k=torch.zeros(L, batch_size, H, W, D, dtype=dtype, device=device),
                    v=torch.zeros(L, batch_size, H, W, D, dtype=dtype, device=device))

    @staticmethod
    def _layer_cache(state, i):
        return dict(pos=state["pos"], S=state["S"][i], k=state["k"][i], v=state["v"][i])

    @staticmethod
    def _stack(caches):
        return dict(pos=caches[0]["pos"], S=torch.stack([c["S"] for c in caches]),
                    k=torch.stack([c["k"] for c in caches]), v=torch.stack([c["v"] for c in caches]))

    def _step(self, token_ids, state):
        x = self.embed_tokens(token_ids)  # (B, dim)
        caches = []
        for i, layer in enumerate(self.layers):
            x, c = layer.step(x, self._layer_cache(state, i))
            caches.append(c)
        return self.lm_head(self.norm(x)), self._stack(caches)

    @torch.no_grad()
    def step(self, token_ids, state):
        """One token per row: token_ids (B,) -> logits (B, V) fp32, new state. Static shapes and no host sync,
        so it compiles whole (callers wrap it in utils.runtime.CompiledOrEager)."""
        logits, state = self._step(token_ids, state)
        return logits.float(), state

    @torch.no_grad()
    def prefill(self, input_ids, state=None, last_only=False):
        """Run a prompt (B, T) through the parallel form, prefill_chunk tokens at a time, carrying the state.
        Returns logits (B, T, V) fp32 (or (B, V) of the last token if last_only) and the new state."""
        B, T = input_ids.shape
        if state is None:
            state = self.init_state(B)
        outs = []
        for s in range(0, T, self.config.prefill_chunk):
            x = self.embed_tokens(input_ids[:, s:s + self.config.prefill_chunk])
            caches = []
            for i, layer in enumerate(self.layers):
                x, c = layer(x, self._layer_cache(state, i))
                caches.append(c)
            state = self._stack(caches)
            h = self.norm(x[:, -1:] if last_only else x)
            outs.append(self.lm_head(h).float())
        if last_only:
            return outs[-1][:, -1], state
        return torch.cat(outs, 1), state

