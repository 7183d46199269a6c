"""Hugging Face weights in and out of the hand-written modules, from and to a LOCAL folder (never the hub).

Families and what they read / write:
    llama  <-> LlamaForCausalLM (plain, llama3, linear, dynamic RoPE) (models.llama.Llama)
    qwen2  <-> Qwen2ForCausalLM: Llama's names plus q/k/v biases  (models.llama.Llama, attention_bias=True)
    clip   <-> CLIPVisionModel, or the vision tower of CLIPModel (models.vit.VisionTransformer)
    siglip <-> SiglipVisionModel, or the vision tower of SiglipModel (models.siglip.SiglipVisionTransformer);
               fixed-resolution SigLIP-2 checkpoints are this architecture too (NaFlex Siglip2* is refused)
    llava  <-> LlavaForConditionalGeneration                     (models.llava.LlavaModel), CLIP or SigLIP tower

A folder holds `config.json` and weights as `model.safetensors`, `model-0000x-of-0000y.safetensors` (+ index
json) or `pytorch_model*.bin` (read with torch.load(weights_only=True)).

One mapping per family, a function from OUR parameter name to the HF name (`llama_key`, `clip_key`,
`llava_key`). Import walks our model's keys and fetches each mapped name from the file; export writes
each tensor under the mapped name. So the two directions cannot drift apart.

Layouts accepted on import (the loader picks, per part, the prefix that the file actually uses):
    CLIP:  `vision_model.embeddings.*` (CLIPModel, transformers 4 CLIPVisionModel) or `embeddings.*`
    SigLIP: `vision_model.embeddings.*` (SiglipModel, transformers 4 SiglipVisionModel) or `embeddings.*`
            (transformers 5 SiglipVisionModel); a LLaVA's SigLIP tower under the same LLaVA prefixes as CLIP's.
    LLaVA: transformers-4 files `language_model.model.*`, `language_model.lm_head.*`,
           `vision_tower.vision_model.*` (or `vision_tower.*`), `multi_modal_projector.*`;
           transformers-5 modules `model.language_model.*`, `lm_head.*`, `model.vision_tower.*`,
           `model.multi_modal_projector.*`.
    Llama / Qwen2 configs with top-level `rope_theta` + `rope_scaling` (transformers 4) or `rope_parameters`
    (transformers 5).
Export writes the transformers-4 file layout (what the published llava-hf / openai checkpoints use), which
both transformers 4 and 5 load, and both rope spellings in config.json.

Missing, unexpected and mis-shaped keys raise ValueError listing them. Buffers that old checkpoints carry
(`rotary_emb.inv_freq`, `position_ids`) and the text half of a CLIPModel / SiglipModel are skipped on purpose.
"""
import contextlib
import glob
import json
import os
import re

import torch
import torch.nn as nn

from models.llama import ROPE_SCALING_KEYS, Llama, LlamaConfig
from models.llava import LlavaConfig, LlavaModel
from models.siglip import SiglipConfig, SiglipVisionTransformer
from models.vit import VisionConfig, VisionTransformer

# --- the mapping tables ------------------------------------------------------------------------------------

