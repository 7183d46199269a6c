"""train_detect.py with --lora-r / --qlora on tiny configs (CPU): the run learns, stops and resumes bit for bit,
only the adapters of the decoder train there (head, projector, ViT in full), the adapter folder and merged.pt are
written, utils/load_model.py reads the checkpoints, and wrong flags are one line."""
import json
import os

import pytest
import torch

import train_detect
from utils.adapters import lora_spec
from tests.test_train_detect import TINY
from utils.load_model import load_model
from utils.metrics import read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

LORA = ("--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--max-steps", "6", "--lr-llm", "3e-3")


def run(tmp_path, name, *extra):
    out = str(tmp_path / name)
    train_detect.main(TINY + ["--out", out, "--tokenizer-cache", str(tmp_path / "tok"), *LORA, *extra])
    return out


def losses(out):
    return [(r["step"], r["loss"]) for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in r]


@pytest.mark.parametrize("qlora", [False, True])
def test_lora_run_learns_resumes_bit_for_bit_and_writes_the_adapter(tmp_path, qlora):
    extra = ("--qlora",) if qlora else ()
    full = run(tmp_path, "full", *extra, "--merge-lora")
    split = run(tmp_path, "split", *extra, "--stop-after", "2")  # mid-epoch (2 batches an epoch)
    assert not os.path.exists(os.path.join(split, "adapter"))  # an interrupted run writes no adapter yet
    run(tmp_path, "split", *extra, "--resume", os.path.join(split, "last.pt"))
    assert losses(split) == losses(full) and len(losses(full)) == 6
    a = torch.load(os.path.join(full, "last.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "last.pt"), weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    first, last = losses(full)[0][1], min(v for _, v in losses(full)[-2:])
    assert last < first, losses(full)  # it learns
    assert a["lora"]["r"] == 4 and a["lora"]["qlora"] == qlora
    keys = set(a["model"])
    assert any(".lora_B." in k for k in keys) and any(k.startswith("head.") for k in keys)
    assert any(torch.any(v != 0) for k, v in a["model"].items() if ".lora_B." in k)  # the adapters moved
    if qlora:
        assert any(".base." in k and "absmax" in k for k in keys)  # the 4-bit base is in the file

    # peft's folder: adapters + projector + the (random, so trained) ViT; the head stays in last.pt
    cfg = json.load(open(os.path.join(full, "adapter", "adapter_config.json")))
    assert cfg["r"] == 4 and cfg["modules_to_save"] == ["multi_modal_projector", "vision_tower"]
    assert os.path.isfile(os.path.join(full, "adapter", "adapter_model.safetensors"))

    # utils/load_model.py reads the LoRA checkpoint (adapters folded in on load) and merged.pt alike
    ca, cb = load_model(os.path.join(full, "last.pt")), load_model(os.path.join(full, "merged.pt"))
    assert ca.kind == cb.kind == "detect" and not any("lora_" in k for k in ca.llava.state_dict())
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ca.llava.language_model(ids), cb.llava.language_model(ids), rtol=0, atol=1e-5)

    # --resume with other LoRA flags: one clear line
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "split", "--lora-r", "8", "--resume", os.path.join(split, "last.pt"))
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "LoRA" in msg and "\n" not in msg


def test_only_the_adapters_of_the_decoder_train(tmp_path):
    args = train_detect.get_args(TINY + ["--out", str(tmp_path / "x"), "--tokenizer-cache", str(tmp_path / "tok"),
                                         "--lora-r", "4"])
    train_items, _, _, _ = train_detect.build_items(args)
    lora = lora_spec(args)
    model = train_detect.build_model(args, None, train_items, lora)[0]
    lrs = {g: getattr(args, f"lr_{g}") for g in train_detect.GROUP_PATTERNS}
    _, names = train_detect.param_groups(model, lrs, args.weight_decay)
    assert names["llm"] and all(".lora_A." in n or ".lora_B." in n for n in names["llm"])
    assert names["projector"] and names["vision"] and names["detection"] and names["adapter"]  # in full
    # every adapter is inside the one language model
    assert all(n.startswith("llava.language_model.") for n, _ in model.named_parameters() if "lora_" in n)


def test_qlora_with_fsdp_is_an_argparse_error(tmp_path):
    with pytest.raises(SystemExit):
        train_detect.get_args(TINY + ["--out", str(tmp_path / "x"), "--qlora", "--dist", "fsdp"])
