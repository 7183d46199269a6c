"""train_vqa.py with --lora-r / --qlora on the tiny synthetic data set: only adapters + projector move, the run
learns, stops and resumes bit for bit, and writes peft's adapter folder and (--merge-lora) the merged model."""
import json
import os

import pytest
import torch

import train_vqa
from tests.test_train_vqa import args_for, data, losses  # noqa: F401 (data: the module's fixture)
from utils.checkpoint import load_checkpoint
from utils.load_model import load_model


def hf_llm_folder(tmp_path):
    """A tiny random Llama as a Hugging Face folder with a sentencepiece tokenizer (the --init-llm of a run)."""
    import shutil
    from models.hf_weights import export_pretrained
    from models.llama import Llama, llama_config
    from utils.tokenizer import SentencePieceTokenizer
    torch.manual_seed(1)
    words = "what color is the shape red blue green circle rectangle yes no there a USER: ASSISTANT:".split()
    tok = SentencePieceTokenizer.train([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 3, 300,
                                       str(tmp_path / "spm"))
    folder = str(tmp_path / "llm")
    export_pretrained(Llama(llama_config("tiny", vocab_size=tok.vocab_size)), folder)
    shutil.copy(next((tmp_path / "spm").glob("*.model")), os.path.join(folder, "tokenizer.model"))
    return folder


LORA = ("--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--max-steps", "8", "--eval-every", "4")


@pytest.mark.parametrize("qlora", [False, True])
def test_lora_run_learns_and_resumes_bit_for_bit(data, tmp_path, qlora):
    extra = LORA + (("--qlora",) if qlora else ())
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train_vqa.main(args_for(data, full, *extra))
    train_vqa.main(args_for(data, split, *extra, "--stop-after", "5"))
    train_vqa.main(args_for(data, split, *extra, "--resume"))
    assert losses(split) == losses(full) and len(losses(full)) == 8
    first, last = losses(full)[0][1], min(v for _, v in losses(full)[-3:])
    assert last < first - 0.2, losses(full)  # it learns: the adapters and the projector move the loss
    ckpt = load_checkpoint(os.path.join(full, "last.pt"))
    assert ckpt["lora"]["r"] == 4 and ckpt["lora"]["qlora"] == qlora
    keys = set(ckpt["model"])
    assert any(".lora_A." in k for k in keys) and any(k.startswith("projector.") for k in keys)
    if qlora:
        assert any(".base." in k and "absmax" in k for k in keys)  # the 4-bit base is in the file
    # the adapter folder peft reads
    adapter = os.path.join(full, "adapter")
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    # a random ViT trains in full beside the projector (a pretrained one would stay frozen)
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["modules_to_save"] == ["multi_modal_projector",
                                                                                   "vision_tower"]
    # resume with other LoRA flags: one clear line
    with pytest.raises(SystemExit, match="LoRA"):
        train_vqa.cli(args_for(data, split, "--lora-r", "8", "--max-steps", "9", "--resume"))


def test_lora_on_a_pretrained_decoder_merges_and_loads(data, tmp_path):
    llm = hf_llm_folder(tmp_path)
    out = str(tmp_path / "out")
    train_vqa.main(args_for(data, out, *LORA, "--init-llm", llm, "--merge-lora"))
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "merged.pt",
                 "merged_hf/config.json", "merged_hf/tokenizer.model"):
        assert os.path.exists(os.path.join(out, name)), name
    ckpt = load_checkpoint(os.path.join(out, "best.pt"))
    # the base decoder never moved: its frozen weights are the folder's
    from models.hf_weights import load_pretrained
    base = load_pretrained(llm)
    assert torch.equal(ckpt["model"]["language_model.layers.0.mlp.down_proj.base.weight"],
                       base.layers[0].mlp.down_proj.weight)
    # the adapter checkpoint (merged on load) and merged.pt give the same logits
    a = load_model(os.path.join(out, "best.pt"))
    b = load_model(os.path.join(out, "merged.pt"))
    assert not any("lora_" in k for k in a.llava.state_dict())
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(a.llava.language_model(ids), b.llava.language_model(ids), rtol=0, atol=1e-6)


def test_lora_flags_need_the_finetune_stage(data, tmp_path):
    with pytest.raises(SystemExit):
        train_vqa.main(args_for(data, str(tmp_path / "x"), "--lora-r", "4", "--stage", "pretrain"))
