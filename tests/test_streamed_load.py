"""models/hf_weights.load_streamed: a decoder folder loaded tensor by tensor, shard after shard, into a model on
meta (QLoRA: straight into 4 bits), equal to loading the whole state dict; train_vqa --qlora --init-llm uses it."""
import os

import pytest
import torch

import models.hf_weights as hf_weights
from models.hf_weights import BUILDERS, load_pretrained, load_streamed, read_config
from models.nf4 import quantize_linears

transformers = pytest.importorskip("transformers")


def sharded_folder(tmp_path, family):
    torch.manual_seed(0)
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**base, tie_word_embeddings=True))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base))
    folder = tmp_path / family
    model.save_pretrained(folder, max_shard_size="100KB")  # several shards + an index
    assert os.path.isfile(folder / "model.safetensors.index.json")
    return str(folder)


def on_meta(folder):
    family = hf_weights.detect_family(read_config(folder))
    config_from_hf, cls = BUILDERS[family]
    with torch.device("meta"):
        return cls(config_from_hf(read_config(folder)))


def no_whole_state_dict(monkeypatch):
    def refuse(folder):
        raise AssertionError("read the whole state dict")
    monkeypatch.setattr(hf_weights, "read_state_dict", refuse)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_streamed_equals_whole_state_dict(tmp_path, monkeypatch, family):
    folder = sharded_folder(tmp_path, family)
    dense = load_pretrained(folder)
    ref_q = load_pretrained(folder)
    quantize_linears(ref_q, compute_dtype=torch.float32)
    no_whole_state_dict(monkeypatch)
    got = load_streamed(on_meta(folder), folder, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), dense.state_dict().values()))
    q = on_meta(folder)
    quantize_linears(q, compute_dtype=torch.float32)  # 4-bit modules on meta, filled as the shards stream in
    load_streamed(q, folder, dtype=torch.float32)
    sd, ref = q.state_dict(), ref_q.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    assert not any(t.is_meta for t in sd.values())
    if family == "qwen2":
        assert q.lm_head.weight is q.embed_tokens.weight


def test_a_folder_of_another_shape_is_one_clear_error(tmp_path):
    folder = sharded_folder(tmp_path, "llama")
    from models.llama import Llama, llama_config
    with torch.device("meta"):
        other = Llama(llama_config("tiny", vocab_size=300))
    with pytest.raises(ValueError, match="mis-shaped"):
        load_streamed(other, folder)


def test_train_vqa_qlora_streams_the_decoder(tmp_path, monkeypatch):
    import train_vqa
    from tests.test_train_vqa import args_for, make_dataset
    from tests.test_train_vqa_lora import hf_llm_folder
    import json
    root = str(tmp_path / "vqa")
    entries = make_dataset(root, n_images=4)
    data = {"root": root}
    for name in ("train", "val", "test"):
        data[name] = os.path.join(root, f"{name}.json")
        json.dump(entries, open(data[name], "w"))
    llm = hf_llm_folder(tmp_path)
    no_whole_state_dict(monkeypatch)  # --qlora must not read the whole decoder at once
    out = str(tmp_path / "out")
    train_vqa.main(args_for(data, out, "--init-llm", llm, "--qlora", "--lora-r", "4", "--max-steps", "2",
                            "--eval-every", "0", "--test-samples", "2"))
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))