# the transformer blocks: the same HF names in CLIP's and SigLIP's vision encoders (regex, replacement)
ENCODER_ROWS = [
    (r"blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"blocks\.(\d+)\.attn\.", r"encoder.layers.\1.self_attn."),  # q_proj, k_proj, v_proj, out_proj
    (r"blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),          # fc1, fc2
]

# our VisionTransformer key prefix -> HF CLIPVisionTransformer key prefix
CLIP_TABLE = [
    (r"patch_embed\.", "embeddings.patch_embedding."),
    (r"class_embedding$", "embeddings.class_embedding"),
    (r"position_embedding\.", "embeddings.position_embedding."),
    (r"pre_norm\.", "pre_layrnorm."),  # sic: CLIP's spelling
    (r"post_norm\.", "post_layernorm."),
] + ENCODER_ROWS

# our SiglipVisionTransformer key prefix -> HF SiglipVisionTransformer key prefix (no class token, no pre-norm)
SIGLIP_TABLE = [
    (r"patch_embed\.", "embeddings.patch_embedding."),  # weight and bias
    (r"position_embedding\.", "embeddings.position_embedding."),
    (r"post_norm\.", "post_layernorm."),
    (r"head\.", "head."),  # probe, attention.in_proj_* / out_proj.*, layernorm, mlp.fc1/fc2: HF's names
] + ENCODER_ROWS


def _table_key(table, family, key, prefix):
    for pattern, repl in table:
        if re.match(pattern, key):
            return prefix + re.sub("^" + pattern, repl, key)
    raise KeyError(f"no {family} mapping for our key {key!r}")


def clip_key(key, prefix=""):
    return _table_key(CLIP_TABLE, "CLIP", key, prefix)


def siglip_key(key, prefix=""):
    return _table_key(SIGLIP_TABLE, "SigLIP", key, prefix)


def llama_key(key, body="model.", head=""):
    """Our Llama names are HF's minus the `model.` wrapper (embed_tokens, layers.i.self_attn.q_proj, ...)."""
    return head + key if key.startswith("lm_head.") else body + key


# the prefixes each part may carry in a file; the first one of each list is what export writes
LLAVA_PREFIXES = {
    "vision_tower": ["vision_tower.vision_model.", "vision_tower.",
                     "model.vision_tower.vision_model.", "model.vision_tower."],
    "projector": ["multi_modal_projector.", "model.multi_modal_projector."],
    "language_model": [("language_model.model.", "language_model."),
                       ("model.language_model.", "")],
}
CLIP_PREFIXES = ["vision_model.", ""]
SIGLIP_PREFIXES = ["vision_model.", ""]
LLAMA_PREFIXES = [("model.", "")]
IGNORED = re.compile(r"(rotary_emb\.inv_freq|position_ids)$")


def llava_key(key, layout=None, vision="clip"):
    """Our LlavaModel key -> HF key under `layout` (part -> prefix; default: the export layout);
    vision: the tower's family, "clip" or "siglip"."""
    layout = layout or {part: prefixes[0] for part, prefixes in LLAVA_PREFIXES.items()}
    part, rest = key.split(".", 1)
    if part == "vision_tower":
        return (siglip_key if vision == "siglip" else clip_key)(rest, layout[part])
    if part == "projector":
        return layout[part] + rest  # linear_1 / linear_2: same names as LlavaMultiModalProjector
    if part == "language_model":
        body, head = layout[part]
        return llama_key(rest, body, head)
    raise KeyError(f"no LLaVA mapping for our key {key!r}")


def _vision_family(model):
    """"siglip" for a SigLIP tower (alone or inside a LlavaModel), "clip" otherwise."""
    tower = getattr(model, "vision_tower", model)
    return "siglip" if isinstance(tower, SiglipVisionTransformer) else "clip"


def _mapper(family, layout, vision="clip"):
    if family in ("llama", "qwen2"):  # Qwen2's names are Llama's (plus q/k/v .bias, mapped the same way)
        return lambda k: llama_key(k, *layout)
    if family == "clip":
        return lambda k: clip_key(k, layout)
    if family == "siglip":
        return lambda k: siglip_key(k, layout)
    if family == "llava":
        return lambda k: llava_key(k, layout, vision)
    raise ValueError(f"unknown family {family!r}")


def _our_keys(model):
    keys = list(model.state_dict().keys())
    if getattr(model, "config", None) is not None:
        tied = (isinstance(model, Llama) and model.config.tie_embeddings) or \
               (isinstance(model, LlavaModel) and model.config.text.tie_embeddings)
        if tied:  # a tied head is stored once, as the embedding (HF omits lm_head.weight)
            keys = [k for k in keys if not k.endswith("lm_head.weight")]
    return keys


def _pick_layout(family, our_keys, file_keys, vision="clip"):
    """Per part, the candidate prefix under which the file has the most of our keys."""
    def hits(layout, keys):
        f = _mapper(family, layout, vision)
        return sum(f(k) in file_keys for k in keys)
    if family in ("llama", "qwen2"):
        return LLAMA_PREFIXES[0]
    if family in ("clip", "siglip"):
        return max(CLIP_PREFIXES if family == "clip" else SIGLIP_PREFIXES, key=lambda p: hits(p, our_keys))
    layout = {part: prefixes[0] for part, prefixes in LLAVA_PREFIXES.items()}
    for part, prefixes in LLAVA_PREFIXES.items():
        part_keys = [k for k in our_keys if k.startswith(part + ".")]
        layout[part] = max(prefixes, key=lambda p: hits({**layout, part: p}, part_keys))
    return layout


def _listing(name, items, limit=20):
    items = sorted(items)
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {name} ({len(items)}): " + ", ".join(items[:limit]) + more


def hf_to_ours(model, family, hf_state, source="state dict"):
    """Rename an HF state dict to `model`'s keys; ValueError listing missing / unexpected / mis-shaped keys."""
    ours = model.state_dict()
    our_keys = _our_keys(model)
    file_keys = set(hf_state)
    vision = _vision_family(model)
    layout = _pick_layout(family, our_keys, file_keys, vision)
    to_hf = _mapper(family, layout, vision)
    out, missing, misshaped, used = {}, [], [], set()
    for k in our_keys:
        hk = to_hf(k)
        if hk not in hf_state:
            missing.append(hk)
            continue
        used.add(hk)
        t = hf_state[hk]
        if tuple(t.shape) != tuple(ours[k].shape):
            misshaped.append(f"{hk} file {tuple(t.shape)} vs model {tuple(ours[k].shape)}")
        out[k] = t
    # a tied head may still be written out (transformers' in-memory state dict has it): it is the embedding
    tied_heads = {to_hf(k) for k in ours if k.endswith("lm_head.weight") and k not in our_keys}
    unexpected = [k for k in file_keys - used - tied_heads if not IGNORED.search(k)]
    if family in ("clip", "siglip") and layout:  # a CLIPModel / SiglipModel also carries the text tower: not ours
        unexpected = [k for k in unexpected if k.startswith(layout)]
    if missing or unexpected or misshaped:
        msg = f"{source}: weights do not fit the {family} model"
        if missing:
            msg += _listing("missing", missing)
        if unexpected:
            msg += _listing("unexpected", unexpected)
        if misshaped:
            msg += _listing("mis-shaped", misshaped)
        raise ValueError(msg)
    return out


def ours_to_hf(model, family):
    """`model`'s state dict under HF names (export layout), tied head stored once, tensors contiguous."""
    default_layout = {"llama": LLAMA_PREFIXES[0], "qwen2": LLAMA_PREFIXES[0], "clip": CLIP_PREFIXES[0], "siglip": SIGLIP_PREFIXES[0],
                      "llava": None}[family]
    to_hf = _mapper(family, default_layout, _vision_family(model))
    sd = model.state_dict()
    return {to_hf(k): sd[k].detach().contiguous() for k in _our_keys(model)}


# module paths of the transformers classes, which peft addresses adapters by: transformers 5 builds LLaVA's parts
# under `model.`; adapters trained with transformers 4 (most published ones) use the export layout's paths
LLAVA_MODULE_LAYOUTS = {
    "current": {"vision_tower": "model.vision_tower.", "projector": "model.multi_modal_projector.",
                "language_model": ("model.language_model.", "")},
    "legacy": {part: prefixes[0] for part, prefixes in LLAVA_PREFIXES.items()},
}


def hf_key(model, key, layout="current"):
    """Our state-dict key in `model` (a Llama / Qwen2 decoder or a LlavaModel) -> its name in the transformers
    model's own state dict (LlamaForCausalLM / Qwen2ForCausalLM / LlavaForConditionalGeneration), e.g.
    layers.0.self_attn.q_proj.weight -> model.layers.0.self_attn.q_proj.weight. layout: "current"
    (transformers 5) or "legacy" (transformers 4)."""
    family = _family_of(model)
    prefixes = LLAVA_MODULE_LAYOUTS[layout] if family == "llava" else LLAMA_PREFIXES[0]
    return _mapper(family, prefixes, _vision_family(model))(key)


def hf_module_path(model, path, layout="current"):
    """Our module path -> the transformers module path (see hf_key)."""
    return hf_key(model, path + ".weight", layout)[:-len(".weight")]


# --- reading a folder --------------------------------------------------------------------------------------

def read_config(folder):
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON ({e})") from None


def weight_files(folder):
    """The weight files of a folder: safetensors preferred, sharded via the index when there is one."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(folder, s) for s in shards]
        files = sorted(glob.glob(os.path.join(folder, pattern)))
        if files:
            return files
    raise FileNotFoundError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")


def read_state_dict(folder):
    from safetensors.torch import load_file
    state = {}
    for path in weight_files(folder):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: listed in the index but missing")
        if path.endswith(".safetensors"):
            state.update(load_file(path))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def tokenizer_model_path(folder):
    """`tokenizer.model` (sentencepiece) of an HF folder, or None when there is none."""
    path = os.path.join(folder, "tokenizer.model")
    return path if os.path.isfile(path) else None


# --- configs ----------------------------------------------------------------------------------------------

# transformers' defaults, for the fields old configs leave out (llava-hf text_config lists only a few)
HF_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                         tie_word_embeddings=False)
HF_QWEN2_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                         num_attention_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, rope_theta=10000.0, max_window_layers=28)
HF_CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=224, patch_size=32, layer_norm_eps=1e-5, num_channels=3,
                               hidden_act="quick_gelu")


def _rope_from_hf(c):
    """(rope_theta, LlamaConfig.rope_scaling) from transformers-5 `rope_parameters` or transformers-4 top-level
    `rope_theta` + `rope_scaling` (whose type key was `type` before `rope_type`). Unknown types: ValueError."""
    rope = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    params = {**scaling, **rope}
    rope_type = params.get("rope_type", params.get("type")) or "default"
    theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor {params['partial_rotary_factor']} unsupported (full rotary only)")
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_SCALING_KEYS:
        raise ValueError(f"rope type {rope_type!r} is not supported; known: {', '.join(ROPE_SCALING_KEYS)}")
    if rope_type == "dynamic":  # transformers' formula takes the original context from max_position_embeddings
        params["original_max_position_embeddings"] = c["max_position_embeddings"]
    lacking = [k for k in ROPE_SCALING_KEYS[rope_type] if k not in params]
    if lacking:
        raise ValueError(f"rope type {rope_type!r} lacks {', '.join(lacking)}")
    keys = ROPE_SCALING_KEYS[rope_type] + (("original_max_position_embeddings",) if rope_type == "dynamic" else ())
    return theta, dict(rope_type=rope_type, **{k: params[k] for k in keys})


def _decoder_config_from_hf(c, attention_bias, o_proj_bias):
    theta, scaling = _rope_from_hf(c)
    if c.get("mlp_bias"):
        raise ValueError("config has mlp_bias=true, which this Llama does not implement")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {c['hidden_act']!r} unsupported (SwiGLU with silu only)")
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    if head_dim * heads != c["hidden_size"]:
        raise ValueError(f"head_dim {head_dim} x {heads} heads != hidden_size {c['hidden_size']}: unsupported")
    return LlamaConfig(vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
                       n_heads=heads, n_kv_heads=c.get("num_key_value_heads") or heads,
                       ffn_dim=c["intermediate_size"], max_seq_len=c["max_position_embeddings"],
                       rope_theta=theta, norm_eps=c["rms_norm_eps"],
                       tie_embeddings=bool(c["tie_word_embeddings"]), rope_scaling=scaling,
                       attention_bias=attention_bias, o_proj_bias=o_proj_bias)


def llama_config_from_hf(c):
    c = {**HF_LLAMA_DEFAULTS, **c}
    bias = bool(c.get("attention_bias"))  # transformers' Llama: on q, k, v and o_proj alike
    return _decoder_config_from_hf(c, attention_bias=bias, o_proj_bias=bias)


def qwen2_config_from_hf(c):
    c = {**HF_QWEN2_DEFAULTS, **c}
    sliding = [i for i, t in enumerate(c.get("layer_types") or []) if t == "sliding_attention"]
    if c.get("use_sliding_window") and (sliding or c.get("max_window_layers", 0) < c["num_hidden_layers"]):
        raise ValueError(f"Qwen2 config uses sliding-window attention (layers {sliding or 'from max_window_layers'}),"
                         " which this decoder does not implement")
    return _decoder_config_from_hf(c, attention_bias=True, o_proj_bias=False)  # Qwen2: q/k/v bias, o_proj none


def _rope_to_hf(cfg: LlamaConfig):
    """rope fields in both spellings: transformers-5 `rope_parameters`, transformers-4 `rope_theta` (+ `rope_scaling`).
    A dynamic scaling's original context goes out as max_position_embeddings (_max_positions)."""
    scaling = dict(cfg.rope_scaling or {})
    out = dict(rope_theta=cfg.rope_theta, rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta))
    if scaling:
        if scaling["rope_type"] == "dynamic":  # transformers reads the original context from max_position_embeddings
            scaling.pop("original_max_position_embeddings", None)
        out["rope_parameters"] = dict(scaling, rope_theta=cfg.rope_theta)
        out["rope_scaling"] = scaling
    return out


def _max_positions(cfg: LlamaConfig):
    s = cfg.rope_scaling or {}
    return s.get("original_max_position_embeddings", cfg.max_seq_len) if s.get("rope_type") == "dynamic" \
        else cfg.max_seq_len


def llama_config_to_hf(cfg: LlamaConfig):
    if cfg.attention_bias != cfg.o_proj_bias:
        raise ValueError("a Llama with bias on q/k/v but not o_proj is the Qwen2 layout: export it as qwen2")
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=cfg.vocab_size,
                hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                max_position_embeddings=_max_positions(cfg), rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                **_rope_to_hf(cfg), tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.attention_bias,
                mlp_bias=False)


