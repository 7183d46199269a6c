"""utils/adapters.py: peft's adapter folder both ways on a tiny LLaVA (transformers + peft as the reference),
and the script flags' spec."""
import argparse

import pytest
import torch

from models.hf_weights import load_pretrained
from models.llava import expand_image_tokens
from models.lora import LoRALinear, apply_lora
from utils.adapters import add_lora_args, apply_lora_spec, load_adapter, lora_spec, save_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from tests.test_hf_weights import tiny_llava  # noqa: E402  (the transformers tiny LLaVA other tests use)

IMAGE_ID = 250


def inputs(model):
    torch.manual_seed(1)
    ids = torch.tensor([expand_image_tokens([1, IMAGE_ID, 7, 9, 3], IMAGE_ID, model.num_image_tokens)] * 2)
    return ids, torch.randn(2, 3, 16, 16)


def perturb_(model):
    """Non-zero B and a changed projector, so the adapter and the saved module both matter."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.2)
        for p in model.projector.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture
def base_folder(tmp_path):
    tiny_llava().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_our_llava_adapter_loads_in_peft(tmp_path, base_folder):
    ours = load_pretrained(base_folder)
    apply_lora(ours, "all-linear", r=4, alpha=8, train_modules=("projector",))
    perturb_(ours)
    save_adapter(tmp_path / "adapter", ours, base=str(base_folder), modules_to_save=("projector",))
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(base_folder).eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    wrapped = [n for n, m in pm.named_modules() if hasattr(m, "lora_A")]
    assert wrapped and all("language_model" in n for n in wrapped)  # none in the vision tower
    ids, px = inputs(ours)
    with torch.no_grad():
        ref = pm(input_ids=ids, pixel_values=px).logits
        got = ours(ids, px)
    assert (ref - got).abs().max() <= 1e-4


def test_peft_adapter_loads_onto_ours(tmp_path, base_folder):
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(base_folder).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=r".*language_model\..*\.(q_proj|v_proj|down_proj)",
                          modules_to_save=["multi_modal_projector"])
    pm = peft.get_peft_model(hf, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.2)
    pm.save_pretrained(tmp_path / "peft")
    ours = load_pretrained(base_folder)
    rep = load_adapter(ours, tmp_path / "peft")
    assert rep["n_wrapped"] == 3 * ours.config.text.n_layers and rep["r"] == 4
    ids, px = inputs(ours)
    pm.eval()
    with torch.no_grad():
        assert (pm(input_ids=ids, pixel_values=px).logits - ours(ids, px)).abs().max() <= 1e-4


def test_adapter_of_another_model_is_one_clear_error(tmp_path, base_folder):
    ours = load_pretrained(base_folder)
    apply_lora(ours, "q_proj", r=4, alpha=8)
    save_adapter(tmp_path / "a", ours)
    other = load_pretrained(base_folder)
    apply_lora(other, "q_proj", r=8, alpha=8)  # already wrapped at another rank: shapes differ
    with pytest.raises(ValueError, match="mis-shaped"):
        load_adapter(other, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(other, tmp_path)


def flags(*argv):
    p = argparse.ArgumentParser()
    add_lora_args(p)
    return p.parse_args(list(argv))


def test_spec_from_flags():
    assert lora_spec(flags()) is None
    s = lora_spec(flags("--lora-r", "8"))
    assert (s["r"], s["alpha"], s["qlora"], s["targets"]) == (8, 16, False, "all-linear")
    q = lora_spec(flags("--qlora"), "bfloat16")
    assert (q["r"], q["alpha"], q["compute_dtype"]) == (64, 128, "bfloat16")


def test_spec_wraps_only_the_language_model(base_folder):
    ours = load_pretrained(base_folder)
    rep = apply_lora_spec(ours, lora_spec(flags("--lora-r", "4", "--lora-targets", "q_proj,v_proj")),
                          train_modules=("projector",))
    assert all(w.startswith("language_model.") for w in rep["wrapped"])
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if "lora_" in n or n.startswith("projector.")}
    assert any(n.startswith("projector.") for n in trainable)


def test_generate_loads_an_adapter_onto_a_base_folder(tmp_path):
    from models.lora import merge_lora
    from tests.test_train_vqa_lora import hf_llm_folder
    from utils.load_model import load_model
    base = hf_llm_folder(tmp_path)
    ours = load_pretrained(base)
    apply_lora(ours, "q_proj,down_proj", r=4, alpha=8)
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.2)
    save_adapter(tmp_path / "adapter", ours, base=base)
    loaded = load_model(base, adapter=str(tmp_path / "adapter"))
    assert not any("lora_" in k for k in loaded.lm.model.state_dict())  # merged: the fast decode path applies
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.lm.model(ids), merge_lora(ours)(ids), rtol=0, atol=1e-5)
    with pytest.raises(SystemExit, match="--adapter"):
        load_model(base, adapter=str(tmp_path))
