"""The decoder families of models/llama.py against transformers (random tiny weights, float32): Llama-3.1/3.2's
llama3 RoPE scaling, linear and dynamic scaling, Qwen2/2.5 (q/k/v bias, tied head); both config.json layouts,
export -> transformers, KV-cache decoding, and the fused-kernel predicate that must refuse biased layers."""
import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kernels.fused_decode import can_run_fused_layers, fused_layers_unsupported
from models.hf_weights import (detect_family, export_pretrained, hf_to_ours, llama_config_from_hf, load_pretrained,
                               qwen2_config_from_hf)
from models.llama import Llama, LlamaConfig, llama_config
from utils.decoding import Decoder, LlamaLM, decode_tokens, full_recompute_greedy
from utils.sampling import SamplerConfig

ORIG = 32  # the tiny models' original context: the tests run past it
SCALINGS = {
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=ORIG),
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=3.0),
}
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256)


def hf_config(family, scaling=None, theta=10000.0, tied=False):
    rope = dict(rope_type="default", rope_theta=theta) if scaling is None else dict(SCALINGS[scaling], rope_theta=theta)
    cls = transformers.Qwen2Config if family == "qwen2" else transformers.LlamaConfig
    # llama3 / linear stretch an ORIG-token training context to 4 x ORIG; dynamic scales past max_position_embeddings
    return cls(**SHAPE, max_position_embeddings=ORIG if scaling == "dynamic" else 4 * ORIG, rope_parameters=rope,
               tie_word_embeddings=tied)


