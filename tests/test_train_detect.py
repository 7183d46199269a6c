"""train_detect.py end to end on tiny configs: a run, exact resume, parameter groups, NaN guard, COCO input,
the monitoring (first sample shown once, TensorBoard); utils/detect_eval.py's matching."""
import json
import os

import pytest
import torch
from PIL import Image

import train_detect
from utils.coco import load_coco_detection
from utils.detect_eval import match_by_score
from utils.metrics import read_jsonl

TINY = ["--vision", "tiny", "--text", "tiny", "--image-size", "32", "--hidden", "32", "--num-queries", "4",
        "--caption-layers", "1", "--shapes-train", "8", "--shapes-val", "4", "--batch-size", "4",
        "--eval-every", "1000", "--num-sample-images", "2", "--log-every", "1", "--warmup-steps", "2"]


def run(tmp_path, name, *extra):
    out = str(tmp_path / name)
    res = train_detect.main(TINY + ["--out", out, "--tokenizer-cache", str(tmp_path / "tok")] + list(extra))
    return out, res


def test_tiny_run_then_exact_resume(tmp_path, capsys):
    out, res = run(tmp_path, "full", "--max-steps", "3")
    # the first training sample is shown once, its learned tokens (the answers) in [[...]]
    shown = capsys.readouterr().out
    assert shown.count("first training sample:") == 1 and "[[" in shown
    for f in ("last.pt", "best.pt", "metrics.jsonl", "metrics.png", "predictions.png", "eval.json"):
        assert os.path.exists(os.path.join(out, f)), f
    assert set(res) >= {"map", "map50", "caption_acc"} and 0 <= res["map50"] <= 1
    rows = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in r]
    for k in ("lm", "teacher_lm", "student_lm", "loss_obj", "loss_bbox", "loss_giou", "loss_caption",
              "gnorm_vision", "gnorm_detection", "gnorm_adapter", "lr_llm"):
        assert k in rows[0], k
    # student_lm and teacher_lm are token-weighted parts of lm
    r = rows[0]
    mix = (r["teacher_lm"] * r["n_teacher_tokens"] + r["student_lm"] * r["n_student_tokens"]) / \
        (r["n_teacher_tokens"] + r["n_student_tokens"])
    assert abs(mix - r["lm"]) < 1e-4 and r["n_teacher_tokens"] > 0 and r["n_student_tokens"] > 0
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ck["kind"] == "detect" and set(ck["model_config"]) == {"llava", "detection"}
    assert any(k.startswith("llava.vision_tower.") for k in ck["model"]) and any(k.startswith("head.") for k in ck["model"])

    # interrupted after 1 step (in the middle of epoch 0: 2 batches an epoch), then resumed across the epoch
    # boundary: the same weights as straight through
    part, none = run(tmp_path, "part", "--max-steps", "3", "--stop-after", "1")
    assert none is None
    capsys.readouterr()
    run(tmp_path, "part", "--max-steps", "3", "--resume", os.path.join(part, "last.pt"))
    assert "first training sample:" not in capsys.readouterr().out  # a resumed run goes on where it was
    a = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "last.pt"), weights_only=True)
    assert a["train"]["step"] == b["train"]["step"] == 3 and b["train"]["epoch"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    steps = [r["step"] for r in read_jsonl(os.path.join(part, "metrics.jsonl")) if "loss" in r]
    assert steps == sorted(set(steps))  # the log holds each step once after resuming


def test_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    run(tmp_path, "tb", "--max-steps", "1", "--tensorboard", str(tmp_path / "tb"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))


def test_param_groups_keyerror_and_freeze():
    model = torch.nn.Module()
    model.llava = torch.nn.Linear(2, 2)
    model.head = torch.nn.Module()
    model.head.vision_adapter = torch.nn.Linear(2, 2)
    model.head.box = torch.nn.Linear(2, 2)
    lrs = {g: 1e-3 for g in train_detect.GROUP_PATTERNS}
    with pytest.raises(KeyError, match=r"llava\.weight -> no group"):  # llava.weight is in none of the groups
        train_detect.param_groups(model, lrs, 0.0)
    patterns = dict(train_detect.GROUP_PATTERNS, projector=r"^llava\.", detection=r"^head\.")
    with pytest.raises(KeyError, match=r"head\.vision_adapter\.weight -> \['adapter', 'detection'\]"):
        train_detect.param_groups(model, lrs, 0.0, patterns)
    patterns = dict(train_detect.GROUP_PATTERNS, projector=r"^llava\.")
    groups, members = train_detect.param_groups(model, dict(lrs, adapter=0.0), 0.0, patterns)
    assert members["adapter"] == ["head.vision_adapter.weight", "head.vision_adapter.bias"]
    assert not model.head.vision_adapter.weight.requires_grad  # lr 0 freezes
    assert {g["group"] for g in groups} == {"projector", "detection"}


def test_real_model_params_each_in_one_group(tmp_path):
    from tests.test_detection import tiny_model
    model = tiny_model(40)
    _, members = train_detect.param_groups(model, {g: 1e-3 for g in train_detect.GROUP_PATTERNS}, 0.0)
    assert all(members[g] for g in train_detect.GROUP_PATTERNS)
    assert sum(len(v) for v in members.values()) == len(list(model.parameters()))


def test_nan_guard_skips_lowers_lr_and_restores(tmp_path):
    out, _ = run(tmp_path, "nan", "--max-steps", "5", "--inject-nan-steps", "1,2,3", "--nan-patience", "3",
                 "--nan-lr-factor", "0.5")
    events = read_jsonl(os.path.join(out, "events.jsonl"))
    assert [e["event"] for e in events] == ["nonfinite_skip"] * 3 + ["restore_good_state"]
    assert [e["lr_scale"] for e in events[:3]] == [0.5, 0.25, 0.125]
    assert events[3]["restored_step"] <= 1
    rows = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 5] and rows[-1]["lr_scale"] == 0.125
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def write_coco(tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i, (w, h) in enumerate([(40, 32), (32, 32), (24, 40)]):
        Image.new("RGB", (w, h), (i * 60, 100, 50)).save(img_dir / f"{i}.png")
    data = {
        "images": [{"id": 10, "file_name": "0.png", "width": 40, "height": 32},
                   {"id": 11, "file_name": "1.png", "width": 32, "height": 32},   # no objects: valid
                   {"id": 12, "file_name": "2.png", "width": 24, "height": 40}],
        "categories": [{"id": 1, "name": "red circle"}, {"id": 2, "name": "blue square"}],
        "annotations": [
            {"id": 1, "image_id": 10, "bbox": [2, 3, 10, 12], "category_id": 1},
            {"id": 2, "image_id": 10, "bbox": [20, 4, 10, 10], "caption": "green thing"},
            {"id": 3, "image_id": 12, "bbox": [1, 1, 20, 30], "category_id": 2},
            {"id": 4, "image_id": 12, "bbox": [10, 30, 20, 20], "category_id": 2},  # outside the 24x40 image
            {"id": 5, "image_id": 12, "bbox": [1, 1, 0, 5], "category_id": 2},      # zero width
            {"id": 6, "image_id": 12, "bbox": [1, 1, 5, -2], "category_id": 1},     # negative height
            {"id": 7, "image_id": 99, "bbox": [1, 1, 5, 5], "category_id": 1},      # unknown image
        ]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return str(path), str(img_dir)


def test_coco_bad_input_counted_or_strict(tmp_path):
    path, img_dir = write_coco(tmp_path)
    records, stats = load_coco_detection(path)
    assert [len(r["boxes"]) for r in records] == [2, 0, 1]
    assert records[0]["captions"] == ["red circle", "green thing"]
    assert records[0]["boxes"][0] == [2.0, 3.0, 12.0, 15.0]
    assert stats["skipped_outside"] == 1 and stats["skipped_bad_box"] == 2
    assert stats["skipped_unknown_image"] == 1 and stats["images_without_objects"] == 1
    assert len(stats["skipped_examples"]) == 4 and "annotation #3 (id 4) box" in stats["skipped_examples"][0]
    with pytest.raises(ValueError, match=r"annotation #3 \(id 4\).*outside"):
        load_coco_detection(path, strict=True)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_coco_detection(str(bad))
    with pytest.raises(SystemExit, match="error: .*outside"):
        train_detect.main(TINY + ["--out", str(tmp_path / "x"), "--train-json", path, "--train-images", img_dir,
                                  "--strict", "--tokenizer-cache", str(tmp_path / "tok")])


def test_tiny_run_on_coco_with_detection_freeze(tmp_path):
    path, img_dir = write_coco(tmp_path)
    out, res = run(tmp_path, "coco", "--train-json", path, "--train-images", img_dir, "--batch-size", "3",
                   "--max-steps", "2", "--vocab-size", "300", "--detection-freeze-epochs", "1",
                   "--pack", "--dtype", "bfloat16")  # also the packed collator and the autocast path
    assert res["n_val_images"] == 3 and 0 <= res["map"] <= 1
    # one step an epoch: step 1 (epoch 0) has the head frozen, step 2 (epoch 1) trains it
    first, second = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in r]
    assert first["lr_detection"] == first["lr_adapter"] == 0 and first.get("gnorm_detection", 0.0) == 0
    assert first["lr_llm"] > 0 and first["gnorm_vision"] > 0
    assert second["lr_detection"] > 0 and second["gnorm_detection"] > 0 and second["gnorm_adapter"] > 0


def test_init_from_vqa_checkpoint_with_frozen_vqa_groups(tmp_path):
    from models.llama import LlamaConfig
    from models.llava import LlavaConfig, LlavaModel
    from models.vit import vision_config
    from utils.chat import ChatTemplate
    from utils.checkpoint import save_atomic
    from utils.image_processing import ImageProcessor
    from utils.tokenizer import SentencePieceTokenizer
    tok = SentencePieceTokenizer.train(train_detect.shapes_texts(), 300, str(tmp_path / "tok"))
    n = tok.vocab_size
    cfg = LlavaConfig(vision=vision_config("tiny", image_size=32),
                      text=LlamaConfig(vocab_size=n + 1, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                       max_seq_len=512), image_token_id=n)
    vqa = LlavaModel(cfg)
    path = str(tmp_path / "vqa.pt")
    save_atomic({"kind": "vqa", "model_config": cfg.to_dict(), "model": vqa.state_dict(), "tokenizer": tok.to_dict(),
                 "special_tokens": {"image": n, "pad": tok.pad_id}, "template": ChatTemplate().to_dict(),
                 "image_processor": ImageProcessor(32, pad_to_square=True).to_dict()}, path)
    frozen = ["--lr-vision", "0", "--lr-projector", "0", "--lr-llm", "0"]
    out, _ = run(tmp_path, "from_vqa", "--init-vqa", path, "--max-steps", "1", *frozen)
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ck["model_config"]["llava"] == cfg.to_dict()
    for k, v in vqa.state_dict().items():  # loaded, and frozen by lr 0
        assert torch.equal(ck["model"]["llava." + k], v), k
    with pytest.raises(SystemExit, match="holds a 'detect' model, expected vqa"):
        run(tmp_path, "wrong", "--init-vqa", os.path.join(out, "last.pt"), "--max-steps", "1")
    # weights that do not fit the config the checkpoint states: one line naming the keys
    bad = str(tmp_path / "bad_vqa.pt")
    sd = dict(vqa.state_dict(), extra=torch.zeros(1))
    sd["projector.linear_1.weight"] = sd["projector.linear_1.weight"][:, :1]
    save_atomic(dict(torch.load(path, weights_only=True), model=sd), bad)
    with pytest.raises(SystemExit, match=r"error: --init-vqa .*bad_vqa.pt does not fit LlavaModel: unexpected \(1\): "
                                         r"extra; mis-shaped, checkpoint vs model \(1\): projector.linear_1.weight"):
        run(tmp_path, "bad", "--init-vqa", bad, "--max-steps", "1")


def test_missing_and_corrupt_images_end_in_one_message(tmp_path):
    path, img_dir = write_coco(tmp_path)
    os.remove(os.path.join(img_dir, "1.png"))
    with pytest.raises(SystemExit, match=r"error: 1 image\(s\) of .*ann.json not found in .*: 1.png"):
        run(tmp_path, "missing", "--train-json", path, "--train-images", img_dir)
    with open(os.path.join(img_dir, "1.png"), "wb") as f:
        f.write(b"not a png")
    with pytest.raises(SystemExit, match=r"error: cannot read image .*1.png"):
        run(tmp_path, "corrupt", "--train-json", path, "--train-images", img_dir, "--batch-size", "3",
            "--max-steps", "1", "--vocab-size", "300")


def test_match_by_score_is_greedy_by_score():
    gt = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30.]])
    det = torch.tensor([[0, 0, 10, 9], [0, 0, 10, 10], [21, 21, 30, 30], [50, 50, 60, 60.]])
    # the higher-scoring of two overlapping detections takes the target, even with a lower IoU
    pairs = match_by_score(gt, det, torch.tensor([0.9, 0.8, 0.7, 0.95]))
    assert sorted(pairs) == [(0, 0), (1, 2)]
    assert match_by_score(gt, det[3:], torch.tensor([0.9])) == []
    assert match_by_score(gt[:0], det, torch.rand(4)) == []


