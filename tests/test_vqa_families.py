"""train_vqa.py on the model pairings researchers use, from Hugging Face folders that transformers writes:
SigLIP + Qwen2 (tokenizer.json, ChatML) and CLIP + Llama-3 (llama3 RoPE scaling, tokenizer.json, Llama-3
headers). Each trains a few steps, stops, resumes bit for bit, and its checkpoint answers through generate.py."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import generate  # noqa: E402
import train_detect  # noqa: E402
import train_vqa  # noqa: E402
from tests.test_tokenizers_hf import llama3_folder, qwen2_folder  # noqa: E402
from tests.test_train_vqa import args_for, data, losses  # noqa: E402,F401 (data is a fixture)
from utils.checkpoint import load_checkpoint  # noqa: E402
from utils.tokenizer import tokenizer_from_folder  # noqa: E402

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)


def decoder_folder(folder, family):
    """A random tiny decoder with its tokenizer, saved as transformers saves a published checkpoint."""
    (qwen2_folder if family == "qwen2" else llama3_folder)(folder)
    vocab = tokenizer_from_folder(folder).vocab_size
    torch.manual_seed(0)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(**TEXT, vocab_size=vocab, tie_word_embeddings=True,
                                       rope_parameters=dict(rope_type="default", rope_theta=1e6))
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        rope = dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT, vocab_size=vocab, rope_parameters=rope))
    model.save_pretrained(folder)
    return str(folder)


def vision_folder(folder, family):
    torch.manual_seed(1)
    if family == "siglip":
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION))
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION))
    model.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("vision, decoder, style, end_of_turn", [("siglip", "qwen2", "chatml", "<|im_end|>"),
                                                                ("clip", "llama", "llama3", "<|eot_id|>")])
def test_pairing_trains_resumes_and_generates(data, tmp_path, vision, decoder, style, end_of_turn, capsys):  # noqa: F811
    llm = decoder_folder(tmp_path / decoder, decoder)
    vit = vision_folder(tmp_path / vision, vision)
    common = ["--llm", llm, "--vision", vit, "--max-steps", "4", "--eval-every", "0", "--max-new-tokens", "4"]
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train_vqa.main(args_for(data, full, *common))
    text = capsys.readouterr().out
    learned = [line for line in text.splitlines() if line.startswith("[[")]
    assert len(learned) == 1 and learned[0].endswith(f"{end_of_turn}]]")  # the answer and its end of turn, only
    train_vqa.main(args_for(data, split, *common, "--stop-after", "2"))
    train_vqa.main(args_for(data, split, *common, "--resume"))
    assert losses(split) == losses(full) and len(losses(full)) == 4

    ckpt = load_checkpoint(os.path.join(full, "last.pt"), expect_kind="vqa")
    assert ckpt["template"]["style"] == style
    assert ckpt["model_config"]["vision"].get("family", "clip") == vision
    assert ckpt["image_processor"]["mean"] == ([0.5] * 3 if vision == "siglip" else ckpt["image_processor"]["mean"])
    image = os.path.join(data["root"], "images", "0.png")
    res = generate.main(["--ckpt", os.path.join(full, "best.pt" if os.path.exists(os.path.join(full, "best.pt"))
                                                 else "last.pt"),
                         "--image", image, "--prompt", "what color is the shape?", "--greedy", "--max-new-tokens", "4",
                         "--quiet"])
    assert res[0]["new_tokens"] >= 1

    # the detection head trains on the same pairing, started from that VQA checkpoint
    det = str(tmp_path / "detect")
    train_detect.main(["--init-vqa", os.path.join(full, "last.pt"), "--out", det, "--shapes-train", "8",
                       "--shapes-val", "4", "--batch-size", "4", "--max-steps", "2", "--hidden", "32",
                       "--num-queries", "4", "--caption-layers", "1", "--eval-every", "1000",
                       "--num-sample-images", "2", "--tokenizer-cache", str(tmp_path / "tok")])
    assert load_checkpoint(os.path.join(det, "last.pt"), expect_kind="detect")["template"]["style"] == style


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_generate_reads_the_folder_and_matches_transformers_greedy(tmp_path, family):
    folder = decoder_folder(tmp_path / family, family)
    res = generate.main(["--ckpt", folder, "--prompt", "The quick brown fox", "--greedy", "--max-new-tokens", "6",
                         "--ignore-eos", "--quiet", "--device", "cpu"])
    hf = (transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.LlamaForCausalLM).from_pretrained(folder)
    ids = tokenizer_from_folder(folder).encode("The quick brown fox")
    tok = tokenizer_from_folder(folder)
    if tok.bos_id is not None:
        ids = [tok.bos_id] + ids
    want = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, len(ids):]
    assert res[0]["token_ids"][0] == want.tolist()