def qwen2_config_to_hf(cfg: LlamaConfig):
    if not cfg.attention_bias or cfg.o_proj_bias:
        raise ValueError("Qwen2 has bias on q/k/v and none on o_proj: this config is not that layout")
    return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=cfg.vocab_size,
                hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                max_position_embeddings=_max_positions(cfg), rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                **_rope_to_hf(cfg), tie_word_embeddings=cfg.tie_embeddings, use_sliding_window=False,
                max_window_layers=cfg.n_layers)


def decoder_family(cfg: LlamaConfig):
    """The HF family a decoder config exports as: qwen2 for q/k/v-only bias, llama otherwise."""
    return "qwen2" if cfg.attention_bias and not cfg.o_proj_bias else "llama"


def vision_config_from_hf(c):
    if "vision_config" in c and c.get("model_type") == "clip":  # a CLIPModel config
        c = c["vision_config"]
    c = {**HF_CLIP_VISION_DEFAULTS, **c}
    if c["hidden_act"] != "quick_gelu":
        raise ValueError(f"vision hidden_act {c['hidden_act']!r} unsupported (CLIP quick_gelu only)")
    return VisionConfig(image_size=c["image_size"], patch_size=c["patch_size"], dim=c["hidden_size"],
                        n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                        mlp_dim=c["intermediate_size"], norm_eps=c["layer_norm_eps"], in_channels=c["num_channels"])


