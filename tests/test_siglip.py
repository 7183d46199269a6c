"""SigLIP vision tower (models/siglip.py) and its Hugging Face import / export, alone and inside LLaVA, against
transformers' SiglipVisionModel / SiglipModel / LlavaForConditionalGeneration (random tiny weights, float32)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file

from models.hf_weights import (detect_family, export_pretrained, hf_to_ours, llava_config_from_hf,
                               load_pretrained, siglip_config_from_hf)
from models.llama import llama_config
from models.llava import LlavaConfig, LlavaModel
from models.siglip import SIGLIP_CONFIGS, SiglipConfig, SiglipVisionTransformer, siglip_config
from models.vit import VisionConfig, vision_config
from tests.test_llava import prompt_ids  # the same left-padded prompts (IMAGE_ID 250 in both)
from utils.image_processing import ImageProcessor

IMAGE_ID = 250


def randomise_(model):
    with torch.no_grad():  # HF init leaves norms at 1 and biases at 0: perturb so a mix-up cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "probe" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_vision_config(**kw):
    return transformers.SiglipVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                     num_attention_heads=4, image_size=16, patch_size=4), **kw})


def hf_tower(seed=0):
    torch.manual_seed(seed)
    return randomise_(transformers.SiglipVisionModel(hf_vision_config())).eval()


def assert_tower_matches(ours, hf, px):
    """Every hidden state, last_hidden_state, pooled output and LLaVA's selected features."""
    with torch.no_grad():
        ref = hf(pixel_values=px, output_hidden_states=True)
        hidden = ours(px)
        assert len(hidden) == len(ref.hidden_states) == len(ours.blocks) + 1
        for got, want in zip(hidden, ref.hidden_states):
            assert (got - want).abs().max() <= 1e-5
        assert (ours.last_hidden_state(px) - ref.last_hidden_state).abs().max() <= 1e-5
        assert (ours.pooled(px) - ref.pooler_output).abs().max() <= 1e-5
        for layer in (-1, -2):
            for strategy in ("default", "full"):  # no class token: both give every patch
                feats = ours.features(px, layer, strategy)
                assert feats.shape[1] == ours.num_tokens(strategy) == ours.config.num_patches
                assert (feats - ref.hidden_states[layer]).abs().max() <= 1e-5


def test_tower_matches_hf_siglip_vision_model(tmp_path):
    hf = hf_tower()
    hf.save_pretrained(tmp_path)
    assert detect_family(json.loads((tmp_path / "config.json").read_text())) == "siglip"
    ours = load_pretrained(tmp_path)
    assert isinstance(ours, SiglipVisionTransformer)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    assert_tower_matches(ours, hf, torch.randn(2, 3, 16, 16))


def test_siglip_model_folder_loads_the_vision_half(tmp_path):
    torch.manual_seed(0)
    tc = transformers.SiglipTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, vocab_size=100, max_position_embeddings=16)
    hf = transformers.SiglipModel(transformers.SiglipConfig(text_config=tc.to_dict(),
                                                            vision_config=hf_vision_config().to_dict()))
    hf = randomise_(hf).eval()
    hf.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert any(k.startswith("vision_model.") for k in keys) and any(k.startswith("text_model.") for k in keys)
    ours = load_pretrained(tmp_path)
    assert isinstance(ours, SiglipVisionTransformer)
    assert_tower_matches(ours, hf.vision_model, torch.randn(2, 3, 16, 16))


