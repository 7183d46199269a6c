"""A DETR-style detection head on the LLaVA model: boxes, objectness and a caption per object query.

    vision tower features (B, N, Dv) --adapter--> proj --+                      +--> box MLP -> sigmoid (cx, cy, w, h)
                                                         +- memory -> decoder --+--> objectness logit
    decoder last hidden states (B, L, Dt) --adapter--> proj                     +--> caption decoder (autoregressive)

Adapters are residual bottleneck MLPs (x + up(gelu(down(norm(x)))), `up` zero-initialised so they start
as the identity). The object-query decoder follows DETR (Carion et al. 2020, models/transformer.py):
learned queries, self-attention among queries, cross-attention to the memory, outputs of every layer
go through the shared heads for the auxiliary losses. Vision memory carries 2-D sine positions.
Two additions make it converge in hundreds rather than hundreds of thousands of steps: every query owns
a learned reference point (initialised on a grid) whose sine code is its position embedding and relative
to which its box is predicted (Deformable / Anchor DETR), and cross-attention to the vision tokens gets a
Gaussian bias around that point with a learned width (SMCA, Gao et al. 2021).

The caption decoder is a small causal transformer whose first input is the query's state:
    [state, emb(t_1), ..., emb(t_{L-1})] -> logits for [t_1, ..., t_L]   (t_L = eos)
teacher-forced in training (SetCriterion calls `caption_logits` on the matched queries), greedy at
inference (`generate_captions`).

`DetectionModel` holds `.llava` (a models.llava.LlavaModel, so the VQA weights keep their keys under
`llava.`) and `.head`. Both the language-model loss and the detection loss reach the vision tower;
`DetectionModel.losses` is the training loss of a batch (models/detection_loss.py's lm_losses + SetCriterion).
"""
import contextlib
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.detection_loss import lm_losses
from models.llava import LlavaConfig, LlavaModel


@dataclass
class DetectionConfig:
    hidden: int = 256
    num_queries: int = 100
    decoder_layers: int = 2
    caption_layers: int = 4
    adapter_bottleneck: int = 8
    n_heads: int = 8
    ffn_mult: int = 4
    vision_dim: int = 0           # 0: same as hidden
    text_dim: int = 0             # 0: same as hidden
    vocab_size: int = 32000       # caption tokens are the language model's tokens
    max_caption_len: int = 8      # tokens including the final eos
    eos_id: int = 2
    dropout: float = 0.0

    def to_dict(self):
        return asdict(self)


class Adapter(nn.Module):
    """Residual bottleneck MLP: x + up(gelu(down(norm(x)))); identity at initialisation."""

    def __init__(self, dim, bottleneck):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(F.gelu(self.down(self.norm(x))))


class MultiHeadAttention(nn.Module):
    def __init__(self, dim, n_heads, dropout=0.0):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, q_in, k_in, v_in, mask=None, is_causal=False):
        """q_in (B, Tq, D), k_in / v_in (B, Tk, D); mask: bool (B, 1, Tq|1, Tk), True = attend."""
        B, Tq, D = q_in.shape
        H = self.n_heads
        q = self.q_proj(q_in).view(B, Tq, H, D // H).transpose(1, 2)   # (B, H, Tq, hd)
        k = self.k_proj(k_in).view(B, -1, H, D // H).transpose(1, 2)   # (B, H, Tk, hd)
        v = self.v_proj(v_in).view(B, -1, H, D // H).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, Tq, D))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden, dropout=0.0):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


class DecoderLayer(nn.Module):
    """Pre-norm: self-attention (causal or not), optional cross-attention to memory, MLP.

    As in DETR, positions (query embeddings, memory positions) are added to queries and keys, not values.
    """

    def __init__(self, dim, n_heads, ffn_dim, cross=True, dropout=0.0):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), MultiHeadAttention(dim, n_heads, dropout)
        self.cross = cross
        if cross:
            self.norm2, self.cross_attn = nn.LayerNorm(dim), MultiHeadAttention(dim, n_heads, dropout)
        self.norm3, self.mlp = nn.LayerNorm(dim), FeedForward(dim, ffn_dim, dropout)

    def forward(self, x, pos=None, memory=None, memory_pos=None, memory_mask=None, causal=False):
        h = self.norm1(x)
        qk = h if pos is None else h + pos
        x = x + self.self_attn(qk, qk, h, is_causal=causal)
        if self.cross:
            h = self.norm2(x)
            q = h if pos is None else h + pos
            k = memory if memory_pos is None else memory + memory_pos
            x = x + self.cross_attn(q, k, memory, memory_mask)
        return x + self.mlp(self.norm3(x))


def sine_embed(points, dim, temperature=10000.0):
    """DETR's sine position encoding of (..., 2) points (x, y) in [0, 1] -> (..., dim)."""
    quarter = dim // 4
    freqs = temperature ** (torch.arange(quarter, device=points.device, dtype=torch.float32) / quarter)
    x = points[..., 0:1].float() * 2 * math.pi / freqs                       # (..., quarter)
    y = points[..., 1:2].float() * 2 * math.pi / freqs
    pos = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=-1)           # (..., 4 * quarter)
    return F.pad(pos, (0, dim - pos.shape[-1]))


def grid_points(n_tokens, device):
    """Centres (x, y) in [0, 1] of a square grid of n_tokens patches, row-major: (N, 2); None if not square."""
    g = int(round(math.sqrt(n_tokens)))
    if g * g != n_tokens:
        return None
    c = (torch.arange(g, device=device, dtype=torch.float32) + 0.5) / g
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)


