"""Llama-family decoder: RMSNorm, RoPE, grouped-query attention (SDPA), SwiGLU, static KV cache.

Mirrors transformers/models/llama/modeling_llama.py (LlamaRMSNorm, LlamaRotaryEmbedding with
`rotate_half`, LlamaAttention, LlamaMLP, LlamaDecoderLayer) so Hugging Face weights load unpermuted
(see models/hf_weights.py). One class serves the families researchers pair, by LlamaConfig switches:
    TinyLlama / Llama-2   plain RoPE
    Llama-3.1 / 3.2       rope_scaling llama3 (transformers/modeling_rope_utils.py `_compute_llama3_parameters`)
    linear / dynamic      position interpolation, NTK-aware dynamic theta (`_compute_linear_scaling_rope_parameters`,
                          `_compute_dynamic_ntk_parameters`)
    Qwen2 / Qwen2.5       attention_bias (q/k/v projections only, as transformers/models/qwen2/modeling_qwen2.py),
                          theta 1e6, tied head The KV cache is preallocated once, as in gpt-fast, so a decode step has
static shapes and can be compiled into a CUDA graph.

attention_mask convention (B, T) integer tensor, 0 = padding, and any positive value a segment id:
a query sees a key only if both carry the same id (and the key is not in the future). A plain 0/1
padding mask is the one-segment case; packed rows give each sample its own id.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 2048
    n_layers: int = 22
    n_heads: int = 32
    n_kv_heads: int = 4
    ffn_dim: int = 5632
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # None = plain RoPE; else transformers' rope_parameters minus rope_theta, e.g. {"rope_type": "llama3",
    # "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    # {"rope_type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0,
    # "original_max_position_embeddings": 2048 (default max_seq_len)}
    rope_scaling: Optional[dict] = None
    attention_bias: bool = False  # bias on q/k/v (Qwen2's, always on there)
    o_proj_bias: bool = False     # bias on o_proj too (transformers' Llama attention_bias=True sets both)

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim} / n_heads {self.n_heads} / n_kv_heads {self.n_kv_heads} do not divide")
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            kind = self.rope_scaling.get("rope_type", "default")
            if kind not in ROPE_SCALING_KEYS:
                raise ValueError(f"rope_scaling type {kind!r} is not implemented; "
                                 f"known: {', '.join(ROPE_SCALING_KEYS)}")
            lacking = [k for k in ROPE_SCALING_KEYS[kind] if k not in self.rope_scaling]
            if lacking:
                raise ValueError(f"rope_scaling {kind!r} lacks {', '.join(lacking)}")
            if kind == "default":
                self.rope_scaling = None


# the parameters each rope_scaling type needs (dynamic's original_max_position_embeddings defaults to max_seq_len)
ROPE_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


LLAMA_CONFIGS = {
    "tinyllama-1.1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                           max_seq_len=2048),
    # the published config.json shapes (meta-llama/Meta-Llama-3-8B, Llama-3.1-8B, Llama-3.2-1B, Qwen/Qwen2.5-*)
    "llama3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      max_seq_len=8192, rope_theta=500000.0),
    "llama3.1-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                        max_seq_len=131072, rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
    "llama3.2-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                        max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True,
                        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
    "qwen2.5-0.5b": dict(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864,
                         max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True,
                         attention_bias=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, ffn_dim=8960,
                         max_seq_len=131072, rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True,
                         attention_bias=True),
    # ~10M non-embedding parameters: matched to Coeus `nano` for honest comparisons
    "small": dict(vocab_size=32000, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=1024, max_seq_len=1024),
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256),
    "tiny-qwen2": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256,
                       rope_theta=1000000.0, tie_embeddings=True, attention_bias=True),
}


def llama_config(name, **overrides):
    if name not in LLAMA_CONFIGS:
        raise KeyError(f"unknown llama config {name!r}; known: {', '.join(LLAMA_CONFIGS)}")
    return LlamaConfig(**{**LLAMA_CONFIGS[name], **overrides})


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # statistics in fp32 whatever the activation dtype, as LlamaRMSNorm does
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(head_dim, theta, device, scaling=None, positions=None, max_seq_len=None):
    """RoPE's inverse frequencies (head_dim/2,) fp32, as transformers' ROPE_INIT_FUNCTIONS compute them.

    scaling: LlamaConfig.rope_scaling (None = plain). dynamic needs the positions of this call: beyond the original
    context L0 the base grows to theta * (factor * S / L0 - (factor - 1)) ** (D / (D - 2)), S = max position + 1 of
    the call (tensor arithmetic, no host sync). With a KV cache, earlier keys keep the theta of their own step, as
    in transformers' generate: cached decoding equals the full forward only within the original context."""
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim  # (D/2,)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "dynamic":
        factor = float(scaling["factor"])
        orig = scaling.get("original_max_position_embeddings") or max_seq_len
        seq = (positions.max() + 1).clamp(min=orig).float()                  # () on the device
        base = theta * ((factor * seq / orig) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** exponent)
    inv_freq = 1.0 / (theta ** exponent)
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        # wavelengths shorter than L0/high kept, longer than L0/low divided by factor, smooth in between
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    if kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not implemented; known: {', '.join(ROPE_SCALING_KEYS)}")
    return inv_freq


