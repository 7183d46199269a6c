"""train_vqa.py end to end on a tiny synthetic data set: exact resume, eval-only, cached greedy decoding,
stages, packing, skipped images and one-line errors."""
import json
import os
import random

import pytest
import torch
from PIL import Image, ImageDraw

import train_vqa
from models.llama import llama_config
from models.llava import LlavaConfig, LlavaModel
from models.vit import vision_config
from utils.checkpoint import load_checkpoint
from utils.decoding import greedy_generate
from utils.metrics import read_jsonl

COLORS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 160, 0)}


def make_dataset(root, n_images=12, missing=()):
    rng = random.Random(0)
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    entries = []
    for i in range(n_images):
        color, shape = rng.choice(list(COLORS)), rng.choice(["circle", "rectangle"])
        img = Image.new("RGB", (32, 32), (255, 255, 255))
        d = ImageDraw.Draw(img)
        (d.ellipse if shape == "circle" else d.rectangle)([6, 6, 26, 26], fill=COLORS[color])
        if i not in missing:
            img.save(os.path.join(img_dir, f"{i}.png"))
        for k, (q, a) in enumerate([("what color is the shape?", color), ("what is the shape?", shape),
                                    (f"is there a {color} shape?", "yes")]):
            entries.append({"id": f"{i}-{k}", "image": f"images/{i}.png",
                            "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
    return entries


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vqa"))
    entries = make_dataset(root)
    paths = {}
    for name, part in (("train", entries[:24]), ("val", entries[24:30]), ("test", entries[30:])):
        paths[name] = os.path.join(root, f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(part, f)
    paths["root"] = root
    return paths


def args_for(data, out, *extra):
    return ["--data", data["train"], "--val-data", data["val"], "--test-data", data["test"],
            "--image-folder", data["root"], "--data-dir", os.path.join(data["root"], "cache"), "--out", out,
            "--vision", "tiny", "--llm", "tiny", "--batch-size", "4", "--max-steps", "6", "--warmup", "2",
            "--log-every", "1", "--eval-every", "3", "--val-samples", "0", "--n-grid", "4", "--no-progress",
            "--lr", "3e-3", *extra]


def losses(out):
    return [(r["step"], r["loss"]) for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in r]


def test_stopped_and_resumed_run_logs_the_same_losses(data, tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train_vqa.main(args_for(data, full))
    train_vqa.main(args_for(data, split, "--stop-after", "4"))
    assert [s for s, _ in losses(split)] == [1, 2, 3, 4]
    train_vqa.main(args_for(data, split, "--resume"))
    assert len(losses(full)) == 6
    assert losses(split) == losses(full)  # bit-for-bit: model, optimizer, schedule and data order restored
    ckpt = load_checkpoint(os.path.join(full, "last.pt"), expect_kind="vqa")
    assert ckpt["step"] == 6 and LlavaConfig.from_dict(ckpt["model_config"]).text.n_layers == 2
    for key in ("optimizer", "rng", "tokenizer", "args", "image_processor", "template", "special_tokens"):
        assert key in ckpt
    assert {"scheduler", "perm", "best_acc", "epoch", "pos"} <= set(ckpt["train"])  # the script's own state
    for name in ("best.pt", "metrics.png", "samples.png", "eval.json"):
        assert os.path.exists(os.path.join(full, name)), name
    result = json.load(open(os.path.join(full, "eval.json")))
    assert result["counts"]["all"] == 6 and set(result["accuracy"]) >= {"all", "color", "shape", "yes/no"}

    # --eval-only re-reads best.pt and gives the same test accuracy
    os.remove(os.path.join(full, "eval.json"))
    train_vqa.main(args_for(data, full, "--eval-only"))
    assert json.load(open(os.path.join(full, "eval.json")))["accuracy"] == result["accuracy"]


def test_resume_with_another_config_is_one_clear_error(data, tmp_path):
    out = str(tmp_path / "run")
    train_vqa.main(args_for(data, out, "--max-steps", "2", "--eval-every", "0"))
    with pytest.raises(SystemExit, match=r"error: .*last.pt was written for another model config \(text"):
        train_vqa.cli(args_for(data, out, "--resume", "--max-len", "200"))


def test_pretrain_stage_moves_only_the_projector(data, tmp_path):
    out = str(tmp_path / "pre")
    train_vqa.main(args_for(data, out, "--max-steps", "2", "--stage", "pretrain", "--eval-every", "0"))
    torch.manual_seed(0)  # the init of the run (seed 0 is set first thing in main)
    trained = load_checkpoint(os.path.join(out, "last.pt"))["model"]
    cfg = LlavaConfig.from_dict(load_checkpoint(os.path.join(out, "last.pt"))["model_config"])
    init = LlavaModel(cfg).state_dict()
    for k, v in trained.items():
        assert torch.equal(v, init[k]) != k.startswith("projector."), k


def test_packed_strict_run_and_skipped_images(tmp_path, capsys):
    root = str(tmp_path)
    entries = make_dataset(root, n_images=6, missing={2})
    paths = {"root": root}
    for name in ("train", "val", "test"):
        paths[name] = os.path.join(root, f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(entries, f)
    out = str(tmp_path / "out")
    train_vqa.main(args_for(paths, out, "--pack", "--epochs", "1", "--max-steps", "5", "--eval-every", "0"))
    text = capsys.readouterr().out
    assert "epoch 1 done: 3 samples skipped (unreadable images)" in text
    assert "2.png" in text.split("epoch 1 done")[1].splitlines()[0]  # the skipped file is named
    assert "3 skipped (image not found: " in text  # the test split says so too
    assert any(r.get("epoch_skipped") == 3 and "2.png" in r["skipped_examples"][0] for r in read_jsonl(
        os.path.join(out, "metrics.jsonl")))
    with pytest.raises(SystemExit, match=r"error: image not found: .*images/2.png"):
        train_vqa.cli(args_for(paths, str(tmp_path / "strict"), "--strict", "--max-steps", "5"))


@pytest.mark.parametrize("bad, message", [
    ("[{", "not valid JSON"),
    ('[{"id": 3, "image": "images/0.png", "conversations": [{"from": "human", "value": "no tag"}, '
     '{"from": "gpt", "value": "x"}]}]', r"entry 0 \(id 3\): field 'conversations' holds 0 <image> tag"),
    ("[]", "empty"),
])
def test_bad_training_json_is_one_clear_error(data, tmp_path, bad, message):
    path = tmp_path / "bad.json"
    path.write_text(bad)
    argv = args_for(data, str(tmp_path / "o"))
    argv[1] = str(path)
    with pytest.raises(SystemExit, match=f"error: .*{message}"):
        train_vqa.cli(argv)


def test_cached_greedy_decoding_equals_recomputing_the_prefix():
    torch.manual_seed(0)
    cfg = LlavaConfig(vision=vision_config("tiny"), text=llama_config("tiny", vocab_size=64), image_token_id=60)
    model = LlavaModel(cfg).eval()
    n = model.num_image_tokens
    prompts = [[1] + [60] * n + [5, 9, 7], [1] + [60] * n + [3], [1] + [60] * n + [8, 8, 8, 8, 8, 2]]
    pixels = torch.randn(3, 3, 32, 32)
    eos, steps = 63, 7
    got = greedy_generate(model, prompts, pixels, eos_id=eos, pad_id=0, max_new_tokens=steps,
                          autocast=torch.autocast("cpu", enabled=False))
    for k, p in enumerate(prompts):  # reference: one prompt, no padding, no cache, full forward per token
        ids = torch.tensor([p])
        out = []
        with torch.no_grad():
            for _ in range(steps):
                nxt = int(model(ids, pixels[k:k + 1])[0, -1].argmax())
                if nxt == eos:
                    break
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert got[k] == out
    assert model.language_model.cache_len == 0  # the cache is released after generation


def test_llava_loss_equals_the_full_logits_loss():
    torch.manual_seed(0)
    cfg = LlavaConfig(vision=vision_config("tiny"), text=llama_config("tiny", vocab_size=64), image_token_id=60)
    model = LlavaModel(cfg).double()
    n = model.num_image_tokens
    ids = torch.randint(0, 59, (3, n + 12))
    ids[:, 1:n + 1] = 60
    labels = ids.clone()
    labels[:, :n + 4] = -100
    labels[2, -3:] = -100  # padding-like tail
    pixels = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    expected = model(ids, pixels, labels=labels)[1]
    got = model.loss(ids, pixels, labels)
    torch.testing.assert_close(got.float(), expected, rtol=1e-6, atol=1e-6)
    g1 = torch.autograd.grad(expected, model.projector.linear_1.weight)[0]
    g2 = torch.autograd.grad(model.loss(ids, pixels, labels), model.projector.linear_1.weight)[0]
    torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-7)


def test_init_from_hf_folders_grows_the_embedding(data, tmp_path):
    import shutil
    from models.hf_weights import export_pretrained
    from models.llama import Llama
    from models.vit import VisionTransformer
    from utils.tokenizer import SentencePieceTokenizer

    torch.manual_seed(1)
    llm_dir, vit_dir = str(tmp_path / "llm"), str(tmp_path / "vit")
    words = "what color is the shape red blue green circle rectangle yes no there a USER: ASSISTANT:".split()
    tok = SentencePieceTokenizer.train([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 3, 300,
                                       str(tmp_path / "spm"))  # no <image> piece: it must get a new id
    llm = Llama(llama_config("tiny", vocab_size=tok.vocab_size))
    export_pretrained(llm, llm_dir)
    shutil.copy(next((tmp_path / "spm").glob("*.model")), os.path.join(llm_dir, "tokenizer.model"))
    vit = VisionTransformer(vision_config("tiny"))
    export_pretrained(vit, vit_dir)
    out = str(tmp_path / "out")
    train_vqa.main(args_for(data, out, "--init-llm", llm_dir, "--init-vision", vit_dir, "--max-steps", "1",
                            "--stage", "pretrain", "--eval-every", "0"))
    ckpt = load_checkpoint(os.path.join(out, "last.pt"))
    cfg = LlavaConfig.from_dict(ckpt["model_config"])
    assert cfg.image_token_id == tok.vocab_size and cfg.text.vocab_size == tok.vocab_size + 1
    emb = ckpt["model"]["language_model.embed_tokens.weight"]
    assert torch.equal(emb[:tok.vocab_size], llm.embed_tokens.weight)  # pretrained rows kept, frozen in pretrain
    assert torch.equal(ckpt["model"]["vision_tower.blocks.0.mlp.fc1.weight"], vit.blocks[0].mlp.fc1.weight)
    assert ckpt["tokenizer"]["model_proto"] == tok.model_proto


def test_a_random_vit_trains_and_a_pretrained_one_stays_frozen_by_default():
    def rule(*argv):
        return train_vqa.train_vision(train_vqa.get_args(list(argv)))
    assert rule() and not rule("--init-vision", "x") and rule("--init-vision", "x", "--train-vision")
    assert not rule("--stage", "pretrain") and not rule("--freeze-vision")


def test_augmentation_defaults_on_for_easyvqa_only():
    assert train_vqa.get_args([]).augment == 3          # easy-VQA: no left/right or position questions
    assert train_vqa.get_args(["--data", "mine.json"]).augment == 0
    assert train_vqa.get_args(["--data", "mine.json", "--augment", "2"]).augment == 2


def write_json(path, entries):
    with open(path, "w") as f:
        json.dump(entries, f)
    return str(path)


def test_a_data_set_without_one_usable_sample_stops_instead_of_spinning(data, tmp_path):
    """Its only image missing, empty, truncated, not an image or a decompression bomb: one error naming why,
    after one epoch, instead of thousands of empty epochs rewriting last.pt."""
    from tests.bad_files import write_bad_images
    bad = write_bad_images(tmp_path / "images")
    for kind, path in bad.items():
        entry = {"id": kind, "image": os.path.basename(path),
                 "conversations": [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "red"}]}
        train = write_json(tmp_path / f"{kind}.json", [entry])
        argv = args_for(data, str(tmp_path / f"out-{kind}"), "--image-folder", str(tmp_path / "images"),
                        "--epochs", "50", "--max-steps", "0")
        argv[1] = train
        with pytest.raises(SystemExit) as e:
            train_vqa.cli(argv)
        msg = str(e.value)
        assert "epoch 1 had no usable sample: all 1 skipped" in msg and path.name in msg, (kind, msg)
        assert not os.path.exists(tmp_path / f"out-{kind}" / "last.pt")


def test_bombs_and_paths_outside_the_folder_are_counted_skips_or_strict_errors(tmp_path, capsys):
    from tests.bad_files import bomb_png_bytes
    root = str(tmp_path)
    entries = make_dataset(root, n_images=4)
    (tmp_path / "images" / "1.png").write_bytes(bomb_png_bytes())
    (tmp_path / "outside.png").write_bytes((tmp_path / "images" / "0.png").read_bytes())
    for e in entries:
        if e["image"] == "images/2.png":
            e["image"] = "../outside.png"
    paths = {"root": root, **{n: write_json(tmp_path / f"{n}.json", entries) for n in ("train", "val", "test")}}
    train_vqa.main(args_for(paths, str(tmp_path / "out"), "--epochs", "1", "--max-steps", "3", "--eval-every", "0"))
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("epoch 1 done"))
    assert line.startswith("epoch 1 done: 6 samples skipped (unreadable images): ")
    assert "decompression bomb" in line and "points outside its folder" in line
    strict = r"error: (cannot read image .*1.png \(decompression bomb|entry '2-\d': '../outside.png' points outside)"
    with pytest.raises(SystemExit, match=strict):  # whichever the epoch's order meets first
        train_vqa.cli(args_for(paths, str(tmp_path / "strict"), "--strict", "--max-steps", "2"))


def test_fresh_run_never_overwrites_and_first_sample_shown_once(data, tmp_path, capsys):
    try:  # the events file is checked where the tensorboard package is installed; the rest runs everywhere
        import tensorboard  # noqa: F401
        tb = ["--tensorboard", str(tmp_path / "tb")]
    except ImportError:
        tb = []
    out = str(tmp_path / "run")
    train_vqa.main(args_for(data, out, "--max-steps", "2", "--eval-every", "0", *tb))
    text = capsys.readouterr().out
    assert text.count("first training sample:") == 1 and "<image x" in text and "[[" in text
    if tb:
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    rows = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in r]
    assert {"gnorm_llm", "wnorm_llm", "gnorm_projector", "lr_llm"} <= set(rows[0])
    before = open(os.path.join(out, "last.pt"), "rb").read()
    with pytest.raises(SystemExit, match="already holds a run.*--resume.*--overwrite"):
        train_vqa.main(args_for(data, out, "--max-steps", "2"))
    assert open(os.path.join(out, "last.pt"), "rb").read() == before
    train_vqa.main(args_for(data, out, "--max-steps", "3", "--eval-every", "0", "--resume"))
    assert "first training sample:" not in capsys.readouterr().out  # once, on the fresh run only
