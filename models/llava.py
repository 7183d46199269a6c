"""LLaVA: CLIP-style ViT (or SigLIP) -> MLP projector -> Llama decoder, one model.

Mirrors transformers/models/llava/modeling_llava.py (LlavaModel.get_image_features / forward,
LlavaForConditionalGeneration). The three parts are plain submodules, `vision_tower`, `projector` and
`language_model` (a models.llama.Llama, the only language model inside), so the parameter count is
exactly the sum of the three parts. The tower is CLIP's (models.vit.VisionTransformer) for a `VisionConfig`
and SigLIP's (models.siglip.SiglipVisionTransformer) for a `SiglipConfig`; a config dict without
`family: "siglip"` (every checkpoint written before SigLIP existed here) is CLIP. SigLIP has no class token:
both select strategies give all its patches.

Image-token convention: `input_ids` carry N = `num_image_tokens` copies of the `<image>` placeholder id
per image (HF's modern processor convention), in the order of the images in `pixel_values` (row-major over
the batch). Each run of placeholders is overwritten by that image's N projected patch embeddings. Shapes
are static (the sequence length does not change inside the model), which keeps packing and compilation
simple. Prompts written with a single `<image>` are turned into N with `expand_image_tokens`.
The placeholder id need not be inside the decoder's vocabulary: it is never looked up in the embedding.
Labels at image positions are forced to -100 inside `forward`.

Generation with the KV cache goes through the decoder directly: prefill with
`model.language_model(inputs_embeds=model.embed(ids, pixel_values), input_pos=torch.arange(T))` after
`model.language_model.setup_cache(B, max_len)`, then feed the new token ids one step at a time.
Training without full logits: `model.language_model.loss(inputs_embeds=model.embed(ids, px), labels=labels)`
(mask image positions in labels first, as `forward` does).
"""
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn

from models.llama import Llama, LlamaConfig, fused_linear_cross_entropy, llama_config
from models.projector import Projector
from models.siglip import SiglipConfig, build_vision_tower, vision_config_from_dict
from models.vit import VisionConfig, vision_config


@dataclass
class LlavaConfig:
    vision: VisionConfig | SiglipConfig = field(default_factory=lambda: vision_config("clip-vit-l-336"))
    text: LlamaConfig = field(default_factory=lambda: llama_config("tinyllama-1.1b"))
    image_token_id: int = 32000
    feature_layer: int = -2
    select_strategy: str = "default"
    projector_bias: bool = True

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = vision_config_from_dict(self.vision)
        if isinstance(self.text, dict):
            self.text = LlamaConfig(**self.text)
        if self.select_strategy not in ("default", "full"):
            raise ValueError(f"select_strategy must be 'default' or 'full', got {self.select_strategy!r}")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


def expand_image_tokens(ids, image_token_id, n):
    """Turn every single `image_token_id` in `ids` into n copies.

    ids: a list of ints (one prompt) or a 1-D LongTensor; returns the same kind.
    """
    as_tensor = torch.is_tensor(ids)
    seq = ids.tolist() if as_tensor else list(ids)
    out = []
    for t in seq:
        out.extend([t] * n if t == image_token_id else [t])
    return torch.tensor(out, dtype=ids.dtype, device=ids.device) if as_tensor else out


