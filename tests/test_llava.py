"""LLaVA composite against transformers' LlavaForConditionalGeneration (random tiny weights, float32)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from models.hf_weights import hf_to_ours, llava_config_from_hf, load_into
from models.llama import Llama, llama_config
from models.llava import LlavaConfig, LlavaModel, expand_image_tokens
from models.vit import vision_config

IMAGE_ID = 250  # inside the vocabulary, as llava-hf's 32000 of 32064


def randomise_(model):
    with torch.no_grad():  # HF init leaves norms at 1 and biases at 0: perturb so a mix-up cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def make_pair(strategy="default", seed=0):
    torch.manual_seed(seed)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=16, patch_size=4)
    tc = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=256, rope_parameters=dict(rope_type="default", rope_theta=5000.0))
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_ID,
                                   vision_feature_select_strategy=strategy, vision_feature_layer=-2)
    hf = randomise_(transformers.LlavaForConditionalGeneration(cfg)).eval()
    ours = LlavaModel(llava_config_from_hf(cfg.to_dict())).eval()
    ours.load_state_dict(hf_to_ours(ours, "llava", hf.state_dict()))
    return hf, ours


def prompt_ids(n_tokens, batch=2):
    torch.manual_seed(1)
    rows = []
    for b in range(batch):
        text = torch.randint(0, IMAGE_ID, (5 + b,)).tolist()
        rows.append(expand_image_tokens(text[:2] + [IMAGE_ID] + text[2:], IMAGE_ID, n_tokens))
    T = max(map(len, rows))
    ids = torch.zeros(batch, T, dtype=torch.long)
    mask = torch.zeros(batch, T, dtype=torch.long)
    for b, r in enumerate(rows):  # left padding, as generation batches are
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_logits_match_hf(strategy):
    hf, ours = make_pair(strategy)
    n = ours.num_image_tokens
    assert n == 16 + (strategy == "full")
    ids, mask = prompt_ids(n)
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        got = ours(ids, px, attention_mask=mask)
    keep = mask.bool()  # padded positions are don't-care in both
    assert (got[keep] - ref[keep]).abs().max() <= 1e-4


def test_parameter_count_is_sum_of_parts_and_no_second_llm():
    cfg = LlavaConfig(vision=vision_config("tiny"), text=llama_config("tiny"), image_token_id=3)
    m = LlavaModel(cfg)
    parts = [m.vision_tower, m.projector, m.language_model]
    assert m.num_params() == sum(sum(p.numel() for p in part.parameters()) for part in parts)
    assert sum(isinstance(x, Llama) for x in m.modules()) == 1
    assert set(n for n, _ in m.named_children()) == {"vision_tower", "projector", "language_model"}
    hf, _ = make_pair()  # and equal to the reference's count
    ours = LlavaModel(llava_config_from_hf(hf.config.to_dict()))
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())


def test_text_only_forward_equals_standalone_decoder(tmp_path):
    torch.manual_seed(0)
    tc = llama_config("tiny")
    decoder = Llama(tc).eval()
    randomise_(decoder)
    from models.hf_weights import export_pretrained
    export_pretrained(decoder, tmp_path / "llm")
    composed = LlavaModel(LlavaConfig(vision=vision_config("tiny"), text=llama_config("tiny"), image_token_id=999))
    load_into(composed.language_model, tmp_path / "llm")
    ids = torch.randint(0, tc.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(composed.eval()(ids), decoder(ids))


def test_placeholder_mismatch_is_a_clear_error():
    cfg = LlavaConfig(vision=vision_config("tiny"), text=llama_config("tiny"), image_token_id=3)
    m = LlavaModel(cfg)
    ids = torch.tensor([[1, 3, 5]])  # one un-expanded placeholder
    with pytest.raises(ValueError, match=r"hold 1 image placeholder.*1 image\(s\) x 16 tokens = 16"):
        m(ids, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="hold 16 .* 0 image"):
        m(torch.tensor([expand_image_tokens([1, 3, 5], 3, 16)]))


def test_labels_at_image_positions_are_ignored():
    cfg = LlavaConfig(vision=vision_config("tiny"), text=llama_config("tiny"), image_token_id=3)
    m = LlavaModel(cfg).eval()
    ids = torch.tensor([expand_image_tokens([1, 7, 3, 5, 9, 11], 3, 16)])
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits, loss = m(ids, px, labels=ids)
        manual = ids.clone()
        manual[ids == 3] = -100
        ref = torch.nn.functional.cross_entropy(logits[0, :-1], manual[0, 1:], ignore_index=-100)
        assert torch.allclose(loss, ref)
        # and it differs from a loss that would train on the placeholders
        raw = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        assert not torch.allclose(loss, raw)


def test_placeholder_outside_vocab_and_bf16_pixels():
    cfg = LlavaConfig(vision=vision_config("tiny"), text=llama_config("tiny"), image_token_id=100_000)
    m = LlavaModel(cfg).eval()
    ids = torch.tensor([expand_image_tokens([1, 100_000, 5], 100_000, 16)])
    with torch.no_grad():
        out = m(ids, torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = m(ids, torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 18, cfg.text.vocab_size) and torch.isfinite(auto).all()


def test_config_round_trip():
    cfg = LlavaConfig(vision=vision_config("tiny"), text=llama_config("tiny"), image_token_id=3,
                      select_strategy="full")
    assert LlavaConfig.from_dict(cfg.to_dict()) == cfg
    assert isinstance(cfg.to_dict()["vision"], dict)


def test_loss_equals_the_full_forward_cross_entropy_on_learned_positions():
    """LlavaModel.loss (head + cross-entropy on the learned rows only) against a float64 reference: the full
    forward's logits, cross-entropy over labels[:, 1:] with image positions ignored."""
    torch.manual_seed(0)
    cfg = LlavaConfig(vision=vision_config("tiny"), text=llama_config("tiny", vocab_size=64), image_token_id=63)
    model = LlavaModel(cfg).double()
    n = model.num_image_tokens
    ids = torch.randint(0, 60, (2, n + 12))
    ids[:, 1:1 + n] = 63                                    # one image per row after a BOS-like token
    labels = ids.clone()
    labels[:, :n + 4] = -100                                # the prompt is not learned
    labels[1, -3:] = -100                                   # nor row 1's padding
    px = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, dtype=torch.float64)
    logits = model(ids, px)                                 # (B, T, V)
    targets = labels[:, 1:].masked_fill(ids[:, 1:] == 63, -100)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), targets.reshape(-1), ignore_index=-100)
    got = model.loss(ids, px, labels)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert model.num_learned(ids, labels) == int((targets != -100).sum()) == 2 * 8 - 3
