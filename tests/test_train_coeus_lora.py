"""train_coeus.py --model llama --init ... --lora-r / --qlora on tiny configs (CPU): the adapters learn on a
pretrained base (a last.pt of this script, or a Hugging Face folder), the run stops and resumes bit for bit,
the adapter folder and merged.pt are written, and wrong flags are one line."""
import json
import os

import pytest
import torch

import train_coeus
from tests.test_train_coeus import corpus_file, tiny_args, train_losses
from utils.checkpoint import load_checkpoint
from utils.load_model import load_model
from utils.metrics import read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

LORA = ("--model", "llama", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--lr", "1e-2")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(corpus, a briefly trained tiny Llama's last.pt): the pretrained base the adapters adapt."""
    tmp = tmp_path_factory.mktemp("base")
    data = corpus_file(tmp)
    train_coeus.main(tiny_args(data, tmp / "base", "--model", "llama", "--max-iters", "4", "--sample-tokens", "0"))
    return data, str(tmp / "base" / "last.pt")


@pytest.mark.parametrize("qlora", [False, True])
def test_lora_run_learns_and_resumes_bit_for_bit(base, tmp_path, qlora):
    data, init = base
    extra = (*LORA, "--init", init, *(("--qlora",) if qlora else ()))
    train_coeus.main(tiny_args(data, tmp_path / "a", *extra, "--merge-lora"))
    train_coeus.main(tiny_args(data, tmp_path / "b", *extra, "--stop-at", "4"))
    assert not (tmp_path / "b" / "adapter").exists()  # an interrupted run writes no adapter yet
    train_coeus.main(tiny_args(data, tmp_path / "b", *extra, "--resume", str(tmp_path / "b" / "last.pt")))
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert a == b and sorted(a) == list(range(8))  # bit for bit: adapter dropout, batches, optimizer restored
    assert min(a[6], a[7]) < a[0], a  # it learns
    val = [r["val_loss"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "val_loss" in r]
    assert val[-1] < val[0] - 0.03, val  # the fixed-batch val loss falls (steps 0, 4, 8)
    last = load_checkpoint(tmp_path / "a" / "last.pt", expect_kind="llama")
    assert last["lora"]["r"] == 4 and last["lora"]["qlora"] == qlora
    # the base never moved: the frozen weights are --init's
    start = load_checkpoint(init)["model"]
    key = "layers.0.mlp.down_proj"
    if qlora:
        assert f"{key}.base.weight_codes" in last["model"]
    else:
        assert torch.equal(last["model"][f"{key}.base.weight"], start[f"{key}.weight"])
    assert torch.equal(last["model"]["embed_tokens.weight"], start["embed_tokens.weight"])
    assert any(torch.any(v != 0) for k, v in last["model"].items() if ".lora_B." in k)

    cfg = json.load(open(tmp_path / "a" / "adapter" / "adapter_config.json"))
    assert cfg["r"] == 4 and cfg["base_model_name_or_path"] == init and not cfg["modules_to_save"]
    assert (tmp_path / "a" / "adapter" / "adapter_model.safetensors").is_file()
    merged = load_model(str(tmp_path / "a" / "merged.pt"))  # a plain llama checkpoint
    assert merged.kind == "llama" and not any("lora_" in k for k in merged.lm.model.state_dict())

    # a LoRA run's checkpoint is itself an --init (adapters folded in): the same weights as merged.pt
    model, _ = train_coeus.read_init(str(tmp_path / "a" / "last.pt"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), merged.lm.model(ids), rtol=0, atol=1e-5)
    # and generate.py reads it directly: adapters rebuilt (4-bit base too), loaded, merged
    direct = load_model(str(tmp_path / "a" / "last.pt"))
    with torch.no_grad():
        torch.testing.assert_close(direct.lm.model(ids), merged.lm.model(ids), rtol=0, atol=1e-5)

    # --resume with other LoRA flags: one clear line
    msg = run_error(tiny_args(data, tmp_path / "b", "--model", "llama", "--lora-r", "8", "--max-iters", "9",
                              "--resume", str(tmp_path / "b" / "last.pt")))
    assert "LoRA" in msg


def test_lora_on_a_hugging_face_folder(base, tmp_path):
    """--init an HF folder: its tokenizer encodes the data; merged_hf/ is written beside merged.pt."""
    from models.hf_weights import export_pretrained, load_pretrained
    from models.llama import Llama, llama_config
    from utils.tokenizer import SentencePieceTokenizer
    data, _ = base
    text = open(data).read()
    tok = SentencePieceTokenizer.train([text[i:i + 400] for i in range(0, len(text), 400)], 300, str(tmp_path / "spm"))
    folder = str(tmp_path / "hf")
    torch.manual_seed(0)
    export_pretrained(Llama(llama_config("tiny", vocab_size=tok.vocab_size)), folder)
    os.link(next((tmp_path / "spm").glob("*.model")), os.path.join(folder, "tokenizer.model"))
    train_coeus.main(tiny_args(data, tmp_path / "h", *LORA, "--init", folder, "--max-iters", "4", "--merge-lora"))
    for name in ("adapter/adapter_config.json", "merged.pt", "merged_hf/config.json", "merged_hf/tokenizer.model"):
        assert (tmp_path / "h" / name).exists(), name
    assert load_checkpoint(tmp_path / "h" / "last.pt")["tokenizer"]["kind"] == "sentencepiece"
    assert load_pretrained(str(tmp_path / "h" / "merged_hf")).config.vocab_size == tok.vocab_size


def run_error(argv):
    with pytest.raises(SystemExit) as e:
        train_coeus.main(argv)
    msg = str(e.value.code)
    assert "\n" not in msg
    return msg


def argparse_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train_coeus.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]  # argparse: usage, then one `error:` line


def test_lora_flag_errors(base, tmp_path, capsys):
    data, init = base
    assert "--model llama" in argparse_error(tiny_args(data, tmp_path / "x", "--lora-r", "4"), capsys)  # Coeus
    assert "--init" in argparse_error(tiny_args(data, tmp_path / "x", "--model", "llama", "--lora-r", "4"), capsys)
    assert "fsdp" in argparse_error(tiny_args(data, tmp_path / "x", *LORA, "--init", init, "--qlora", "--dist",
                                              "fsdp"), capsys)
    msg = run_error(tiny_args(data, tmp_path / "x", *LORA, "--init", str(tmp_path / "nope.pt")))
    assert msg.startswith("error: --init") and "not found" in msg
