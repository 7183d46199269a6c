"""SigLIP / SigLIP-2 vision tower (fixed resolution, patch embedding): the image tower of LLaVA-style models
that pair SigLIP with a decoder (LLaVA-Interleave, LLaVA-OneVision, many research VLMs).

Mirrors transformers/models/siglip/modeling_siglip.py (SiglipVisionEmbeddings, SiglipAttention, SiglipMLP,
SiglipEncoderLayer, SiglipVisionModel, SiglipMultiheadAttentionPoolingHead) so that Hugging Face SigLIP
weights load through the key table in models/hf_weights.py (`siglip_key`):

    pixels (B, 3, H, W) -> conv patch embedding (with bias) -> + learned positions (one per patch, no class token)
    -> L pre-norm blocks (LN -> MHA -> +, LN -> fc1 -> gelu(tanh) -> fc2 -> +)
    -> post-LayerNorm -> attention-pool head (a learned probe attends over all patches, + LN -> MLP residual)

Against models/vit.py's CLIP tower: no class token, no pre-LayerNorm, gelu-tanh instead of quick_gelu, a
biased patch convolution, eps 1e-6, and the pooled output comes from the attention-pool head (CLIP's is the
post-normed class token). Fixed-resolution SigLIP-2 checkpoints (e.g. google/siglip2-so400m-patch14-384) use
this same architecture; SigLIP-2 NaFlex (Siglip2VisionModel, variable patch grids) is not implemented.

Same interface as VisionTransformer, which models/llava.py relies on: `forward` returns every hidden state
(HF's `hidden_states`: index 0 the embeddings, index i the output of block i, all before the post-LayerNorm),
`features(pixel_values, feature_layer, select_strategy)`, `num_tokens(select_strategy)`, `blocks`,
`num_params()`, `gradient_checkpointing`. There is no class token, so both select strategies return all
patches: "full" as in HF, and "default" too (HF's LLaVA would drop the first *patch* under "default", which is
why LLaVA-style SigLIP checkpoints ship "full"; here "default" never silently loses a patch).
A different image size works by bicubic interpolation of the position grid (HF's interpolate_pos_encoding).
"""
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.vit import Attention, VisionConfig, VisionTransformer, interpolate_grid


