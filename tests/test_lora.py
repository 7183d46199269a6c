"""LoRA adapters (models/lora.py) on tiny Llama / LLaVA / Coeus, against a hand-written float64 reference and peft."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn

from models.coeus import Coeus, coeus_config
from models.llama import Llama, llama_config
from models.llava import LlavaConfig, LlavaModel
from models.lora import (LoRALinear, adapter_config, apply_lora, format_report, lora_state_dict, merge_lora)
from models.vit import vision_config

ATTN = "q_proj,k_proj,v_proj,o_proj"
IMAGE_ID = 250


def logits(out):
    return out[0] if isinstance(out, tuple) else out


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return Llama(llama_config("tiny")).eval()


def tiny_llava(seed=0):
    torch.manual_seed(seed)
    return LlavaModel(LlavaConfig(vision=vision_config("tiny"), text=llama_config("tiny"), image_token_id=IMAGE_ID)).eval()


def randomise_B_(model, std=0.1):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, std)
    return model


def naive_lora(x, W, b, A, B, scale):
    """base + x A^T B^T scale, in float64, one output at a time (obviously correct, slow)."""
    x, W, A, B = x.double(), W.double(), A.double(), B.double()
    out = torch.zeros(*x.shape[:-1], W.shape[0], dtype=torch.float64)
    for o in range(W.shape[0]):
        base = (x * W[o]).sum(-1) + (0.0 if b is None else b[o].double())
        low = sum((x * A[k]).sum(-1) * B[o, k] for k in range(A.shape[0]))
        out[..., o] = base + low * scale
    return out


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_float64_reference(rslora, bias):
    torch.manual_seed(0)
    lin = nn.Linear(12, 7, bias=bias)
    m = LoRALinear(lin, r=4, alpha=8, use_rslora=rslora)
    assert m.scale == (8 / math.sqrt(4) if rslora else 8 / 4)
    nn.init.normal_(m.lora_B.weight)
    x = torch.randn(2, 3, 12)
    ref = naive_lora(x, lin.weight, lin.bias, m.lora_A.weight, m.lora_B.weight, m.scale)
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)
    # .weight is the effective weight (for code that reads it instead of calling the module)
    torch.testing.assert_close(nn.functional.linear(x, m.weight, m.bias).double(), ref, rtol=1e-5, atol=1e-5)


def test_init_matches_peft_reset():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    m = LoRALinear(lin, r=8)
    assert m.base is lin and not any(p.requires_grad for p in lin.parameters())
    assert torch.all(m.lora_B.weight == 0)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64 -> U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.std() > bound / 3


@pytest.mark.parametrize("make,targets", [(tiny_llama, ATTN), (tiny_llama, "all-linear"),
                                          (lambda: (torch.manual_seed(0), Coeus(coeus_config("tiny")).eval())[1], ATTN)])
def test_zero_B_is_base_model_exactly(make, targets):
    model = make()
    ids = torch.randint(0, 60, (2, 9))
    with torch.no_grad():
        ref = logits(model(ids))
    rep = apply_lora(model, targets, r=4)
    assert rep["n_wrapped"] > 0 and rep["adapter"] > 0
    with torch.no_grad():
        assert torch.equal(logits(model(ids)), ref)
    if targets == "all-linear":
        assert type(model.lm_head) is nn.Linear  # peft's all-linear skips the output head


def test_training_step_changes_only_adapters_and_train_modules():
    model = tiny_llava()
    rep = apply_lora(model, ATTN, r=4, alpha=8, dropout=0.1, train_modules=("projector",))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    n_img = model.num_image_tokens
    ids = torch.cat([torch.randint(0, IMAGE_ID, (2, 3)), torch.full((2, n_img), IMAGE_ID),
                     torch.randint(0, IMAGE_ID, (2, 4))], 1)
    px = torch.randn(2, 3, model.config.vision.image_size, model.config.vision.image_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        out0 = logits(model.eval()(ids, px))
    model.train()
    loss = model.loss(ids, px, labels=ids)
    loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(logits(model(ids, px)), out0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if ".lora_" in n or n.startswith("projector.")}
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == rep["trainable"]
    for n, p in model.named_parameters():
        if n in trainable:
            if ".lora_B" in n or n.startswith("projector."):  # A gets no grad while B is 0
                assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


def test_merge_unmerge_round_trip():
    model = tiny_llama()
    ids = torch.randint(0, 500, (2, 11))
    apply_lora(model, "all-linear", r=4)
    randomise_B_(model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        ref = logits(model(ids))
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.merge()
                m.merge()  # idempotent: the delta is not added twice
        torch.testing.assert_close(logits(model(ids)), ref, rtol=1e-5, atol=1e-5)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.unmerge()
        torch.testing.assert_close(logits(model(ids)), ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, w0[n], rtol=0, atol=1e-6)


def test_merge_lora_gives_plain_base_model():
    base = tiny_llama()
    model = copy.deepcopy(base)
    apply_lora(model, ATTN + ",gate_proj", r=4)
    randomise_B_(model)
    ids = torch.randint(0, 500, (2, 7))
    with torch.no_grad():
        ref = logits(model(ids))
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert model.state_dict().keys() == base.state_dict().keys()
        torch.testing.assert_close(logits(model(ids)), ref, rtol=1e-5, atol=1e-5)
        assert not torch.equal(model.layers[0].self_attn.q_proj.weight, base.layers[0].self_attn.q_proj.weight)
        assert torch.equal(model.layers[0].mlp.up_proj.weight, base.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("targets", [ATTN, "all-linear"])
def test_llava_adapters_all_inside_language_model(targets):
    model = tiny_llava()
    total_before = sum(p.numel() for p in model.parameters())
    r = 4
    expected = {n: (m.in_features, m.out_features) for n, m in model.language_model.named_modules()
                if type(m) is nn.Linear and (n.rpartition(".")[2] in ATTN.split(",") if targets == ATTN
                                             else n.rpartition(".")[2] != "lm_head")}
    rep = apply_lora(model, targets, r=r, train_modules=("projector",))
    lm_ids = {id(m) for m in model.language_model.modules()}
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert all(id(m) in lm_ids for m in adapters)  # no orphan outside the one language model
    assert len({id(m) for m in adapters}) == len(adapters) == len(expected) == rep["n_wrapped"]  # no duplicate
    assert sorted(n for n, m in model.language_model.named_modules() if isinstance(m, LoRALinear)) == sorted(expected)
    assert rep["adapter"] == sum(r * (i + o) for i, o in expected.values())
    seen = {}
    for _, p in model.named_parameters(remove_duplicate=False):  # tied weights appear twice, count once by id
        seen[id(p)] = p
    adapter_ids = {id(p) for m in adapters for p in (m.lora_A.weight, m.lora_B.weight)}
    assert len(adapter_ids) == 2 * len(adapters)
    base = sum(p.numel() for i, p in seen.items() if i not in adapter_ids)
    assert base == rep["base"] == total_before
    assert rep["base"] + rep["adapter"] == rep["total"] == sum(p.numel() for p in seen.values())
    assert rep["trainable"] == rep["adapter"] + sum(p.numel() for p in model.projector.parameters())
    line = format_report(rep)
    assert "\n" not in line and f"{rep['adapter']:,}" in line


def test_unknown_target_is_value_error():
    with pytest.raises(ValueError, match=r"qkv_projj.*q_proj"):
        apply_lora(tiny_llama(), "q_proj,qkv_projj")
    with pytest.raises(ValueError, match="projektor"):
        apply_lora(tiny_llava(), ATTN, train_modules=("projektor",))


def test_state_dict_and_config_shape():
    model = tiny_llama()
    apply_lora(model, "q_proj,v_proj", r=4, alpha=8, use_rslora=True)
    sd = lora_state_dict(model)
    assert len(sd) == 2 * 2 * model.config.n_layers
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in sd
    assert sd["base_model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (model.layers[1].self_attn.v_proj.out_features, 4)
    cfg = adapter_config(model)
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["use_rslora"] and cfg["lora_alpha"] == 8
    json.dumps(cfg)


@pytest.mark.parametrize("targets", ["q_proj,v_proj", "all-linear"])
def test_keys_and_config_match_peft(tmp_path, targets):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    tc = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=256)
    hf = transformers.LlamaForCausalLM(tc)
    kw = dict(r=4, alpha=8, dropout=0.05, use_rslora=True)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, use_rslora=True, bias="none", task_type="CAUSAL_LM",
                           target_modules=targets if targets == "all-linear" else targets.split(","))
    pm = peft.get_peft_model(hf, pcfg)
    pm.save_pretrained(tmp_path)
    their_sd = load_file(tmp_path / "adapter_model.safetensors")
    their_cfg = json.loads((tmp_path / "adapter_config.json").read_text())

    torch.manual_seed(0)
    ours = Llama(llama_config("tiny", vocab_size=256))
    apply_lora(ours, targets, **kw)
    our_sd = lora_state_dict(ours, prefix="base_model.model.model.")  # HF's Llama wraps ours in `model.`
    assert set(our_sd) == set(their_sd)
    for k in our_sd:
        assert our_sd[k].shape == their_sd[k].shape, k
    cfg = adapter_config(ours)
    for f in ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "bias", "task_type"):
        assert cfg[f] == their_cfg[f], f
    # peft matches target_modules by path suffix; for all-linear it writes the full paths it found
    if targets == "all-linear":
        assert {t.rpartition(".")[2] for t in their_cfg["target_modules"]} == set(cfg["target_modules"])
        ours_paths = {n for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
        assert {t.removeprefix("model.") for t in their_cfg["target_modules"]} == ours_paths
    else:
        assert sorted(cfg["target_modules"]) == sorted(their_cfg["target_modules"])


def test_our_adapter_loads_in_peft_with_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file
    from models.hf_weights import llama_config_to_hf, ours_to_hf
    ours = tiny_llama()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config_to_hf(ours.config))).eval()
    hf.load_state_dict(ours_to_hf(ours, "llama"))  # tiny is untied: every key present
    apply_lora(ours, "q_proj,v_proj,down_proj", r=4, alpha=8)
    randomise_B_(ours)
    save_file({k: v.contiguous() for k, v in lora_state_dict(ours, prefix="base_model.model.model.").items()},
              tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter_config(ours)))
    pm = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    ids = torch.randint(0, 500, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, logits(ours(ids)), rtol=1e-4, atol=1e-4)