class LlavaModel(nn.Module):
    def __init__(self, cfg: LlavaConfig, language_model: Llama = None):
        """language_model: an already built decoder of cfg.text (e.g. loaded in 4 bits, shard by shard), instead
        of a freshly initialised one."""
        super().__init__()
        self.config = cfg
        self.vision_tower = build_vision_tower(cfg.vision)
        self.projector = Projector(cfg.vision.dim, cfg.text.dim, bias=cfg.projector_bias)
        if language_model is not None and language_model.config != cfg.text:
            raise ValueError("language_model's config differs from cfg.text")
        self.language_model = language_model if language_model is not None else Llama(cfg.text)

    @property
    def num_image_tokens(self):
        return self.vision_tower.num_tokens(self.config.select_strategy)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def image_features(self, pixel_values):
        """pixel_values (B_img, 3, H, W), any float dtype -> (B_img, N, text_dim)."""
        feats = self.vision_tower.features(pixel_values, self.config.feature_layer, self.config.select_strategy)
        return self.projector(feats.to(self.projector.linear_1.weight.dtype))

    def image_mask(self, input_ids):
        return input_ids == self.config.image_token_id

    def embed(self, input_ids, pixel_values=None, vision_features=None):
        """input_ids (B, T) with N placeholders per image -> inputs_embeds (B, T, text_dim).

        vision_features (B_img, N, vision_dim): the tower's selected features, when the caller already ran
        the tower (the detection head reads them too) -- then pixel_values is not needed.
        """
        is_image = self.image_mask(input_ids)
        n_placeholders = int(is_image.sum())
        images = vision_features if vision_features is not None else pixel_values
        n_images = 0 if images is None else images.shape[0]
        expected = n_images * self.num_image_tokens
        if n_placeholders != expected:
            raise ValueError(
                f"input_ids hold {n_placeholders} image placeholder tokens (id {self.config.image_token_id}) but "
                f"{n_images} image(s) x {self.num_image_tokens} tokens = {expected} are expected; "
                f"use expand_image_tokens(ids, image_token_id, {self.num_image_tokens}) on single placeholders")
        # the placeholder id may lie outside the vocabulary: embed a harmless id there, then overwrite
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, dim)
        if n_images == 0:
            return embeds
        if vision_features is not None:
            feats = self.projector(vision_features.to(self.projector.linear_1.weight.dtype))  # (B_img, N, dim)
        else:
            feats = self.image_features(pixel_values)  # (B_img, N, dim)
        return embeds.masked_scatter(is_image[..., None], feats.to(embeds.dtype))

    def learned_targets(self, input_ids, labels):
        """The next-token targets (B, T-1) a loss learns: labels[:, 1:] (position t predicts t + 1) with the
        image positions ignored (-100)."""
        return labels[:, 1:].masked_fill(self.image_mask(input_ids)[:, 1:], -100)

    def num_learned(self, input_ids, labels):
        """How many positions loss() averages over (its normaliser, e.g. for a token-weighted mean over ranks)."""
        return int((self.learned_targets(input_ids, labels) != -100).sum())

    def loss(self, input_ids, pixel_values, labels, attention_mask=None, position_ids=None, chunk_size=4096):
        """forward(..., labels=labels)'s loss, computed on the learned positions only (beside Llama.loss).

        Most positions of a VQA sequence (image tokens, prompt) carry no label, so the LM head and the
        cross-entropy run only on the rows whose next token is learned, chunk by chunk
        (models.llama.fused_linear_cross_entropy): never the (B, T, vocab) logits."""
        lm = self.language_model
        targets = self.learned_targets(input_ids, labels).flatten()   # (B * (T-1),)
        # the learned rows, found before any work is queued: the step's host sync costs no GPU time here, where
        # indexing h by a mask after the decoder would stall the GPU mid-step
        rows = (targets != -100).nonzero().squeeze(1)                  # (n_learned,)
        h = lm.hidden(inputs_embeds=self.embed(input_ids, pixel_values), attention_mask=attention_mask,
                      position_ids=position_ids)                      # (B, T, dim)
        h = h[:, :-1].reshape(-1, h.size(-1)).index_select(0, rows)    # (n_learned, dim)
        return fused_linear_cross_entropy(h, lm.lm_head.weight, targets[rows], chunk_size=chunk_size,
                                          chunk_loss=lm.chunk_loss)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None, labels=None,
                return_hidden=False):
        """Same returns as Llama.forward: logits | (logits, loss) | (logits, [loss,] hidden)."""
        inputs_embeds = self.embed(input_ids, pixel_values)
        if labels is not None:
            labels = labels.masked_fill(self.image_mask(input_ids), -100)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, labels=labels, return_hidden=return_hidden)