def vision_config_to_hf(cfg: VisionConfig):
    if cfg.conv_stem:
        raise ValueError(f"a ViT with a convolutional stem ({cfg.conv_stem} layers) has no CLIPVisionModel "
                         f"equivalent and cannot be exported to the Hugging Face layout")
    return dict(architectures=["CLIPVisionModel"], model_type="clip_vision_model", hidden_size=cfg.dim,
                intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                image_size=cfg.image_size, patch_size=cfg.patch_size, layer_norm_eps=cfg.norm_eps,
                num_channels=cfg.in_channels, hidden_act="quick_gelu")


HF_SIGLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                 image_size=224, patch_size=16, layer_norm_eps=1e-6, num_channels=3,
                                 hidden_act="gelu_pytorch_tanh", vision_use_head=True)
SIGLIP2_NAFLEX = ("siglip2", "siglip2_vision_model")
NAFLEX_ERROR = ("SigLIP-2 NaFlex (Siglip2VisionModel / Siglip2Model, variable patch grids) is not supported; "
                "the fixed-resolution SigLIP-2 checkpoints (SiglipVisionModel / SiglipModel) are")


def siglip_config_from_hf(c):
    if c.get("model_type") in SIGLIP2_NAFLEX:
        raise ValueError(NAFLEX_ERROR)
    if "vision_config" in c and c.get("model_type") == "siglip":  # a SiglipModel config
        c = c["vision_config"]
    c = {**HF_SIGLIP_VISION_DEFAULTS, **c}
    if c["hidden_act"] != "gelu_pytorch_tanh":
        raise ValueError(f"vision hidden_act {c['hidden_act']!r} unsupported (SigLIP gelu_pytorch_tanh only)")
    return SiglipConfig(image_size=c["image_size"], patch_size=c["patch_size"], dim=c["hidden_size"],
                        n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                        mlp_dim=c["intermediate_size"], norm_eps=c["layer_norm_eps"], in_channels=c["num_channels"],
                        use_head=bool(c["vision_use_head"]))


