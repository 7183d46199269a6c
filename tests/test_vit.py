"""CLIP-style ViT against transformers' CLIPVisionModel (random tiny weights, float32)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from models.hf_weights import hf_to_ours, vision_config_from_hf
from models.vit import VisionTransformer, vision_config


def make_pair(image_size=32, patch_size=8, layers=3, seed=0):
    torch.manual_seed(seed)
    hf_cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                           num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    hf = transformers.CLIPVisionModel(hf_cfg).eval()
    with torch.no_grad():  # HF init leaves LayerNorms at 1/0 and biases at 0: randomise so the test can fail
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    ours = VisionTransformer(vision_config_from_hf(hf_cfg.to_dict())).eval()
    ours.load_state_dict(hf_to_ours(ours, "clip", hf.state_dict()))
    return hf, ours


def test_every_hidden_state_and_pool_match_hf():
    hf, ours = make_pair()
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=px, output_hidden_states=True)
        hidden = ours(px)
        pooled = ours.pooled(px)
    assert len(hidden) == len(ref.hidden_states) == 4
    for a, b in zip(hidden, ref.hidden_states):
        assert (a - b).abs().max() <= 1e-5
    assert (pooled - ref.pooler_output).abs().max() <= 1e-5


@pytest.mark.parametrize("strategy,n_tokens", [("default", 16), ("full", 17)])
def test_feature_layer_minus_two_and_select_strategy(strategy, n_tokens):
    hf, ours = make_pair()
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=px, output_hidden_states=True).hidden_states[-2]
        ref = ref[:, 1:] if strategy == "default" else ref  # what LLaVA's get_image_features does
        got = ours.features(px, feature_layer=-2, select_strategy=strategy)
    assert got.shape == (2, n_tokens, 64) and ours.num_tokens(strategy) == n_tokens
    assert (got - ref).abs().max() <= 1e-5


def test_clip_l_336_token_arithmetic():
    cfg = vision_config("clip-vit-l-336")
    assert cfg.num_patches == 576 and cfg.num_patches + 1 == 577
    with torch.device("meta"):
        vit = VisionTransformer(cfg)
    assert vit.num_tokens("default") == 576 and vit.num_tokens("full") == 577
    assert vit.position_embedding.weight.shape == (577, 1024)
    assert sum(p.numel() for p in vit.parameters()) == 303_507_456  # published CLIPVisionModel ViT-L/14-336 size


def test_interpolated_positions_match_hf():
    hf, ours = make_pair()
    px = torch.randn(1, 3, 48, 40)  # 6 x 5 patches from a 4 x 4 grid of learned positions
    with torch.no_grad():
        ref = hf(pixel_values=px, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
        got = ours(px)
    assert got[-1].shape == (1, 31, 64)
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= 1e-5


def test_bf16_pixels_into_fp32_model_and_autocast():
    _, ours = make_pair()
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = ours.features(px)
        got = ours.features(px.bfloat16())  # cast to the weight dtype inside, no dtype error
        assert got.dtype == torch.float32 and (got - ref).abs().max() < 0.1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = ours.features(px.half())
        assert torch.isfinite(auto).all() and (auto.float() - ref).abs().max() < 0.2
        assert ours.to(torch.bfloat16).features(px).dtype == torch.bfloat16  # bf16 weights, fp32 pixels


def test_wrong_patch_multiple_is_a_clear_error():
    _, ours = make_pair()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ours(torch.randn(1, 3, 30, 32))


def test_conv_stem_tower_shapes_and_no_hf_export():
    from models.hf_weights import vision_config_to_hf
    from models.vit import VisionTransformer
    cfg = vision_config("tiny", conv_stem=3)           # patch 8 = 2**3
    tower = VisionTransformer(cfg)
    hidden = tower(torch.randn(2, 3, 32, 32))
    assert hidden[-1].shape == (2, 1 + 16, cfg.dim)
    assert isinstance(tower.patch_embed, torch.nn.Sequential)
    with pytest.raises(ValueError, match="conv stem of 2 stride-2 layers needs patch_size 4"):
        vision_config("tiny", conv_stem=2)
    with pytest.raises(ValueError, match="cannot be exported"):
        vision_config_to_hf(cfg)