def sine_positions_2d(n_tokens, dim, device):
    """Positions of a square grid of patches (zeros for a non-square token set, e.g. with a class token)."""
    pts = grid_points(n_tokens, device)
    return torch.zeros(n_tokens, dim, device=device) if pts is None else sine_embed(pts, dim)


def inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


class BoxMLP(nn.Module):
    """Box relative to the query's reference point (Deformable-DETR's parametrisation):
    box = sigmoid(mlp(h) + [logit(ref_x), logit(ref_y), logit(w0), logit(w0)])."""

    def __init__(self, dim, layers=3, init_size=0.25):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim if i < layers - 1 else 4) for i in range(layers))
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)
        self.init_size = init_size

    def forward(self, x, ref):
        """x (B, Q, D), ref (Q, 2) in (0, 1) -> (B, Q, 4) cxcywh in (0, 1)."""
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        size = torch.full_like(ref, self.init_size)
        prior = inverse_sigmoid(torch.cat([ref, size], dim=-1))  # (Q, 4)
        return (x + prior.to(x.dtype)).sigmoid()


class CaptionDecoder(nn.Module):
    """Small causal transformer: [query state, emb(t_1..t_{L-1})] -> next-token logits (teacher forcing)."""

    def __init__(self, cfg: DetectionConfig):
        super().__init__()
        D = cfg.hidden
        self.cfg = cfg
        self.start = nn.Linear(D, D)
        self.embed = nn.Embedding(cfg.vocab_size, D)
        self.pos = nn.Parameter(torch.randn(cfg.max_caption_len, D) * 0.02)
        self.layers = nn.ModuleList(DecoderLayer(D, cfg.n_heads, cfg.ffn_mult * D, cross=False, dropout=cfg.dropout)
                                    for _ in range(cfg.caption_layers))
        self.norm = nn.LayerNorm(D)
        self.out = nn.Linear(D, cfg.vocab_size)

    def forward(self, states, tokens):
        """states (M, D); tokens (M, L) caption ids (padding may be -100) -> logits (M, L, V)."""
        M, L = tokens.shape
        prev = tokens[:, :-1].clamp(min=0)                                      # (M, L-1)
        x = torch.cat([self.start(states)[:, None], self.embed(prev)], dim=1)   # (M, L, D)
        x = x + self.pos[:L]
        for layer in self.layers:
            x = layer(x, causal=True)
        return self.out(self.norm(x))

    @torch.no_grad()
    def generate(self, states, max_len=None):
        """Greedy decoding: states (M, D) -> (M, L) token ids, eos included, -100 after it."""
        max_len = max_len or self.cfg.max_caption_len
        M = states.shape[0]
        tokens = torch.full((M, 1), -100, dtype=torch.long, device=states.device)
        done = torch.zeros(M, dtype=torch.bool, device=states.device)
        out = []
        for _ in range(max_len):
            nxt = self.forward(states, tokens)[:, -1].argmax(-1)  # (M,)
            nxt = nxt.masked_fill(done, -100)
            out.append(nxt)
            done |= nxt == self.cfg.eos_id
            tokens = torch.cat([tokens[:, :-1], nxt[:, None], tokens[:, -1:]], dim=1)
            if done.all():
                break
        return torch.stack(out, dim=1) if out else torch.empty(M, 0, dtype=torch.long)