def test_both_key_layouts_and_bad_keys(tmp_path):
    hf = hf_tower()
    hf.save_pretrained(tmp_path / "bare")  # transformers 5: embeddings.*, encoder.*, head.*
    state = load_file(tmp_path / "bare" / "model.safetensors")
    assert all(not k.startswith("vision_model.") for k in state)
    old = tmp_path / "prefixed"  # transformers 4 SiglipVisionModel: vision_model.embeddings.*
    old.mkdir()
    (old / "config.json").write_text((tmp_path / "bare" / "config.json").read_text())
    save_file({"vision_model." + k: v for k, v in state.items()}, old / "model.safetensors", metadata={"format": "pt"})
    a, b = load_pretrained(tmp_path / "bare"), load_pretrained(old)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    ours = SiglipVisionTransformer(siglip_config_from_hf(hf.config.to_dict()))
    bad = dict(state)
    del bad["head.probe"]
    bad["encoder.layers.9.mlp.fc1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        hf_to_ours(ours, "siglip", bad)
    assert "missing (1): head.probe" in str(e.value) and "unexpected (1): encoder.layers.9.mlp.fc1.weight" in str(e.value)


@pytest.mark.parametrize("use_head", [True, False])
def test_export_loads_in_transformers(tmp_path, use_head):
    torch.manual_seed(0)
    ours = randomise_(SiglipVisionTransformer(siglip_config("siglip-tiny", image_size=16, patch_size=4,
                                                            use_head=use_head))).eval()
    export_pretrained(ours, tmp_path)
    hf, info = transformers.SiglipVisionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    px = torch.randn(2, 3, 16, 16)
    if use_head:
        assert_tower_matches(ours, hf.eval(), px)
    else:
        with torch.no_grad():
            ref = hf.eval()(pixel_values=px, output_hidden_states=True)
            assert (ours(px)[-2] - ref.hidden_states[-2]).abs().max() <= 1e-5
        assert load_pretrained(tmp_path).head is None


def test_other_image_size_interpolates_positions_as_hf():
    hf = hf_tower()
    ours = SiglipVisionTransformer(siglip_config_from_hf(hf.config.to_dict())).eval()
    ours.load_state_dict(hf_to_ours(ours, "siglip", hf.state_dict()))
    px = torch.randn(1, 3, 24, 20)
    with torch.no_grad():
        ref = hf(pixel_values=px, interpolate_pos_encoding=True).last_hidden_state
        assert (ours.last_hidden_state(px) - ref).abs().max() <= 1e-5
    assert ours.num_tokens(image_size=24) == 36


def test_named_configs_and_parameter_counts():
    so400m = siglip_config("siglip-so400m-384")
    assert (so400m.patch_size, so400m.image_size, so400m.dim, so400m.n_layers, so400m.n_heads, so400m.mlp_dim) == \
        (14, 384, 1152, 27, 16, 4304) and so400m.num_patches == 729
    base = siglip_config("siglip-base-224")
    assert (base.patch_size, base.image_size, base.dim, base.n_layers, base.n_heads, base.mlp_dim) == \
        (16, 224, 768, 12, 12, 3072) and base.num_patches == 196
    assert "siglip-tiny" in SIGLIP_CONFIGS
    hf_kw = dict(hidden_size="dim", intermediate_size="mlp_dim", num_hidden_layers="n_layers",
                 num_attention_heads="n_heads", image_size="image_size", patch_size="patch_size")
    for cfg in (so400m, base):  # same parameter count as transformers' model of that shape (on meta: no memory)
        with torch.device("meta"):
            ours = SiglipVisionTransformer(cfg)
            hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
                **{k: getattr(cfg, v) for k, v in hf_kw.items()}))
        assert ours.num_params() == sum(p.numel() for p in hf.parameters())


def test_detect_family_refuses_naflex():
    assert detect_family({"architectures": ["SiglipModel"], "model_type": "siglip"}) == "siglip"
    assert detect_family({"model_type": "siglip_vision_model"}) == "siglip"
    with pytest.raises(ValueError, match="NaFlex"):
        detect_family({"architectures": ["Siglip2VisionModel"], "model_type": "siglip2_vision_model"})


def test_gradient_checkpointing_same_values():
    torch.manual_seed(0)
    m = SiglipVisionTransformer(siglip_config("siglip-tiny")).train()
    px = torch.randn(2, 3, 32, 32)
    ref = m.features(px, -2)
    m.gradient_checkpointing = True
    got = m.features(px, -2)
    got.sum().backward()
    assert torch.allclose(got, ref) and m.patch_embed.weight.grad is not None


# --- LLaVA with a SigLIP tower ---------------------------------------------------------------------------

def make_llava_pair(layer=-2, seed=0):
    torch.manual_seed(seed)
    tc = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=256,
                                  rope_parameters=dict(rope_type="default", rope_theta=5000.0))
    cfg = transformers.LlavaConfig(vision_config=hf_vision_config(), text_config=tc, image_token_id=IMAGE_ID,
                                   vision_feature_select_strategy="full", vision_feature_layer=layer)
    hf = randomise_(transformers.LlavaForConditionalGeneration(cfg)).eval()
    ours = LlavaModel(llava_config_from_hf(cfg.to_dict())).eval()
    ours.load_state_dict(hf_to_ours(ours, "llava", hf.state_dict()))
    return hf, ours


