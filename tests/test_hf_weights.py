"""Loading Hugging Face folders (both transformers layouts, sharded, .bin) and exporting back to transformers."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from models.hf_weights import (export_pretrained, load_into, load_pretrained, read_state_dict,
                               tokenizer_model_path)
from models.llama import Llama, llama_config
from models.llava import LlavaModel, expand_image_tokens
from models.vit import VisionTransformer


def randomise_(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_llama_cfg(**kw):
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, rope_parameters=dict(rope_type="default", rope_theta=500.0))
    return transformers.LlamaConfig(**{**base, **kw})


def tiny_clip_cfg():
    return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=16, patch_size=4)


def tiny_llava(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlavaConfig(vision_config=tiny_clip_cfg(), text_config=tiny_llama_cfg(), image_token_id=250)
    return randomise_(transformers.LlavaForConditionalGeneration(cfg))


def edit_config(folder, fn):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        c = json.load(f)
    fn(c)
    with open(path, "w") as f:
        json.dump(c, f)


def rename_keys(folder, fn):
    path = os.path.join(folder, "model.safetensors")
    save_file({fn(k): v.contiguous() for k, v in load_file(path).items()}, path, metadata={"format": "pt"})


def old_rope(c):  # transformers-4 spelling: top-level rope_theta, no rope_parameters
    c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]


IDS = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(0))


# --- Llama ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["new", "old_rope", "sharded", "bin", "sharded_bin", "tied"])
def test_llama_folder_loads(tmp_path, variant):
    torch.manual_seed(0)
    hf = randomise_(transformers.LlamaForCausalLM(tiny_llama_cfg(tie_word_embeddings=variant == "tied")))
    if variant == "sharded":
        hf.save_pretrained(tmp_path, max_shard_size="40KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
    elif variant == "bin":
        hf.save_pretrained(tmp_path)
        torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
        os.remove(tmp_path / "model.safetensors")
    elif variant == "sharded_bin":  # transformers-4 style pytorch_model-0000x-of-00002.bin + index
        hf.save_pretrained(tmp_path)
        sd = load_file(tmp_path / "model.safetensors")
        os.remove(tmp_path / "model.safetensors")
        keys = sorted(sd)
        weight_map = {}
        for i, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:])):
            name = f"pytorch_model-0000{i + 1}-of-00002.bin"
            torch.save({k: sd[k] for k in part}, tmp_path / name)
            weight_map.update({k: name for k in part})
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        hf.save_pretrained(tmp_path)
    if variant == "old_rope":
        edit_config(tmp_path, old_rope)
    ours = load_pretrained(tmp_path)
    assert isinstance(ours, Llama) and ours.config.rope_theta == 500.0 and ours.config.n_kv_heads == 2
    with torch.no_grad():
        assert (ours(IDS) - hf(IDS).logits).abs().max() <= 1e-5
    if variant == "tied":
        assert ours.lm_head.weight is ours.embed_tokens.weight


def test_tokenizer_model_path(tmp_path):
    assert tokenizer_model_path(tmp_path) is None
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    assert tokenizer_model_path(tmp_path) == str(tmp_path / "tokenizer.model")


# --- CLIP ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["no_prefix", "vision_model_prefix", "clip_model"])
def test_clip_folder_loads(tmp_path, variant):
    torch.manual_seed(0)
    if variant == "clip_model":
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                    bos_token_id=0, eos_token_id=1)
        full = randomise_(transformers.CLIPModel(transformers.CLIPConfig(vision_config=tiny_clip_cfg().to_dict(),
                                                                         text_config=text)))
        full.save_pretrained(tmp_path)
        hf = full.vision_model
    else:
        hf = randomise_(transformers.CLIPVisionModel(tiny_clip_cfg()))
        hf.save_pretrained(tmp_path)
        if variant == "vision_model_prefix":
            rename_keys(tmp_path, lambda k: "vision_model." + k)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert any(k.startswith("vision_model.") for k in keys) == (variant != "no_prefix")
    ours = load_pretrained(tmp_path)
    assert isinstance(ours, VisionTransformer)
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = hf(pixel_values=px, output_hidden_states=True).hidden_states
        got = ours(px)
    assert max((a - b).abs().max() for a, b in zip(got, ref)) <= 1e-5


# --- LLaVA --------------------------------------------------------------------------------------------------

def to_module_layout(k):  # transformers-5 module names, as state_dict() gives them
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")):
        if k.startswith(old):
            return new + k[len(old):]
    return k


def to_v4_layout(k):
    return "vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k


@pytest.mark.parametrize("variant", ["save_pretrained", "v5_module_keys", "v4_keys_old_rope", "sharded"])
def test_llava_folder_loads(tmp_path, variant):
    hf = tiny_llava()
    hf.save_pretrained(tmp_path, **({"max_shard_size": "100KB"} if variant == "sharded" else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == (variant == "sharded")
    if variant == "v5_module_keys":
        rename_keys(tmp_path, to_module_layout)
        assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")
    if variant == "v4_keys_old_rope":
        rename_keys(tmp_path, to_v4_layout)
        edit_config(tmp_path, lambda c: old_rope(c["text_config"]))
    ours = load_pretrained(tmp_path)
    assert isinstance(ours, LlavaModel) and ours.config.text.rope_theta == 500.0
    ids = torch.tensor([expand_image_tokens([1, 2, 250, 7, 8], 250, ours.num_image_tokens)])
    px = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert (ours(ids, px) - hf(input_ids=ids, pixel_values=px).logits).abs().max() <= 1e-4


# --- errors ------------------------------------------------------------------------------------------------

def test_bad_keys_are_listed(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_cfg()).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    sd = load_file(path)
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.extra.weight"] = torch.zeros(3)
    sd["model.norm.weight"] = torch.ones(65)
    save_file(sd, path)
    with pytest.raises(ValueError) as e:
        load_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected (1): model.layers.0.extra.weight" in msg
    assert "mis-shaped (1): model.norm.weight file (65,) vs model (64,)" in msg
    # loading the decoder weights into a model of another shape is refused the same way
    with pytest.raises(ValueError, match="mis-shaped"):
        load_into(Llama(llama_config("tiny")), tmp_path)


def test_missing_folder_pieces(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_cfg().to_dict()))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        read_state_dict(tmp_path)


# --- export -> transformers ---------------------------------------------------------------------------------

def assert_loads_cleanly(cls, folder):
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("tied", [False, True])
def test_export_llama(tmp_path, tied):
    torch.manual_seed(0)
    ours = randomise_(Llama(llama_config("tiny", rope_theta=1234.0, tie_embeddings=tied)))
    export_pretrained(ours, tmp_path)
    hf = assert_loads_cleanly(transformers.LlamaForCausalLM, tmp_path)
    ids = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-5
    again = load_pretrained(tmp_path)  # and round-trips into ours bit for bit
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_export_vit(tmp_path):
    from models.vit import vision_config
    torch.manual_seed(0)
    ours = randomise_(VisionTransformer(vision_config("tiny")))
    export_pretrained(ours, tmp_path)
    hf = assert_loads_cleanly(transformers.CLIPVisionModel, tmp_path)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (hf(pixel_values=px, output_hidden_states=True).hidden_states[-2] - ours(px)[-2]).abs().max() <= 1e-5


def test_export_llava(tmp_path):
    hf = tiny_llava()
    hf.save_pretrained(tmp_path / "src")
    ours = load_pretrained(tmp_path / "src")
    export_pretrained(ours, tmp_path / "out")
    back = assert_loads_cleanly(transformers.LlavaForConditionalGeneration, tmp_path / "out")
    ids = torch.tensor([expand_image_tokens([1, 250, 7], 250, ours.num_image_tokens)])
    px = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert (back(input_ids=ids, pixel_values=px).logits - ours(ids, px)).abs().max() <= 1e-4
