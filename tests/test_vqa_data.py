"""CLIP preprocessing against transformers', LLaVA JSON validation, lazy images that skip or raise,
and the easy-VQA conversion (on a synthetic wheel: no network)."""
import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from utils import vqa_data
from utils.chat import PadCollator
from utils.image_processing import CLIP_MEAN, FlipShift, ImageProcessor, expand_to_square, to_rgb
from utils.vqa_data import DataError, VQADataset, load_conversations, prepare_easy_vqa, question_type


def test_matches_transformers_clip_processor():
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    ref = cls(size={"shortest_edge": 48}, crop_size={"height": 40, "width": 40})
    ours = ImageProcessor(size=48, crop_size=40)
    rng = np.random.default_rng(0)
    for w, h in [(64, 64), (90, 50), (37, 81), (48, 48)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        expected = torch.as_tensor(np.asarray(ref(img, return_tensors="np")["pixel_values"][0]))
        torch.testing.assert_close(ours(img), expected.float(), rtol=0, atol=1e-5)


def test_pad_to_square_is_llava_expand2square():
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    sq = expand_to_square(img, tuple(int(m * 255) for m in CLIP_MEAN))
    a = np.asarray(sq)
    assert sq.size == (30, 30)
    assert (a[10:20] == [255, 0, 0]).all()                                      # image in the middle
    assert (a[:10] == [int(m * 255) for m in CLIP_MEAN]).all() and (a[20:] == a[0, 0]).all()  # mean colour
    x = ImageProcessor(16, pad_to_square=True)(img)
    assert x.shape == (3, 16, 16)
    assert x[:, 0].abs().max() < 0.02  # the padding normalises to ~0


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16", "1", "CMYK"])
def test_any_mode_becomes_rgb(mode):
    base = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    img = base.convert(mode) if mode not in ("I;16",) else Image.fromarray(
        np.random.default_rng(2).integers(0, 65535, (20, 24), dtype=np.uint16))
    x = ImageProcessor(16)(img)
    assert x.shape == (3, 16, 16) and torch.isfinite(x).all()


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(to_rgb(img)).min() == 255


def test_question_types():
    assert [question_type(a) for a in ("yes", "No", "teal", "triangle", "two")] == \
        ["yes/no", "yes/no", "color", "shape", "other"]


# --- LLaVA JSON --------------------------------------------------------------------------------------------

def write(tmp_path, obj, name="data.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


def entry(i, image="a.png", q="<image>\nwhat?", a="red"):
    e = {"id": i, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if image is not None:
        e["image"] = image
    return e


@pytest.mark.parametrize("data, message", [
    ('[{"id": 1, "conversations": [}]', r"not valid JSON .* line 1 column"),
    ([], "empty"),
    ({"a": 1}, "expected a JSON list"),
    ([entry(0), entry(1, image=None)], r"entry 1 \(id 1\): field 'conversations' holds 1 <image> tag\(s\) but 'image' names 0"),
    ([entry(0, image=["a.png", "b.png"])], r"entry 0 .*holds 1 <image> tag\(s\) but 'image' names 2"),
    ([entry(0, q="what?", a="<image>")], r"entry 0 \(id 0\): field 'conversations\[1\].value' holds <image> outside"),
    ([entry(0), {"id": "x", "image": "a.png"}], r"entry 1 \(id 'x'\): field 'conversations' is missing"),
    ([{"id": 7, "image": "a.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "bot", "value": "x"}]}],
     r"entry 0 \(id 7\): field 'conversations\[1\].from' must be human/gpt/system"),
    ([{"id": 7, "conversations": [{"from": "human", "value": 3}]}], r"field 'conversations\[0\].value' must be a string"),
    ([{"id": 7, "conversations": [{"from": "human", "value": "hi"}]}], r"has no gpt"),
    ([{"id": 7, "image": 5, "conversations": [{"from": "human", "value": "hi"}]}], r"field 'image' must be a path"),
    (["just a string"], r"entry 0: expected an object"),
])
def test_bad_json_gets_one_clear_line(tmp_path, data, message):
    (tmp_path / "img").mkdir()
    with pytest.raises(DataError, match=message) as e:
        load_conversations(write(tmp_path, data), str(tmp_path / "img"))
    assert "\n" not in str(e.value)


def test_missing_file_and_image_folder(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_conversations(str(tmp_path / "nope.json"), str(tmp_path))
    with pytest.raises(DataError, match="image folder not found: .*nope"):
        load_conversations(write(tmp_path, [entry(0)]), str(tmp_path / "nope"))


def test_list_of_images_and_text_only_entries(tmp_path):
    data = [entry(0, image=["a.png", "b.png"], q="<image> and <image>?"), entry(1, image=None, q="hi")]
    entries = load_conversations(write(tmp_path, data), str(tmp_path))
    assert [e["images"] for e in entries] == [["a.png", "b.png"], []]


def make_images(folder):
    os.makedirs(folder, exist_ok=True)
    Image.new("RGB", (20, 30), (255, 0, 0)).save(os.path.join(folder, "good.png"))
    Image.new("L", (16, 16), 128).save(os.path.join(folder, "gray.png"))
    with open(os.path.join(folder, "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not a png")
    with open(os.path.join(folder, "good.png"), "rb") as f:
        head = f.read()
    with open(os.path.join(folder, "truncated.png"), "wb") as f:
        f.write(head[: len(head) // 2])


def encode_stub(e):
    return dict(input_ids=[1, 2, 3], labels=[-100, 2, 3], turn_ids=[-1, 0, 0], n_images=len(e["images"]),
                truncated=False)


def test_unreadable_images_are_skipped_and_counted_or_raise_under_strict(tmp_path):
    folder = str(tmp_path / "img")
    make_images(folder)
    names = ["good.png", "missing.png", "corrupt.png", "gray.png", "truncated.png"]
    entries = load_conversations(write(tmp_path, [entry(i, image=n) for i, n in enumerate(names)]), folder)
    ds = VQADataset(entries, folder, ImageProcessor(16), encode_stub)
    samples = [ds[i] for i in range(len(ds))]
    assert ["skipped" in s for s in samples] == [False, True, True, False, True]  # skipped: named, with a reason
    assert samples[0]["pixel_values"].shape == (1, 3, 16, 16) and samples[3]["pixel_values"].shape == (1, 3, 16, 16)
    assert len(ds.skipped) == 3 and ds.skipped[0].startswith("image not found: ") and ds.skipped[0].endswith("missing.png")
    batch = PadCollator(0)(samples)
    assert batch["n_skipped"] == 3 and batch["n_samples"] == 2 and batch["pixel_values"].shape[0] == 2
    assert batch["skipped"] == [samples[i]["skipped"] for i in (1, 2, 4)]
    strict = VQADataset(entries, folder, ImageProcessor(16), encode_stub, strict=True)
    for i, name in [(1, "image not found: .*missing.png"), (2, "cannot read image .*corrupt.png"),
                    (4, "cannot read image .*truncated.png")]:
        with pytest.raises(DataError, match=name):
            strict[i]


def test_images_open_lazily(tmp_path):
    folder = str(tmp_path / "img")
    make_images(folder)
    entries = load_conversations(write(tmp_path, [entry(0, image="good.png")]), folder)
    ds = VQADataset(entries, folder, ImageProcessor(16), encode_stub)
    os.remove(os.path.join(folder, "good.png"))  # gone after construction: only __getitem__ notices
    assert ds[0]["skipped"].startswith("image not found: ")



def flip_shift_reference(x, flip, dy, dx):
    """Pixel by pixel: out[c, i, j] = (mirrored x)[c, clamp(i - dy), clamp(j - dx)]."""
    c, h, w = x.shape
    src = x.flip(-1) if flip else x
    out = torch.empty_like(x)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = src[:, min(max(i - dy, 0), h - 1), min(max(j - dx, 0), w - 1)]
    return out


def test_flip_shift_moves_content_and_repeats_the_border():
    x = torch.randn(3, 7, 9)
    assert torch.equal(FlipShift(p_flip=1.0)(x, 0), x.flip(-1))
    assert torch.equal(FlipShift(p_flip=0.0)(x, 0), x)
    aug, seen = FlipShift(p_flip=0.5, max_shift=2), set()
    for key in range(40):
        y = aug(x, key)
        assert torch.equal(y, aug(x, key))  # deterministic in the key
        # recover the drawn (flip, dy, dx) by matching the reference; exactly one must match
        hits = [(f, dy, dx) for f in (False, True) for dy in range(-2, 3) for dx in range(-2, 3)
                if torch.equal(y, flip_shift_reference(x, f, dy, dx))]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) > 10 and {f for f, _, _ in seen} == {False, True}


def test_dataset_augments_only_when_asked_and_differently_per_epoch(tmp_path):
    folder = str(tmp_path / "img")
    os.makedirs(folder)
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(
        os.path.join(folder, "a.png"))
    entries = load_conversations(write(tmp_path, [entry(0, image="a.png")]), folder)
    plain = VQADataset(entries, folder, ImageProcessor(16), encode_stub)[0]["pixel_values"]
    ds = VQADataset(entries, folder, ImageProcessor(16), encode_stub, augment=FlipShift(0.5, 3))
    by_epoch = []
    for epoch in range(8):
        ds.epoch = epoch
        by_epoch.append(ds[0]["pixel_values"])
        assert torch.equal(by_epoch[-1], ds[0]["pixel_values"])
    assert any(not torch.equal(a, plain) for a in by_epoch)
    assert len({tuple(a.flatten().tolist()) for a in by_epoch}) > 1


# --- easy-VQA conversion (synthetic wheel with the real layout) -----------------------------------------

def fake_wheel(path):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 0, 255)).save(buf, format="PNG")
    png = buf.getvalue()
    train_q = [[f"what color is shape {i}?", "blue", i] for i in range(10)] + \
              [[f"is there a circle {i}?", "no", i] for i in range(10)]
    test_q = [["what shape is it?", "circle", i] for i in range(3)]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("easy_vqa/data/train/questions.json", json.dumps(train_q))
        z.writestr("easy_vqa/data/test/questions.json", json.dumps(test_q))
        for i in range(10):
            z.writestr(f"easy_vqa/data/train/images/{i}.png", png)
        for i in range(3):
            z.writestr(f"easy_vqa/data/test/images/{i}.png", png)


def test_prepare_easy_vqa_from_wheel(tmp_path, monkeypatch):
    wheel = tmp_path / vqa_data.EASY_VQA_WHEEL
    fake_wheel(wheel)
    with pytest.raises(DataError, match="sha256 .* does not match"):
        prepare_easy_vqa(str(tmp_path), val_images=2, quiet=True)
    monkeypatch.setattr(vqa_data, "EASY_VQA_SHA256", vqa_data.sha256_of(wheel))
    root = prepare_easy_vqa(str(tmp_path), val_images=2, quiet=True)
    train = load_conversations(os.path.join(root, "train.json"), root)
    val = load_conversations(os.path.join(root, "val.json"), root)
    test = load_conversations(os.path.join(root, "test.json"), root)
    dialogs = load_conversations(os.path.join(root, "train_dialogs.json"), root)
    assert (len(train), len(val), len(test), len(dialogs)) == (16, 4, 3, 8)
    assert not {e["image"] for e in train} & {e["image"] for e in val}  # val images are held out
    assert train[0]["conversations"][1]["value"] == "blue" and train[0]["question_type"] == "color"
    assert all(len(d["conversations"]) == 4 and d["conversations"][0]["value"].startswith("<image>\n") for d in dialogs)
    assert Image.open(os.path.join(root, test[0]["image"])).size == (64, 64)