def siglip_config_to_hf(cfg: SiglipConfig):
    return dict(architectures=["SiglipVisionModel"], model_type="siglip_vision_model", hidden_size=cfg.dim,
                intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                image_size=cfg.image_size, patch_size=cfg.patch_size, layer_norm_eps=cfg.norm_eps,
                num_channels=cfg.in_channels, hidden_act="gelu_pytorch_tanh", vision_use_head=cfg.use_head)


def _llava_vision_from_hf(c):
    """A LLaVA config's vision tower: SigLIP when vision_config says siglip_vision_model, CLIP otherwise."""
    vc = c.get("vision_config") or {}
    if vc.get("model_type") in SIGLIP2_NAFLEX:
        raise ValueError(NAFLEX_ERROR)
    if vc.get("model_type") != "siglip_vision_model":
        return vision_config_from_hf(vc)
    if c.get("vision_feature_select_strategy", "default") == "default":
        # transformers' LLaVA drops token 0 under "default": for SigLIP that is a patch, not a class token
        raise ValueError("a LLaVA with a SigLIP tower and vision_feature_select_strategy 'default' (transformers "
                         "drops the first patch) is not supported: SigLIP towers here give all patches ('full')")
    return siglip_config_from_hf(vc)


def llava_config_from_hf(c):
    layer = c.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r}: only a single layer is supported")
    if c.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"projector_hidden_act {c['projector_hidden_act']!r} unsupported (gelu only)")
    token = c.get("image_token_id", c.get("image_token_index", 32000))
    return LlavaConfig(vision=_llava_vision_from_hf(c),
                       text=(qwen2_config_from_hf if (c.get("text_config") or {}).get("model_type") == "qwen2"
                             else llama_config_from_hf)(c.get("text_config", {})),
                       image_token_id=token, feature_layer=layer,
                       select_strategy=c.get("vision_feature_select_strategy", "default"),
                       projector_bias=c.get("multimodal_projector_bias", True))


