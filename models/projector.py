"""LLaVA-1.5's vision->text projector ("mlp2x_gelu"): Linear -> GELU -> Linear.

Mirrors transformers/models/llava/modeling_llava.py LlavaMultiModalProjector (linear_1, act, linear_2),
so the HF keys map one to one.
"""
import torch.nn as nn
import torch.nn.functional as F


class Projector(nn.Module):
    def __init__(self, vision_dim, text_dim, bias=True):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, x):
        # x: (B, N, vision_dim) -> (B, N, text_dim); exact (erf) GELU as LLaVA
        return self.linear_2(F.gelu(self.linear_1(x)))