def rope_cos_sin(positions, head_dim, theta, dtype, scaling=None, max_seq_len=None):
    """cos/sin for integer positions of any shape -> (*positions.shape, head_dim), HF's duplicated-halves layout.
    scaling / max_seq_len: see rope_inv_freq (default: plain RoPE)."""
    inv_freq = rope_inv_freq(head_dim, theta, positions.device, scaling, positions, max_seq_len)
    freqs = positions.float()[..., None] * inv_freq  # (..., head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x: (B, H, T, D); cos/sin: (B, T, D) -> broadcast over heads
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class KVCache(nn.Module):
    """Preallocated keys/values for one layer: (B, n_kv_heads, max_len, head_dim)."""

    def __init__(self, batch, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        # input_pos: (T,) absolute positions of the new tokens, shared by the batch
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_proj_bias)
        self.qkv_proj = None  # set by fuse_projections() for inference
        self.kv_cache = None

    def fuse_projections(self):
        """One (q|k|v) matmul instead of three: fewer, larger kernels per decode step. Inference only."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        w = torch.cat([p.weight for p in projs]).detach()  # (H*D + 2*Hkv*D, dim)
        has_bias = self.q_proj.bias is not None
        self.qkv_proj = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
        self.qkv_proj.weight.data.copy_(w)
        if has_bias:  # (H*D + 2*Hkv*D,), same order as the rows
            self.qkv_proj.bias.data.copy_(torch.cat([p.bias for p in projs]).detach())
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, mask=None, input_pos=None):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, H, D).transpose(1, 2)    # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, Hkv, max_len, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if T == 1 and self.kv_cache is not None and input_pos is not None:
            y = decode_attention(q, k, v, mask)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
        elif H != Hkv:
            # grouped layout: the G query heads that share a KV head become G*T query rows of that head,
            # so K/V are read once instead of being repeated per query head (HF's repeat_kv order: h = j*G + g)
            G = H // Hkv
            qg = q.reshape(B, Hkv, G * T, D)                          # (B, Hkv, G*T, D), row g*T + t
            mg = mask.repeat(1, 1, G, 1)                              # (B|1, 1, G*T, L)
            y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mg).reshape(B, H, T, D)  # not contiguous (fp32 CUDA)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.o_proj(y)


def decode_attention(q, k, v, mask):
    """One new query per row against the static cache: q (B, H, 1, D), k/v (B, Hkv, L, D), mask (B|1, 1, 1, L).

    Two small matmuls and a softmax that torch.compile fuses into the decode step's graph; the G query heads
    sharing a KV head are one (G, D) x (D, L) product, so K/V are read once. Faster than SDPA's kernels for a
    single query on an H200 (benchmarks/bench_decode.py)."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.view(B, Hkv, H // Hkv, D)                              # (B, Hkv, G, D), head h = j * G + g
    scores = (qg @ k.transpose(-1, -2)).float() * D ** -0.5       # (B, Hkv, G, L)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v).view(B, H, 1, D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.gate_up_proj = None  # set by fuse_projections() for inference

    def fuse_projections(self):
        """One (gate|up) matmul instead of two. Inference only."""
        w = torch.cat([self.gate_proj.weight, self.up_proj.weight]).detach()
        self.gate_up_proj = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        self.gate_up_proj.weight.data.copy_(w)
        del self.gate_proj, self.up_proj

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, input_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False
        self.cache_len = 0
        # the fused loss's per-chunk step (loss(): head + cross-entropy); kernels/cross_entropy.py swaps in a kernel
        self.chunk_loss = cross_entropy_chunk
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # HF's LlamaPreTrainedModel init: N(0, 0.02) for linears and embeddings, zero biases
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self, exclude_embeddings=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embeddings else n

    def resize_token_embeddings(self, new_vocab):
        """Grow (or shrink) embeddings and head, keeping the old rows; new rows get the mean of the old."""
        old = self.embed_tokens.weight.data
        if new_vocab == old.shape[0]:
            return
        n = min(new_vocab, old.shape[0])
        emb = nn.Embedding(new_vocab, self.config.dim, device=old.device, dtype=old.dtype)
        emb.weight.data[:n] = old[:n]
        emb.weight.data[n:] = old.mean(0, keepdim=True)
        self.embed_tokens = emb
        if self.config.tie_embeddings:
            self.lm_head = nn.Linear(self.config.dim, new_vocab, bias=False, device=old.device, dtype=old.dtype)
            self.lm_head.weight = self.embed_tokens.weight
        else:
            old_head = self.lm_head.weight.data
            head = nn.Linear(self.config.dim, new_vocab, bias=False, device=old.device, dtype=old.dtype)
            head.weight.data[:n] = old_head[:n]
            head.weight.data[n:] = old_head.mean(0, keepdim=True)
            self.lm_head = head
        self.config.vocab_size = new_vocab

    # --- KV cache -------------------------------------------------------------------------------
    def setup_cache(self, batch_size, max_len=None, dtype=None, device=None):
        """Allocate a static KV cache of max_len positions (default: the context length)."""
        max_len = max_len or self.config.max_seq_len
        if max_len > self.config.max_seq_len:
            raise ValueError(f"cache of {max_len} positions exceeds the model's context of {self.config.max_seq_len}")
        p = self.embed_tokens.weight
        dtype, device = dtype or p.dtype, device or p.device
        for layer in self.layers:
            a = layer.self_attn
            a.kv_cache = KVCache(batch_size, a.n_kv_heads, max_len, a.head_dim, dtype, device)
        self.cache_len = max_len
        causal = torch.ones(max_len, max_len, dtype=torch.bool, device=device).tril()
        self.register_buffer("causal_mask", causal, persistent=False)

    def clear_cache(self):
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.cache_len = 0

    def fuse_projections(self):
        """Concatenate q/k/v and gate/up weights for decoding (7 -> 4 matmuls per layer, same outputs).

        Inference only: the parameter names change, so neither train nor save a fused model.
        """
        for layer in self.layers:
            if layer.self_attn.qkv_proj is None:
                layer.self_attn.fuse_projections()
                layer.mlp.fuse_projections()
        return self

    # --- forward --------------------------------------------------------------------------------
    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                input_pos=None, labels=None, return_hidden=False):
        """
        input_ids (B, T) or inputs_embeds (B, T, dim).
        attention_mask (B, T) (or (B, cache_len) with a cache): 0 = padding, positive = segment id.
        position_ids (B, T): RoPE positions; default 0..T-1 (or input_pos with a cache).
        input_pos (T,): absolute cache slots of these tokens; given => the KV cache is used.
        labels (B, T): next-token targets are labels shifted by one (HF convention), -100 ignored.
        Returns logits (B, T, V), plus loss if labels, plus final hidden states if return_hidden.
        """
        h = self.hidden(input_ids, inputs_embeds, attention_mask, position_ids, input_pos)
        logits = self.lm_head(h)
        out = (logits,)
        if labels is not None:
            out += (causal_lm_loss(logits, labels),)
        if return_hidden:
            out += (h,)
        return out[0] if len(out) == 1 else out

    def hidden(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, input_pos=None):
        """The final-norm hidden states (B, T, dim): forward without the head. Same arguments as forward."""
        x, cos, sin, mask = self.layer_inputs(input_ids, inputs_embeds, attention_mask, position_ids, input_pos)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                # early_stop=False: the recompute runs the whole block, which a torch.compile'd block needs
                # (stopping inside the compiled graph trips checkpoint's early-stop assertion)
                x = checkpoint(layer, x, cos, sin, mask, input_pos, use_reentrant=False, early_stop=False)
            else:
                x = layer(x, cos, sin, mask, input_pos)
        return self.norm(x)

    def layer_inputs(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                     input_pos=None):
        """What every layer is called with: x (B, T, dim) the embeddings, cos/sin (B, T, head_dim) and the mask
        (B|1, 1, T, L) bool or None. Same arguments as forward; a caller running the layers its own way (the
        fused decode step of utils/decoding.py's LlamaLM) then finishes with norm and lm_head."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        use_cache = input_pos is not None
        if use_cache and self.cache_len == 0:
            raise RuntimeError("input_pos given but no KV cache: call setup_cache(batch_size) first")
        if position_ids is None:
            base = input_pos if use_cache else torch.arange(T, device=x.device)
            position_ids = base[None].expand(B, T)
        c = self.config
        cos, sin = rope_cos_sin(position_ids, c.head_dim, c.rope_theta, x.dtype, c.rope_scaling, c.max_seq_len)
        mask = self._build_mask(attention_mask, input_pos, B, T, x.device)
        return x, cos, sin, mask

    def loss(self, input_ids=None, labels=None, inputs_embeds=None, attention_mask=None, position_ids=None,
             chunk_size=4096):
        """The causal-LM loss of forward(..., labels=labels) without ever holding the (B, T, V) logits.

        For training: the head and the cross-entropy run chunk by chunk (fused_linear_cross_entropy), which
        at TinyLlama's 8 x 2048 x 32000 saves the ~4 GB of fp32 logits and their gradient.
        """
        h = self.hidden(input_ids, inputs_embeds, attention_mask, position_ids)
        h = h[:, :-1].reshape(-1, h.size(-1))  # position t predicts labels[t + 1]
        return fused_linear_cross_entropy(h, self.lm_head.weight, labels[:, 1:].reshape(-1), chunk_size=chunk_size,
                                          chunk_loss=self.chunk_loss)

    def _build_mask(self, attention_mask, input_pos, B, T, device):
        """Boolean (B, 1, Tq, Tk) mask, or None for the plain causal case (SDPA's fast is_causal path)."""
        if input_pos is not None:
            mask = self.causal_mask[input_pos][None, None]  # (1, 1, T, cache_len)
            if attention_mask is None:
                return mask
            keep = attention_mask[:, None, None, :].bool()   # (B, 1, 1, cache_len)
            mask = mask & keep
        else:
            if attention_mask is None:
                return None
            seg = attention_mask
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            mask = (seg[:, None, :, None] == seg[:, None, None, :]) & causal & (seg[:, None, None, :] > 0)
            input_pos = torch.arange(T, device=device)
        # a query with nothing to attend (a padding position) would give NaN: let it see itself
        diag = torch.zeros_like(mask[..., :1, :].expand(mask.shape[0], 1, T, mask.shape[-1]))
        diag[..., torch.arange(T, device=device), input_pos] = True
        return mask | diag


def causal_lm_loss(logits, labels):
    """Mean cross-entropy of logits[:, t] against labels[:, t+1], ignoring -100 (fp32 for stability)."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def cross_entropy_chunk(logits, targets, ignore_index, grad_scale, need_grad):
    """One chunk of the fused loss, in plain PyTorch: logits (C, V), targets (C,) -> the summed cross-entropy of the
    rows whose target is not ignore_index (fp32 statistics for bf16/fp16, fp64 stays fp64). With need_grad, the logits
    are overwritten by grad_scale * d(sum)/d(logits) = grad_scale * (softmax - onehot), 0 on ignored rows, in their
    own dtype. grad_scale: a 0-dim tensor on the device (1 / number of rows learned, no host sync).

    The reference of kernels/cross_entropy.py's one-kernel form (use_cross_entropy_kernel), which reads the bf16
    logits twice and writes them once instead of materialising fp32 copies."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    valid = targets != ignore_index
    tgt = targets.masked_fill(~valid, 0)
    x = logits.to(acc)                                        # (C, V); the logits themselves when already acc
    lse = torch.logsumexp(x, dim=-1)                          # (C,)
    loss = ((lse - x.gather(1, tgt[:, None]).squeeze(1)) * valid).sum()
    if need_grad:
        g = x.sub_(lse[:, None]).exp_()                       # softmax, in place
        g[torch.arange(g.shape[0], device=g.device), tgt] -= 1.0
        logits.copy_(g.mul_(valid[:, None] * grad_scale.to(acc)))
    return loss


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """mean CE(h @ W^T, targets) computed in row chunks; the gradients are formed in the same pass.

    Per chunk: logits (C, V) in h's dtype, loss += the chunk's summed CE and the logits turned in place into
    dlogits = (softmax - onehot) / n (0 on ignored rows) by chunk_loss (cross_entropy_chunk, or its Triton kernel),
    dh = dlogits @ W, dW += dlogits^T @ h. Only one chunk of logits ever exists; backward just scales the stored
    gradients by the incoming one. (The idea of Liger-Kernel's fused linear cross-entropy.)
    """

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, chunk_size, chunk_loss):
        # h (N, d), weight (V, d), targets (N,)
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 statistics for bf16/fp16, fp64 stays fp64
        n_valid = (targets != ignore_index).sum().clamp(min=1).to(acc)
        grad_scale = 1.0 / n_valid
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], chunk_size):
            hc, tc = h[s:s + chunk_size], targets[s:s + chunk_size]
            logits = hc @ weight.t()                          # (C, V)
            loss += chunk_loss(logits, tc, ignore_index, grad_scale, need_grad)
            g = logits                                        # now d(mean loss)/d(logits), (C, V)
            if grad_h is not None:
                grad_h[s:s + chunk_size] = g @ weight.to(g.dtype)
            if grad_w is not None:
                grad_w += (g.t() @ hc).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def fused_linear_cross_entropy(h, weight, targets, ignore_index=-100, chunk_size=4096, chunk_loss=None):
    """Mean cross-entropy of h @ weight.T (N, V) against targets (N,), ignoring ignore_index, never materialising
    all N x V logits. Equals F.cross_entropy(F.linear(h, weight).float(), targets) (0 when every target is ignored).
    chunk_loss: the per-chunk loss and gradient (default cross_entropy_chunk; kernels/cross_entropy.py has a kernel)."""
    return _FusedLinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk_size,
                                          chunk_loss or cross_entropy_chunk)