class DetectionHead(nn.Module):
    def __init__(self, hidden=256, num_queries=100, decoder_layers=2, caption_layers=4, adapter_bottleneck=8,
                 **kwargs):
        super().__init__()
        cfg = DetectionConfig(hidden=hidden, num_queries=num_queries, decoder_layers=decoder_layers,
                              caption_layers=caption_layers, adapter_bottleneck=adapter_bottleneck, **kwargs)
        cfg.vision_dim, cfg.text_dim = cfg.vision_dim or hidden, cfg.text_dim or hidden
        self.config = cfg
        D = hidden
        self.vision_adapter = Adapter(cfg.vision_dim, adapter_bottleneck)
        self.text_adapter = Adapter(cfg.text_dim, adapter_bottleneck)
        self.vision_proj = nn.Linear(cfg.vision_dim, D)
        self.text_proj = nn.Linear(cfg.text_dim, D)
        self.memory_type = nn.Parameter(torch.randn(2, D) * 0.02)  # vision / text
        # each query has a learned reference point (initialised on a grid, as anchors): its position encoding is
        # the same sine code as the vision memory's, so cross-attention starts out looking near its point
        # (Conditional / Anchor DETR), which converges much faster than DETR's free query embeddings
        self.ref_logits = nn.Parameter(inverse_sigmoid(self.initial_points(num_queries)))
        self.query_content = nn.Parameter(torch.randn(num_queries, D) * 0.02)
        self.query_pos = nn.Linear(D, D)
        # spatially modulated cross-attention (SMCA, Gao et al. 2021): a Gaussian bias -|ref - patch|^2 / 2 sigma^2
        # on the attention logits to vision tokens, sigma learned (starts at a quarter of the image)
        self.log_sigma = nn.Parameter(torch.tensor(math.log(0.25)))
        self.layers = nn.ModuleList(DecoderLayer(D, cfg.n_heads, cfg.ffn_mult * D, dropout=cfg.dropout)
                                    for _ in range(decoder_layers))
        self.norm = nn.LayerNorm(D)
        self.box_head = BoxMLP(D)
        self.obj_head = nn.Linear(D, 1)
        # DETR/focal-loss prior: start with objectness ~ 0.01 so the many empty queries do not swamp the loss
        nn.init.constant_(self.obj_head.bias, -math.log((1 - 0.01) / 0.01))
        self.caption = CaptionDecoder(cfg)

    @staticmethod
    def initial_points(q):
        g = int(math.ceil(math.sqrt(q)))
        pts = grid_points(g * g, "cpu")
        return pts[torch.linspace(0, g * g - 1, q).round().long()]  # (Q, 2), spread over a g x g grid

    @classmethod
    def from_config(cls, cfg):
        d = dict(asdict(cfg) if not isinstance(cfg, dict) else cfg)
        return cls(**d)

    def memory(self, vision, text, text_mask):
        """vision (B, N, Dv), text (B, L, Dt), text_mask (B, L) bool -> memory (B, N+L, D), pos, keep mask."""
        B, N, _ = vision.shape
        v = self.vision_proj(self.vision_adapter(vision)) + self.memory_type[0]
        t = self.text_proj(self.text_adapter(text)) + self.memory_type[1]
        memory = torch.cat([v, t.to(v.dtype)], dim=1)                                  # (B, N+L, D)
        pos = torch.cat([sine_positions_2d(N, v.shape[-1], v.device).to(v.dtype),
                         torch.zeros(t.shape[1], v.shape[-1], device=v.device, dtype=v.dtype)])[None]
        keep = torch.cat([torch.ones(B, N, dtype=torch.bool, device=v.device), text_mask.bool()], dim=1)
        return memory, pos, keep[:, None, None, :]                                     # mask (B, 1, 1, N+L)

    def forward(self, vision, text, text_mask):
        """-> list (one per decoder layer, last = final) of dict(logits (B, Q), boxes (B, Q, 4), hidden (B, Q, D))."""
        memory, memory_pos, keep = self.memory(vision, text, text_mask)
        B, N = vision.shape[:2]
        ref = self.ref_logits.sigmoid()                                               # (Q, 2)
        mask = self.attention_bias(ref, keep, N, memory.dtype)                        # (B, 1, Q, N+L)
        pos = self.query_pos(sine_embed(ref, memory.shape[-1]).to(memory.dtype))      # (Q, D)
        pos = pos[None].expand(B, -1, -1)
        x = self.query_content[None].expand(B, -1, -1).to(memory.dtype)
        outputs = []
        for layer in self.layers:
            x = layer(x, pos, memory, memory_pos, mask)
            h = self.norm(x)
            outputs.append({"logits": self.obj_head(h).squeeze(-1), "boxes": self.box_head(h, ref), "hidden": h,
                            "ref": ref})
        return outputs

    def attention_bias(self, ref, keep, n_vision, dtype):
        """Additive cross-attention bias: Gaussian around each query's reference point on the vision tokens,
        0 on text tokens, a large negative number on padding."""
        B, Q = keep.shape[0], ref.shape[0]
        bias = torch.zeros(B, 1, Q, keep.shape[-1], device=ref.device, dtype=torch.float32)
        pts = grid_points(n_vision, ref.device)
        if pts is not None:
            d2 = (ref[:, None, :].float() - pts[None]).pow(2).sum(-1)              # (Q, N)
            bias[..., :n_vision] = -d2 / (2 * self.log_sigma.float().exp() ** 2)
        bias = bias.masked_fill(~keep, -1e9)
        return bias.to(dtype)

    def caption_logits(self, states, tokens):
        return self.caption(states, tokens)