def llava_config_to_hf(cfg: LlavaConfig):
    siglip = isinstance(cfg.vision, SiglipConfig)
    vision = (siglip_config_to_hf if siglip else vision_config_to_hf)(cfg.vision)
    text = (qwen2_config_to_hf if decoder_family(cfg.text) == "qwen2" else llama_config_to_hf)(cfg.text)
    del vision["architectures"], text["architectures"]
    # SigLIP: our two strategies both mean all patches, which is transformers' "full"
    strategy = "full" if siglip else cfg.select_strategy
    n_tokens = cfg.vision.num_patches + (strategy == "full" and not siglip)
    return dict(architectures=["LlavaForConditionalGeneration"], model_type="llava", vision_config=vision,
                text_config=text, image_token_index=cfg.image_token_id, vision_feature_layer=cfg.feature_layer,
                vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
                multimodal_projector_bias=cfg.projector_bias, image_seq_length=n_tokens,
                tie_word_embeddings=cfg.text.tie_embeddings)


# --- public entry points ----------------------------------------------------------------------------------

def detect_family(config):
    arch = " ".join(config.get("architectures") or [])
    model_type = config.get("model_type", "")
    if "Llava" in arch or model_type == "llava":
        return "llava"
    if "CLIP" in arch or model_type in ("clip", "clip_vision_model"):
        return "clip"
    if "Siglip2" in arch or model_type in SIGLIP2_NAFLEX:
        raise ValueError(NAFLEX_ERROR)
    if "Siglip" in arch or model_type in ("siglip", "siglip_vision_model"):
        return "siglip"
    if "Qwen2ForCausalLM" in arch or model_type == "qwen2":
        return "qwen2"
    if "Llama" in arch or model_type == "llama":
        return "llama"
    raise ValueError(f"unsupported model (architectures {arch!r}, model_type {model_type!r}); "
                     "expected LlamaForCausalLM, Qwen2ForCausalLM, CLIPVisionModel/CLIPModel, "
                     "SiglipVisionModel/SiglipModel or LlavaForConditionalGeneration")