def test_coco_paths_outside_the_folder_and_bombs_are_refused(tmp_path):
    from tests.bad_files import bomb_png_bytes
    path, img_dir = write_coco(tmp_path)
    data = json.loads(open(path).read())
    (tmp_path / "secret.png").write_bytes(open(os.path.join(img_dir, "0.png"), "rb").read())
    data["images"][1]["file_name"] = "../secret.png"
    escaping = tmp_path / "escape.json"
    escaping.write_text(json.dumps(data))
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "escape", "--train-json", str(escaping), "--train-images", img_dir)
    msg = str(e.value)
    assert "escape.json: image 11" in msg and "'../secret.png' points outside its folder" in msg
    with open(os.path.join(img_dir, "1.png"), "wb") as f:
        f.write(bomb_png_bytes())
    with pytest.raises(SystemExit, match=r"error: cannot read image .*1.png \(decompression bomb"):
        run(tmp_path, "bomb", "--train-json", path, "--train-images", img_dir, "--batch-size", "3",
            "--max-steps", "1", "--vocab-size", "300")


def test_a_fresh_run_never_overwrites_another(tmp_path):
    out, _ = run(tmp_path, "a", "--max-steps", "1")
    before = open(os.path.join(out, "last.pt"), "rb").read()
    with pytest.raises(SystemExit, match="already holds a run.*--resume.*--overwrite"):
        run(tmp_path, "a", "--max-steps", "1")
    assert open(os.path.join(out, "last.pt"), "rb").read() == before
    open(os.path.join(out, ".tmp-killed.pt"), "wb").write(b"half")
    run(tmp_path, "a", "--max-steps", "1", "--overwrite")
    assert not os.path.exists(os.path.join(out, ".tmp-killed.pt"))