class DetectionModel(nn.Module):
    """LLaVA + detection head. forward returns the LM logits, hidden states and the head's per-layer outputs."""

    def __init__(self, llava_cfg: LlavaConfig, det_cfg: DetectionConfig):
        super().__init__()
        if isinstance(det_cfg, dict):
            det_cfg = DetectionConfig(**det_cfg)
        det_cfg.vision_dim = llava_cfg.vision.dim
        det_cfg.text_dim = llava_cfg.text.dim
        self.llava = LlavaModel(llava_cfg)
        self.head = DetectionHead.from_config(det_cfg)

    def model_config(self):
        return {"llava": self.llava.config.to_dict(), "detection": self.head.config.to_dict()}

    @classmethod
    def from_model_config(cls, d):
        return cls(LlavaConfig.from_dict(d["llava"]), DetectionConfig(**d["detection"]))

    def vision_features(self, pixel_values):
        c = self.llava.config
        return self.llava.vision_tower.features(pixel_values, c.feature_layer, c.select_strategy)  # (B_img, N, Dv)

    def forward(self, input_ids, pixel_values, attention_mask=None, position_ids=None, det_image_index=None,
                memory_index=None, memory_mask=None):
        """input_ids (R, T) with N placeholders per image; pixel_values (B_img, 3, H, W).
        det_image_index (S,): which image of pixel_values each detection sample looks at.
        memory_index (S, L) / memory_mask (S, L): flat positions (row * T + t) of the tokens whose final
        hidden states each detection sample reads (padded, mask False on padding).
        Returns logits (R, T, V), hidden (R, T, Dt), head outputs (or None without detection samples)."""
        feats = self.vision_features(pixel_values)
        inputs_embeds = self.llava.embed(input_ids, vision_features=feats)
        logits, hidden = self.llava.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                                   position_ids=position_ids, return_hidden=True)
        if det_image_index is None:
            return logits, hidden, None
        text = hidden.flatten(0, 1)[memory_index]  # (S, L, Dt)
        return logits, hidden, self.head(feats[det_image_index], text, memory_mask)

    def losses(self, batch, criterion, autocast=contextlib.nullcontext(), lm_weight=1.0, det_on=True,
               normaliser=None):
        """The training loss of a DetectionCollator batch: lm_weight * LM + (the set criterion's total if det_on).
        Returns (total, parts: lm, det, teacher_lm, student_lm, token counts, per-component detection losses).

        A method rather than a function around the model so that a training script can route it through DDP /
        FSDP2 (utils.distributed.wrap_model(..., forward_methods=("losses",))): the wrapper then sees every
        parameter the loss touches, the caption decoder's (called inside the criterion) included.
        normaliser: the LM token count -> divisor (see lm_losses); the criterion carries its own."""
        # the class's forward, not self(...): while DDP routes this method it stands in for self.forward
        forward = type(self).forward
        with autocast:
            logits, _, head_out = forward(self, batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                          batch["position_ids"], batch["det_image_index"], batch["memory_index"],
                                          batch["memory_mask"])
        lm, lm_parts = lm_losses(logits, batch["labels"], batch["student_mask"], normaliser)
        head_out = [{k: v.float() for k, v in o.items()} for o in head_out]
        det, det_parts, _ = criterion(head_out, batch["targets"], caption_fn=self.head.caption_logits)
        total = lm_weight * lm + (det if det_on else 0.0)
        return total, {"lm": lm.detach(), "det": det.detach(), **lm_parts, **det_parts}