def assert_llava_matches(ours, hf, px):
    ids, mask = prompt_ids(ours.num_image_tokens)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        got = ours(ids, px, attention_mask=mask)
    keep = mask.bool()
    assert (got[keep] - ref[keep]).abs().max() <= 1e-4


@pytest.mark.parametrize("layer", [-2, -1])
def test_llava_with_siglip_matches_hf(layer):
    hf, ours = make_llava_pair(layer)
    assert isinstance(ours.vision_tower, SiglipVisionTransformer) and ours.config.select_strategy == "full"
    assert ours.num_image_tokens == 16
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    px = torch.randn(2, 3, 16, 16)
    assert_llava_matches(ours, hf, px)
    ours.config.select_strategy = "default"  # ours: "default" is all patches too, nothing dropped
    assert ours.num_image_tokens == 16
    assert_llava_matches(ours, hf, px)


def test_llava_with_siglip_folder_roundtrip(tmp_path):
    hf, _ = make_llava_pair()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert isinstance(ours.vision_tower, SiglipVisionTransformer)
    px = torch.randn(2, 3, 16, 16)
    assert_llava_matches(ours, hf, px)
    ours.config.select_strategy = "default"
    export_pretrained(ours, tmp_path / "ours")  # written as transformers' "full" (all patches)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "siglip_vision_model"
    assert config["vision_feature_select_strategy"] == "full" and config["image_seq_length"] == 16
    assert any(k.startswith("vision_tower.vision_model.") for k in load_file(tmp_path / "ours" / "model.safetensors"))
    back, info = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_llava_matches(ours, back.eval(), px)


def test_llava_hf_default_strategy_with_siglip_is_refused():
    cfg = transformers.LlavaConfig(vision_config=hf_vision_config(), text_config=transformers.LlamaConfig(),
                                   vision_feature_select_strategy="default")
    with pytest.raises(ValueError, match="first patch"):
        llava_config_from_hf(cfg.to_dict())


def test_llava_config_dict_picks_the_tower():
    cfg = LlavaConfig(vision=siglip_config("siglip-tiny"), text=llama_config("tiny"), image_token_id=3)
    back = LlavaConfig.from_dict(cfg.to_dict())
    assert isinstance(back.vision, SiglipConfig) and back == cfg
    assert isinstance(LlavaModel(back).vision_tower, SiglipVisionTransformer)
    old = LlavaConfig(vision=vision_config("tiny"), text=llama_config("tiny"), image_token_id=3).to_dict()
    assert "family" not in old["vision"]  # an old checkpoint dict: CLIP
    assert isinstance(LlavaConfig.from_dict(old).vision, VisionConfig)


def test_image_processor_matches_hf_siglip():
    cfg = siglip_config("siglip-tiny", image_size=48)
    proc = ImageProcessor.for_vision(cfg)
    assert ImageProcessor.from_dict(proc.to_dict()).to_dict() == proc.to_dict()
    hf = transformers.SiglipImageProcessorPil(size={"height": 48, "width": 48})
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (37, 61, 3), dtype=np.uint8))
    ref = torch.as_tensor(np.asarray(hf(img, return_tensors="np")["pixel_values"][0]))
    got = proc(img)
    assert got.shape == (3, 48, 48) and (got - ref).abs().max() <= 1e-5
    clip = ImageProcessor.for_vision(vision_config("tiny"))
    assert not clip.resize_to_square and clip.size == 32


def test_image_size_not_a_multiple_of_the_patch_as_so400m():
    # so400m: 384 px / patch 14 -> a 27 x 27 grid, the last 6 pixels unused; here 18 px / patch 4 -> 4 x 4
    torch.manual_seed(0)
    hf = randomise_(transformers.SiglipVisionModel(hf_vision_config(image_size=18))).eval()
    ours = SiglipVisionTransformer(siglip_config_from_hf(hf.config.to_dict())).eval()
    ours.load_state_dict(hf_to_ours(ours, "siglip", hf.state_dict()))
    assert ours.num_tokens() == 16
    assert_tower_matches(ours, hf, torch.randn(2, 3, 18, 18))