BUILDERS = {
    "llama": (llama_config_from_hf, Llama),
    "qwen2": (qwen2_config_from_hf, Llama),
    "clip": (vision_config_from_hf, VisionTransformer),
    "siglip": (siglip_config_from_hf, SiglipVisionTransformer),
    "llava": (llava_config_from_hf, LlavaModel),
}


def _family_of(model):
    for cls, family in ((LlavaModel, "llava"), (VisionTransformer, "clip"), (SiglipVisionTransformer, "siglip"),
                        (Llama, "llama")):
        if isinstance(model, cls):
            return decoder_family(model.config) if family == "llama" else family
    raise TypeError(f"no Hugging Face mapping for {type(model).__name__}")


def load_into(model, folder, family=None):
    """Load HF weights from `folder` into an existing module (e.g. TinyLlama into LlavaModel.language_model)."""
    if family is None:
        family = _family_of(model)
    state = hf_to_ours(model, family, read_state_dict(folder), source=folder)
    model.load_state_dict(state, strict=False)  # strict=False only for the tied head, checked above
    return model


def _shard_tensors(path):
    """(key, lazy getter) of one weight file, without reading its tensors (safetensors: opened lazily; .bin:
    memory-mapped)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        f = safe_open(path, framework="pt")
        return [(k, (lambda k=k: f.get_tensor(k))) for k in f.keys()]
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return [(k, (lambda k=k: state[k])) for k in state]


@torch.no_grad()
def load_streamed(model, folder, device="cpu", dtype=None, family=None):
    """Load a decoder folder (Llama / Qwen2) into `model` one tensor at a time, shard after shard: each is read,
    moved to `device`, cast to `dtype` (None: the file's) and put in place before the next is read; a Linear4bit
    (models/nf4.py) quantises its weight on `device`. So neither the host nor the GPU ever holds more than the
    model in its final form plus one tensor: QLoRA loads an 8B decoder on a 16 GB GPU. `model` may be on meta
    (every tensor then gets real storage). Missing / unexpected / mis-shaped keys: one ValueError."""
    from models.nf4 import Linear4bit, load_quantized_
    family = family or _family_of(model)
    if family not in ("llama", "qwen2"):
        raise ValueError(f"load_streamed reads Llama / Qwen2 decoder folders, not {family!r}")
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}

    def stands_for_dense(k):  # a Linear4bit's own buffers stand for <path>.weight
        path, _, leaf = k.rpartition(".")
        return path in quantized and leaf.startswith("weight_")
    ours = [k for k in _our_keys(model) if not stands_for_dense(k)] + [f"{p}.weight" for p in quantized]
    to_hf = _mapper(family, LLAMA_PREFIXES[0])
    by_hf = {to_hf(k): k for k in ours}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes.update({f"{p}.weight": (m.out_features, m.in_features) for p, m in quantized.items()})
    loaded, unexpected, misshaped = set(), [], []
    for path in weight_files(folder):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: listed in the index but missing")
        for hk, get in _shard_tensors(path):
            k = by_hf.get(hk)
            if k is None:
                if not IGNORED.search(hk) and not (hk == "lm_head.weight" and model.config.tie_embeddings):
                    unexpected.append(hk)
                continue
            t = get()
            if tuple(t.shape) != shapes[k]:
                misshaped.append(f"{hk} file {tuple(t.shape)} vs model {shapes[k]}")
                continue
            mod_path, _, leaf = k.rpartition(".")
            module = model.get_submodule(mod_path) if mod_path else model
            if mod_path in quantized and leaf == "weight":
                load_quantized_(module, t, device=device)
            elif leaf in module._parameters:
                old = module._parameters[leaf]
                t = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
                module._parameters[leaf] = torch.nn.Parameter(t, requires_grad=old.requires_grad)
            else:
                module._buffers[leaf] = t.to(device)
            loaded.add(k)
            del t
    missing = [to_hf(k) for k in ours if k not in loaded]
    if missing or unexpected or misshaped:
        msg = f"{folder}: weights do not fit the {family} model"
        for name, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                msg += _listing(name, items)
        raise ValueError(msg)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "xavier_uniform_",
          "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextlib.contextmanager
def no_init_weights():
    """Build modules without initialising their weights (torch.nn.init's functions do nothing inside), for a model
    whose every weight a checkpoint then sets (load_state_dict, strict): transformers' no_init_weights. A 1.1B Llama's
    random initialisation took 14 s on a 2-core CPU, all of it thrown away by the load. On the meta device
    (load_pretrained) it computes nothing, yet torch.nn.init's calls there went through torch._refs, which imports
    torch._dynamo: 1.5 s of a CPU generate.py's start that never compiles."""
    saved = {name: getattr(nn.init, name) for name in _INITS}
    try:
        for name in _INITS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def load_pretrained(folder, dtype=torch.float32, device="cpu", family=None):
    """Build our model from an HF folder and load its weights. Returns the model (in eval mode).

    dtype: cast every floating weight to this (default float32; torch.bfloat16 halves the memory; None keeps
    the file's dtypes).
    """
    config = read_config(folder)
    family = family or detect_family(config)
    config_from_hf, cls = BUILDERS[family]
    cfg = config_from_hf(config)
    with torch.device("meta"), no_init_weights():
        model = cls(cfg)
    state = hf_to_ours(model, family, read_state_dict(folder), source=folder)
    state = {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    lm = model.language_model if family == "llava" else model if family in ("llama", "qwen2") else None
    if lm is not None and lm.config.tie_embeddings:
        lm.lm_head.weight = lm.embed_tokens.weight
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # cannot happen when hf_to_ours passed; kept as a guard against silent garbage
        raise ValueError(f"{folder}: parameters left uninitialised: {leftover}")
    return model.eval()


def export_pretrained(model, folder):
    """Write `model` as an HF folder (config.json + model.safetensors) that transformers loads."""
    from safetensors.torch import save_file
    family = _family_of(model)
    config = {"llava": llava_config_to_hf, "clip": vision_config_to_hf, "siglip": siglip_config_to_hf,
              "llama": llama_config_to_hf, "qwen2": qwen2_config_to_hf}[family](model.config)
    state = {k: v.cpu() for k, v in ours_to_hf(model, family).items()}
    dtypes = {v.dtype for v in state.values()}
    config["torch_dtype"] = str(dtypes.pop() if len(dtypes) == 1 else torch.float32).replace("torch.", "")
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, "model.safetensors.tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return folder