@dataclass
class SiglipConfig:
    image_size: int = 384
    patch_size: int = 14
    dim: int = 1152
    n_layers: int = 27
    n_heads: int = 16
    mlp_dim: int = 4304
    norm_eps: float = 1e-6
    in_channels: int = 3
    use_head: bool = True  # the attention-pool head (HF vision_use_head); LLaVA never reads it
    family: str = "siglip"  # tells a LlavaConfig dict apart from a CLIP VisionConfig (which has no such field)

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
        if self.family != "siglip":
            raise ValueError(f"SiglipConfig.family must be 'siglip', got {self.family!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"vision dim {self.dim} is not divisible by n_heads {self.n_heads}")
        # no multiple-of check: so400m is 384 px at patch 14, a 27 x 27 grid; the convolution (stride = kernel,
        # no padding) ignores the 6 pixels past 27 * 14, as HF's does

    def to_dict(self):
        return asdict(self)


SIGLIP_CONFIGS = {
    # google/siglip-so400m-patch14-384 (and the fixed-resolution google/siglip2-so400m-patch14-384): 729 patches
    "siglip-so400m-384": dict(image_size=384, patch_size=14, dim=1152, n_layers=27, n_heads=16, mlp_dim=4304),
    # google/siglip-base-patch16-224: 196 patches
    "siglip-base-224": dict(image_size=224, patch_size=16, dim=768, n_layers=12, n_heads=12, mlp_dim=3072),
    # for tests: 16 patches
    "siglip-tiny": dict(image_size=32, patch_size=8, dim=64, n_layers=3, n_heads=4, mlp_dim=128),
}


def siglip_config(name, **overrides):
    if name not in SIGLIP_CONFIGS:
        raise KeyError(f"unknown SigLIP config {name!r}; known: {', '.join(SIGLIP_CONFIGS)}")
    return SiglipConfig(**{**SIGLIP_CONFIGS[name], **overrides})


class MLP(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # HF "gelu_pytorch_tanh"


class Block(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)  # same biased q/k/v/out MHA as CLIP, scale 1/sqrt(head_dim)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttentionPoolHead(nn.Module):
    """SiglipMultiheadAttentionPoolingHead: one learned probe token attends over the tokens, then LN -> MLP."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02)
        self.attention = nn.MultiheadAttention(cfg.dim, cfg.n_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):  # (B, N, dim) -> (B, dim)
        probe = self.probe.to(x.dtype).expand(x.shape[0], -1, -1)  # (B, 1, dim)
        h = self.attention(probe, x, x, need_weights=False)[0]     # (B, 1, dim)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.post_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = AttentionPoolHead(cfg) if cfg.use_head else None
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def num_tokens(self, select_strategy="default", image_size=None):
        """Tokens `features` returns per image: all patches, for either strategy (there is no class token)."""
        if select_strategy not in ("default", "full"):
            raise ValueError(f"select_strategy must be 'default' or 'full', got {select_strategy!r}")
        grid = (image_size or self.config.image_size) // self.config.patch_size
        return grid * grid

    def position_embeddings(self, height, width):
        """(1, h*w, dim) positions for an image of height x width pixels, as HF interpolate_pos_encoding."""
        pos = self.position_embedding.weight[None]  # (1, g*g, dim)
        h, w = height // self.config.patch_size, width // self.config.patch_size
        g = self.config.grid
        if h == g and w == g:
            return pos
        return interpolate_grid(pos, g, h, w)

    def embed(self, pixel_values):
        H, W = pixel_values.shape[-2:]
        if H < self.config.patch_size or W < self.config.patch_size:
            raise ValueError(f"image of {H}x{W} pixels is smaller than the patch size {self.config.patch_size}")
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (B, dim, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)                                        # (B, N, dim)
        return x + self.position_embeddings(H, W).to(x.dtype)

    def forward(self, pixel_values, n_blocks=None):
        """pixel_values (B, 3, H, W) -> list of hidden states [(B, N, dim)] * (n_blocks + 1), before post_norm.

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

    def last_hidden_state(self, pixel_values):
        """HF's last_hidden_state: the post-LayerNorm of the last block's output, (B, N, dim)."""
        return self.post_norm(self.forward(pixel_values)[-1])

    def pooled(self, pixel_values):
        """HF's pooler_output: the attention-pool head over the post-normed last layer, (B, dim)."""
        if self.head is None:
            raise ValueError("this SigLIP tower has no pooling head (use_head=False)")
        return self.head(self.last_hidden_state(pixel_values))

    def features(self, pixel_values, feature_layer=-2, select_strategy="default"):
        """Hidden state `feature_layer` (HF index, negative counts from the end), all N patches for either
        strategy ("default" does not drop a token: there is no class token to drop)."""
        if select_strategy not in ("default", "full"):
            raise ValueError(f"select_strategy must be 'default' or 'full', got {select_strategy!r}")
        n_states = len(self.blocks) + 1
        if not -n_states <= feature_layer < n_states:
            raise ValueError(f"feature_layer {feature_layer} out of range for {len(self.blocks)} blocks")
        idx = feature_layer % n_states
        return self.forward(pixel_values, n_blocks=idx)[idx]  # (B, N, dim)


def build_vision_tower(cfg):
    """The tower a vision config describes: SigLIP for a SiglipConfig, CLIP's VisionTransformer otherwise."""
    if isinstance(cfg, SiglipConfig):
        return SiglipVisionTransformer(cfg)
    return VisionTransformer(cfg)


def vision_config_from_dict(d):
    """A vision config dict (e.g. from a LlavaConfig checkpoint): SiglipConfig when it says family "siglip",
    CLIP's VisionConfig otherwise (old checkpoints have no `family`)."""
    if d.get("family") == "siglip":
        return SiglipConfig(**d)
    return VisionConfig(**d)
