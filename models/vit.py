"""CLIP-style Vision Transformer: the image tower of LLaVA-1.5 (CLIP ViT-L/14 at 336 px).

Mirrors transformers/models/clip/modeling_clip.py (CLIPVisionEmbeddings, CLIPAttention, CLIPMLP,
CLIPEncoderLayer, CLIPVisionTransformer) so that Hugging Face CLIP weights load through the key table in
models/hf_weights.py:

    pixels (B, 3, H, W) -> conv patch embedding (no bias) -> prepend class token -> + learned positions
    -> pre-LayerNorm (CLIP's "pre_layrnorm") -> L pre-norm blocks (LN -> MHA -> +, LN -> fc1 -> quick_gelu -> fc2 -> +)

`forward` returns every hidden state, HF's `hidden_states` convention: index 0 is the embedding output
(after the pre-LayerNorm), index i the output of block i, so index -2 is the input of the last block.
`features` is what LLaVA consumes: hidden state `feature_layer`, with ("default") or without ("full")
dropping the class token; at 336 px / patch 14 that is 576 (default) or 577 (full) tokens.
A different image size works by bicubic interpolation of the patch positions (HF's interpolate_pos_encoding).
The final `post_norm` only serves the pooled output (CLIP's pooler); LLaVA never uses it, but it is kept so
CLIP/LLaVA checkpoints load without leftover keys.
"""
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VisionConfig:
    image_size: int = 336
    patch_size: int = 14
    dim: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    mlp_dim: int = 4096
    norm_eps: float = 1e-5
    in_channels: int = 3
    # 0: CLIP's patch embedding, one patch_size x patch_size convolution. n > 0: a convolutional stem of n
    # stride-2 3x3 convolutions (GroupNorm, GELU; channels doubling up to dim) and a 1x1 projection, "early
    # convolutions" (Xiao et al. 2021): better for a tower trained from scratch on little data. patch_size = 2**n.
    conv_stem: int = 0

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def grid(self):
        return self.image_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid ** 2

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"vision dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.conv_stem and self.patch_size != 2 ** self.conv_stem:
            raise ValueError(f"a conv stem of {self.conv_stem} stride-2 layers needs patch_size {2 ** self.conv_stem}, "
                             f"got {self.patch_size}")

    def to_dict(self):
        return asdict(self)


VISION_CONFIGS = {
    # openai/clip-vit-large-patch14-336, the LLaVA-1.5 vision tower
    "clip-vit-l-336": dict(image_size=336, patch_size=14, dim=1024, n_layers=24, n_heads=16, mlp_dim=4096),
    # a CPU-trainable tower: 64 patches at 128 px
    "small": dict(image_size=128, patch_size=16, dim=256, n_layers=6, n_heads=4, mlp_dim=1024),
    # for tests: 16 patches
    "tiny": dict(image_size=32, patch_size=8, dim=64, n_layers=3, n_heads=4, mlp_dim=128),
}


def vision_config(name, **overrides):
    if name not in VISION_CONFIGS:
        raise KeyError(f"unknown vision config {name!r}; known: {', '.join(VISION_CONFIGS)}")
    return VisionConfig(**{**VISION_CONFIGS[name], **overrides})


def quick_gelu(x):
    # CLIP's activation (OpenAI's original GELU approximation)
    return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Bidirectional multi-head attention with biased q/k/v/out projections."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.dim)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x):
        B, N, C = x.shape
        q = self.q_proj(x).view(B, N, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)
        k = self.k_proj(x).view(B, N, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.n_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(D), as CLIP
        return self.out_proj(y.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def interpolate_grid(patch_pos, g, h, w):
    """(1, g*g, dim) learned patch positions -> (1, h*w, dim), bicubic as HF's interpolate_pos_encoding."""
    patch_pos = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, dim, g, g)
    patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", align_corners=False)
    return patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)      # (1, h*w, dim)


def conv_stem(cfg: VisionConfig):
    """(B, C, H, W) -> (B, dim, H / 2**n, W / 2**n): n stride-2 3x3 conv + GroupNorm + GELU, then a 1x1 conv."""
    layers, c_in = [], cfg.in_channels
    for i in range(cfg.conv_stem):
        c_out = max(cfg.dim // 2 ** (cfg.conv_stem - 1 - i), 8)
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, c_out), nn.GELU()]
        c_in = c_out
    layers.append(nn.Conv2d(c_in, cfg.dim, 1, bias=False))
    stem = nn.Sequential(*layers)
    for m in stem:
        if isinstance(m, nn.Conv2d):  # fan-in init: the ViT's N(0, 0.02) would shrink the signal layer by layer
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return stem


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(cfg.dim) * 0.02)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.dim)
        self.pre_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.post_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        if cfg.conv_stem:
            self.patch_embed = conv_stem(cfg)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def num_tokens(self, select_strategy="default", image_size=None):
        """Tokens `features` returns per image: patches (+1 class token for "full")."""
        grid = (image_size or self.config.image_size) // self.config.patch_size
        return grid * grid + (select_strategy == "full")

    def position_embeddings(self, height, width):
        """(1, 1 + h*w, dim) positions for an image of height x width pixels, as HF interpolate_pos_encoding."""
        pos = self.position_embedding.weight[None]  # (1, 1 + g*g, dim)
        h, w = height // self.config.patch_size, width // self.config.patch_size
        g = self.config.grid
        if h == g and w == g:
            return pos
        return torch.cat([pos[:, :1], interpolate_grid(pos[:, 1:], g, h, w)], dim=1)

    def embed(self, pixel_values):
        B, _, H, W = pixel_values.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"image of {H}x{W} pixels is not a multiple of the patch size {p}")
        # pixels may come as uint8-normalised fp16/bf16/fp32/fp64: compute in the weights' dtype
        x = self.patch_embed(pixel_values.to(self.class_embedding.dtype))  # (B, dim, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)                                       # (B, N, dim)
        cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)
        x = torch.cat([cls, x], dim=1)                                          # (B, 1 + N, dim)
        x = x + self.position_embeddings(H, W).to(x.dtype)
        return self.pre_norm(x)

    def forward(self, pixel_values, n_blocks=None):
        """pixel_values (B, 3, H, W) -> list of hidden states [(B, 1 + N, dim)] * (n_blocks + 1).

        n_blocks: run only the first n_blocks blocks (default all): LLaVA needs nothing past its feature layer.
        """
        n_blocks = len(self.blocks) if n_blocks is None else n_blocks
        x = self.embed(pixel_values)
        hidden = [x]
        for block in self.blocks[:n_blocks]:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, early_stop=False)
            else:
                x = block(x)
            hidden.append(x)
        return hidden

    def pooled(self, pixel_values):
        """CLIP's pooled output: post-LayerNorm of the last layer's class token, (B, dim)."""
        return self.post_norm(self.forward(pixel_values)[-1][:, 0])

    def features(self, pixel_values, feature_layer=-2, select_strategy="default"):
        """Hidden state `feature_layer` (HF index, negative counts from the end); "default" drops the class token."""
        n_states = len(self.blocks) + 1
        idx = feature_layer % n_states if -n_states <= feature_layer < n_states else None
        if idx is None:
            raise ValueError(f"feature_layer {feature_layer} out of range for {len(self.blocks)} blocks")
        h = self.forward(pixel_values, n_blocks=idx)[idx]  # (B, 1 + N, dim)
        if select_strategy == "default":
            return h[:, 1:]
        if select_strategy == "full":
            return h
        raise ValueError(f"select_strategy must be 'default' or 'full', got {select_strategy!r}")