def noisy_(model, seed=0):
    """Norm weights and biases away from their 1 / 0 init, so that a dropped one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def hf_model(family, scaling=None, theta=10000.0, tied=False, seed=0):
    torch.manual_seed(seed)
    cfg = hf_config(family, scaling, theta, tied)
    cls = transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.LlamaForCausalLM
    return noisy_(cls(cfg).eval(), seed)


def ours_from(hf, family):
    reader = qwen2_config_from_hf if family == "qwen2" else llama_config_from_hf
    ours = Llama(reader(hf.config.to_dict())).eval()
    ours.load_state_dict(hf_to_ours(ours, family, hf.state_dict()), strict=not ours.config.tie_embeddings)
    return ours


CASES = [("llama", "llama3", False), ("llama", "linear", False), ("llama", "dynamic", False),
         ("qwen2", None, True), ("qwen2", "llama3", False)]


@pytest.mark.parametrize("family,scaling,tied", CASES)
def test_logits_match_hf_past_the_original_context(family, scaling, tied):
    hf = hf_model(family, scaling, 1e6 if family == "qwen2" else 10000.0, tied)
    ours = ours_from(hf, family)
    assert ours.config.attention_bias == (family == "qwen2") and ours.config.tie_embeddings == tied
    with torch.no_grad():
        for T in (3 * ORIG // 2, ORIG // 2):  # dynamic: scaled theta, then back to the original one
            ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(T))
            assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-5, T


def test_rope_scaling_changes_the_frequencies():
    """The scalings are not no-ops at these sizes (else the tests above would prove nothing)."""
    plain = Llama(LlamaConfig(**llama_config("tiny").__dict__)).eval()
    ids = torch.randint(0, 512, (1, 3 * ORIG // 2))
    with torch.no_grad():
        ref = plain(ids)
        for name, s in SCALINGS.items():
            scaled = copy.deepcopy(plain)
            scaled.config.rope_scaling = dict(s)
            scaled.config.max_seq_len = ORIG
            assert (scaled(ids) - ref).abs().max() > 1e-4, name


def _rewrite_old_layout(folder):
    """transformers-4 config.json: top-level rope_theta and rope_scaling (with `type`), no rope_parameters."""
    path = folder / "config.json"
    c = json.loads(path.read_text())
    rope = c.pop("rope_parameters")
    c["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    c["rope_scaling"] = None if kind == "default" else dict(rope, type=kind)
    path.write_text(json.dumps(c))


@pytest.mark.parametrize("layout", ["v5", "v4"])
@pytest.mark.parametrize("family,scaling,tied", [("llama", "llama3", False), ("llama", "dynamic", True),
                                                 ("qwen2", None, True), ("qwen2", "linear", False)])
def test_folder_loads_in_both_config_layouts(tmp_path, layout, family, scaling, tied):
    hf = hf_model(family, scaling, 5e5, tied)
    hf.save_pretrained(tmp_path)
    if layout == "v4":
        _rewrite_old_layout(tmp_path)
    assert detect_family(json.loads((tmp_path / "config.json").read_text())) == family
    ours = load_pretrained(tmp_path)
    assert ours.config.rope_theta == 5e5
    assert (ours.config.rope_scaling or {}).get("rope_type") == scaling
    ids = torch.randint(0, 256, (1, 3 * ORIG // 2))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("family,scaling,tied", CASES)
def test_export_loads_in_transformers(tmp_path, family, scaling, tied):
    ours = ours_from(hf_model(family, scaling, 1e6, tied, seed=3), family)
    export_pretrained(ours, tmp_path)
    cls = transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.LlamaForCausalLM
    hf, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.randint(0, 256, (2, 3 * ORIG // 2))
    with torch.no_grad():
        assert (hf.eval()(ids).logits - ours(ids)).abs().max() <= 1e-5
    again = load_pretrained(tmp_path)  # and back into ours, config and weights
    assert again.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


@pytest.mark.parametrize("family,scaling,tied", CASES)
def test_kv_cache_steps_equal_the_full_forward(family, scaling, tied):
    """Prefill then one token at a time through setup_cache / input_pos: the full forward's logits at every position.
    dynamic stays within the original context: past it, transformers' generate too keeps each cached key rotated
    with the theta of its own step, so only the full forward is defined there (tested above)."""
    ours = ours_from(hf_model(family, scaling, 10000.0, tied), family)
    T = ORIG if scaling == "dynamic" else 3 * ORIG // 2
    ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = ours(ids)
        ours.setup_cache(2, T)
        got = [ours(ids[:, :5], input_pos=torch.arange(5))]
        for t in range(5, T):
            got.append(ours(ids[:, t:t + 1], input_pos=torch.tensor([t])))
    assert (torch.cat(got, 1) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("family,scaling", [("llama", "llama3"), ("qwen2", None)])
def test_fused_greedy_decoding_equals_full_recompute(family, scaling):
    """LlamaLM(fuse=True) (q/k/v concatenated, Qwen2's biases with them) + Decoder greedy == rerunning the unfused
    model on the whole sequence each token."""
    ours = ours_from(hf_model(family, scaling, 10000.0, family == "qwen2"), family)
    reference = LlamaLM(copy.deepcopy(ours))
    lm = LlamaLM(ours, fuse=True)
    assert lm.model.layers[0].self_attn.qkv_proj.bias is not None or family == "llama"
    prompts = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    n = 3 * ORIG // 2 - 9
    with torch.no_grad():
        dec = Decoder(lm, SamplerConfig(temperature=0))
        dec.setup(2, 9 + n, "cpu")
        got = torch.cat(list(decode_tokens(dec, dec.decode_one, prompts, n, sync_every=7)), 1)
        assert torch.equal(got, full_recompute_greedy(reference, prompts, n))


def test_fused_decode_kernels_take_qkv_bias_and_refuse_the_others():
    """The Triton layer kernels add Qwen2's q/k/v bias (tests/test_gemv.py runs them); an o_proj bias
    (transformers' Llama with attention_bias=True) has no place in them: that model takes the plain path."""
    qwen = Llama(llama_config("tiny", attention_bias=True)).eval().fuse_projections()
    o_biased = Llama(llama_config("tiny", attention_bias=True, o_proj_bias=True)).eval().fuse_projections()
    assert fused_layers_unsupported(qwen.layers) is None
    assert "o_proj has a bias" in fused_layers_unsupported(o_biased.layers)
    o_biased.setup_cache(1, 16, dtype=torch.bfloat16)
    x = torch.zeros(1, 1, o_biased.config.dim, dtype=torch.bfloat16)
    assert not can_run_fused_layers(o_biased.layers, x, torch.tensor([0]))
    from kernels.launch import triton
    if triton is not None:  # the adapter says so once and turns the layer kernels off
        with pytest.warns(UserWarning, match="fused decode layers off"):
            lm = LlamaLM(Llama(llama_config("tiny", attention_bias=True, o_proj_bias=True)).eval(), fuse=True,
                         gemv=True)
        assert not lm.layer_kernels and "bias" in lm.layer_kernels_off
        lm = LlamaLM(Llama(llama_config("tiny", attention_bias=True)).eval(), fuse=True, gemv=True)
        assert lm.layer_kernels and lm.layer_kernels_off is None


def test_configs_old_dicts_and_bad_rope_types():
    old = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256,
               rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False)  # a checkpoint's model_config from before
    cfg = LlamaConfig(**old)
    assert cfg.rope_scaling is None and not cfg.attention_bias and not cfg.o_proj_bias
    with pytest.raises(ValueError, match="'yarn'"):
        LlamaConfig(**old, rope_scaling=dict(rope_type="yarn", factor=4.0))
    with pytest.raises(ValueError, match="lacks"):
        LlamaConfig(**old, rope_scaling=dict(rope_type="llama3", factor=8.0))
    with pytest.raises(ValueError, match="'longrope'"):
        llama_config_from_hf(dict(rope_scaling=dict(type="longrope", factor=2.0)))
    # the published shapes: parameter counts of the released checkpoints
    published = {"llama3-8b": 8030261248, "llama3.2-1b": 1235814400, "qwen2.5-0.5b": 494032768,
                 "qwen2.5-1.5b": 1543714304, "tinyllama-1.1b": 1100048384}
    for name, n in published.items():
        with torch.device("meta"):
            assert Llama(llama_config(name)).num_params() == n, name


def test_llava_with_a_qwen2_language_model(tmp_path):
    """LLaVA's text_config may be a Qwen2 (as in LLaVA-OneVision-style pairings): import, export, same logits."""
    from models.llava import expand_image_tokens
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=16, patch_size=4)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=hf_config("qwen2", "llama3", 1e6),
                                   image_token_id=250)
    noisy_(transformers.LlavaForConditionalGeneration(cfg).eval()).save_pretrained(tmp_path / "src")
    ours = load_pretrained(tmp_path / "src")
    assert ours.language_model.config.attention_bias and not ours.language_model.config.o_proj_bias
    export_pretrained(ours, tmp_path / "out")
    back, info = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.tensor([expand_image_tokens([1, 250, 7], 250, ours.num_image_tokens)])
    px = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert (back.eval()(input_ids=ids, pixel_values=px).logits - ours(ids, px)).abs().max() <= 1e-4


def test_llama_attention_bias_covers_o_proj(tmp_path):
    """transformers' Llama attention_bias=True puts a bias on q, k, v and o_proj (Qwen2: q/k/v only)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**SHAPE, max_position_embeddings=128, attention_bias=True)
    hf = noisy_(transformers.LlamaForCausalLM(cfg).eval())
    ours = ours_from(hf, "llama")
    assert ours.config.attention_bias and ours.config.o_proj_bias
    export_pretrained(ours, tmp_path)
    back, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-5
        assert (back.eval()(ids).logits - hf(ids).logits).abs().max() <= 1e-5
