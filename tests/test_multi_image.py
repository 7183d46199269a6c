"""Several images per conversation (issue #21, part 1): loading and validation, collation (pixel order, placeholder
runs, labels), packing of mixed 1- and 2-image samples, truncation that never cuts an image, skipped images,
train_vqa.py training / exact resume / --eval-only on a multi-image JSON, the grid, and generate.py with two --image
flags (cached greedy = full recompute)."""
import json
import os
import random
import re

import pytest
import torch
from PIL import Image, ImageDraw

import generate
import train_vqa
from tests.test_train_vqa import args_for, losses  # the same tiny run flags
from models.llama import llama_config
from models.llava import LlavaConfig, LlavaModel
from models.vit import vision_config
from utils.chat import IGNORE, ChatTemplate, PackCollator, PadCollator, answer_spans
from utils.data_files import open_image
from utils.decoding import Session, greedy_generate
from utils.image_processing import ImageProcessor
from utils.load_model import load_model
from utils.sampling import SamplerConfig
from utils.tokenizer import SentencePieceTokenizer
from utils.vqa_data import DataError, Encoder, VQADataset, load_conversations
from utils.vqa_eval import evaluate, save_grid, side_by_side

COLORS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 160, 0)}
N_TINY = 16  # image tokens of the "tiny" ViT (32 px, 8 px patches)


def draw(path, color, shape):
    img = Image.new("RGB", (32, 32), (255, 255, 255))
    d = ImageDraw.Draw(img)
    (d.ellipse if shape == "circle" else d.rectangle)([6, 6, 26, 26], fill=COLORS[color])
    img.save(path)


def human_gpt(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def make_dataset(root, n_images=8):
    """n_images drawn shapes; per image a 1-image question, and per consecutive pair 2-image questions (tags on
    their own lines and inline)."""
    rng = random.Random(0)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    facts = []
    for i in range(n_images):
        color, shape = rng.choice(list(COLORS)), rng.choice(["circle", "rectangle"])
        draw(os.path.join(root, "images", f"{i}.png"), color, shape)
        facts.append((color, shape))
    entries = []
    for i in range(n_images):
        j = (i + 1) % n_images
        entries.append({"id": f"one-{i}", "image": f"images/{i}.png",
                        "conversations": human_gpt("<image>\nwhat color is the shape?", facts[i][0])})
        entries.append({"id": f"two-{i}", "image": [f"images/{i}.png", f"images/{j}.png"],
                        "conversations": human_gpt("<image>\n<image>\nwhat color is the second shape?", facts[j][0])})
        entries.append({"id": f"pair-{i}", "image": [f"images/{i}.png", f"images/{j}.png"],
                        "conversations": human_gpt("first <image> then <image>: what is the first shape?",
                                                   facts[i][1])})
    return entries


def write_json(path, entries):
    with open(path, "w") as f:
        json.dump(entries, f)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("multi"))
    entries = make_dataset(root)
    paths = {"root": root, "entries": entries}
    for name, part in (("train", entries[:18]), ("val", entries[18:21]), ("test", entries[18:])):
        paths[name] = write_json(os.path.join(root, f"{name}.json"), part)
    return paths


@pytest.fixture(scope="module")
def tok(tmp_path_factory, data):
    texts = [t["value"].replace("<image>", " ") for e in data["entries"] for t in e["conversations"]]
    return SentencePieceTokenizer.train(texts * 3 + ["USER: ASSISTANT:"], 300, tmp_path_factory.mktemp("spm"),
                                        user_defined_symbols=["<image>"])


def dataset(data, tok, entries=None, max_len=256, strict=False, prompt_only=False, n=N_TINY):
    entries = entries if entries is not None else load_conversations(data["train"], data["root"])
    enc = Encoder(tok, tok.token_id("<image>"), n, max_len, ChatTemplate(), strict, prompt_only=prompt_only)
    return VQADataset(entries, data["root"], ImageProcessor(32), enc, strict)


def runs(ids, image_id, n=N_TINY):
    """[(start, end)] of each image's placeholders in one row: runs of image_id, split every n (the images of
    adjacent tags touch)."""
    out, start = [], None
    for t, i in enumerate(list(ids) + [None]):
        if i == image_id and start is None:
            start = t
        elif i != image_id and start is not None:
            assert (t - start) % n == 0, (start, t)
            out += [(a, a + n) for a in range(start, t, n)]
            start = None
    return out


# --- data and collation --------------------------------------------------------------------------------------

def test_two_image_conversations_load_and_collate_in_placeholder_order(data, tok):
    img = tok.token_id("<image>")
    entries = load_conversations(data["train"], data["root"])
    assert [len(e["images"]) for e in entries[:3]] == [1, 2, 2]
    ds = dataset(data, tok, entries)
    samples = [ds[k] for k in range(6)]
    proc = ImageProcessor(32)
    for e, s in zip(entries, samples):  # each sample's images, in the order of its paths
        want = torch.stack([proc(open_image(os.path.join(data["root"], p))) for p in e["images"]])
        assert torch.equal(s["pixel_values"], want) and s["n_images"] == len(e["images"])
        assert [b - a for a, b in runs(s["input_ids"], img)] == [N_TINY] * len(e["images"])
    b = PadCollator(tok.pad_id)(samples)
    assert b["n_images"] == [1, 2, 2, 1, 2, 2] and b["pixel_values"].shape == (10, 3, 32, 32)
    assert torch.equal(b["pixel_values"], torch.cat([s["pixel_values"] for s in samples]))  # sample-major
    for k, s in enumerate(samples):
        row = b["input_ids"][k]
        assert int((row == img).sum()) == N_TINY * s["n_images"]
        learned = [int(t) for t in b["labels"][k] if t != IGNORE]
        assert learned[-1] == tok.eos_id and tok.decode(learned[:-1]) == entries[k]["conversations"][1]["value"]
        assert tok.decode(answer_spans(s)[0][:-1]) == entries[k]["conversations"][1]["value"]
    # the model puts image j's features on the j-th run, read row-major over the batch
    torch.manual_seed(0)
    model = LlavaModel(LlavaConfig(vision=vision_config("tiny"), text=llama_config("tiny", vocab_size=tok.vocab_size),
                                   image_token_id=img)).eval()
    with torch.no_grad():
        emb = model.embed(b["input_ids"], b["pixel_values"])
        feats = model.image_features(b["pixel_values"])
    spans = [(r, a, e) for r in range(len(samples)) for a, e in runs(b["input_ids"][r], img)]
    assert len(spans) == 10
    for j, (r, a, e) in enumerate(spans):
        torch.testing.assert_close(emb[r, a:e], feats[j])


@pytest.mark.parametrize("image, q, a, message", [
    (["a.png", "b.png"], "<image>\nwhich?", "x", r"entry 0 \(id 'bad'\): field 'conversations' holds 1 <image> tag\(s\) "
                                                  r"but 'image' names 2 image\(s\)"),
    ("a.png", "<image> and <image>?", "x", r"\(id 'bad'\): .*holds 2 <image> tag\(s\) but 'image' names 1"),
    ("a.png", "no tag", "x", r"\(id 'bad'\): .*holds 0 <image> tag\(s\) but 'image' names 1"),  # as before
    (["a.png", "b.png"], "<image> which?", "the <image>", r"\(id 'bad'\): field 'conversations\[1\].value' holds "
                                                          r"<image> outside a human turn"),
])
def test_a_tag_count_that_differs_from_the_images_names_the_entry(tmp_path, image, q, a, message):
    path = write_json(tmp_path / "bad.json", [{"id": "bad", "image": image, "conversations": human_gpt(q, a)}])
    with pytest.raises(DataError, match=message) as e:
        load_conversations(path, str(tmp_path))
    assert "\n" not in str(e.value)
    argv = ["--data", path, "--image-folder", str(tmp_path), "--out", str(tmp_path / "o"), "--vision", "tiny",
            "--llm", "tiny", "--data-dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit, match="error: .*id 'bad'"):  # the script: the same line, not a traceback
        train_vqa.cli(argv)


def test_packing_mixed_one_and_two_image_samples(data, tok):
    img = tok.token_id("<image>")
    ds = dataset(data, tok)
    samples = [ds[k] for k in range(9)]
    for k, s in enumerate(samples):  # tag every image with (sample, image index)
        s["pixel_values"] = torch.stack([torch.full((3, 32, 32), 10.0 * k + j) for j in range(s["n_images"])])
    b = PackCollator(tok.pad_id, max_len=140)(samples)  # first fit sends later short samples to earlier rows
    packed_order = [k for k, _ in sorted(enumerate(b["sample_rows"]), key=lambda x: x[1][:2])]
    assert b["input_ids"].shape[0] < len(samples) and packed_order != sorted(packed_order)
    # the j-th run of placeholders, read row-major, is the j-th image of pixel_values
    owner = {}
    for k, (r, start, end) in enumerate(b["sample_rows"]):
        for j, (a, e) in enumerate(runs(b["input_ids"][r, start:end], img)):
            owner[(r, start + a)] = 10 * k + j
            assert e - a == N_TINY
    order = [owner[(r, a)] for r in range(b["input_ids"].shape[0]) for a, _ in runs(b["input_ids"][r], img)]
    assert [int(p[0, 0, 0]) for p in b["pixel_values"]] == order and len(order) == 1 * 3 + 2 * 6
    # and the packed loss equals the padded one (the images land where they belong in both)
    torch.manual_seed(0)
    model = LlavaModel(LlavaConfig(vision=vision_config("tiny"), text=llama_config("tiny", vocab_size=tok.vocab_size),
                                   image_token_id=img)).double().eval()
    g = torch.Generator().manual_seed(0)
    for s in samples:
        s["pixel_values"] = torch.randn(s["n_images"], 3, 32, 32, generator=g, dtype=torch.float64)
    pad, pack = PadCollator(tok.pad_id)(samples), PackCollator(tok.pad_id, max_len=140)(samples)
    with torch.no_grad():
        loss_pad = model.loss(pad["input_ids"], pad["pixel_values"], pad["labels"])
        loss_pack = model.loss(pack["input_ids"], pack["pixel_values"], pack["labels"], pack["attention_mask"],
                               pack["position_ids"])
    torch.testing.assert_close(loss_pack, loss_pad, rtol=1e-10, atol=1e-10)


def test_truncation_keeps_every_image_whole_or_skips_the_sample(data, tok):
    img = tok.token_id("<image>")
    long_q = "<image> then <image>: " + " ".join(["what color is the second shape"] * 12)
    entries = [{"id": "long", "images": [f"images/{i}.png" for i in (0, 1)], "conversations": human_gpt(long_q, "red")}]
    full = dataset(data, tok, entries, max_len=10_000)[0]
    s = dataset(data, tok, entries, max_len=60)[0]
    assert len(full["input_ids"]) > 60 and s["truncated"] and len(s["input_ids"]) == 60
    assert [b - a for a, b in runs(s["input_ids"], img)] == [N_TINY, N_TINY] and s["pixel_values"].shape[0] == 2
    assert tok.decode(answer_spans(s)[0][:-1]) == "red"
    # two images of 40 tokens each cannot fit 60: the sample is skipped with a reason, or refused under --strict
    ds = dataset(data, tok, entries, max_len=60, n=40)
    skipped = ds[0]
    assert skipped["skipped"] == "entry 'long': the image tokens alone (2 image(s), 80 tokens) do not fit in the " \
                                 "context of 60 tokens" and ds.skipped == [skipped["skipped"]]
    assert PadCollator(0)([skipped])["n_skipped"] == 1
    with pytest.raises(DataError, match="entry 'long': .*longer than the context of 60"):
        dataset(data, tok, entries, max_len=60, n=40, strict=True)[0]


def test_one_unreadable_image_among_several_skips_the_sample(data, tok):
    entries = [{"id": "gone", "images": ["images/0.png", "images/missing.png"],
                "conversations": human_gpt("<image> <image> which?", "red")}]
    ds = dataset(data, tok, entries)
    s = ds[0]
    assert s["skipped"].startswith("image not found: ") and s["skipped"].endswith("missing.png")
    with pytest.raises(DataError, match="image not found: .*missing.png"):
        dataset(data, tok, entries, strict=True)[0]


def test_grid_shows_every_image_of_a_sample(tmp_path):
    proc = ImageProcessor(32)
    a, b = torch.zeros(3, 32, 32), torch.ones(3, 32, 32)
    wide = side_by_side([a, b], proc)
    assert wide.shape == (32, 66, 3) and (wide[:, 32:34] == 255).all()
    recs = [dict(question="q", answer="red", pred="red", ok=True, images=[a, b]),
            dict(question="q", answer="red", pred="blue", ok=False, image=a)]  # a record of the one-image kind
    save_grid(recs, str(tmp_path / "grid.png"), proc)
    assert Image.open(tmp_path / "grid.png").size[0] > 0


# --- train_vqa.py and generate.py end to end --------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A full run and a run stopped after 4 steps then resumed, on the multi-image JSON."""
    base = tmp_path_factory.mktemp("runs")
    full, split = str(base / "full"), str(base / "split")
    train_vqa.main(args_for(data, full))
    train_vqa.main(args_for(data, split, "--stop-after", "4"))
    stopped = losses(split)
    train_vqa.main(args_for(data, split, "--resume"))
    return dict(full=full, split=split, stopped=stopped)


def test_multi_image_run_trains_resumes_bit_exactly_and_evaluates(data, trained):
    full, split = trained["full"], trained["split"]
    assert [s for s, _ in trained["stopped"]] == [1, 2, 3, 4]
    assert len(losses(full)) == 6 and losses(split) == losses(full)  # bit for bit
    first, last = losses(full)[0][1], losses(full)[-1][1]
    assert last < first  # it learns something in 6 steps
    for name in ("best.pt", "last.pt", "samples.png", "eval.json"):
        assert os.path.exists(os.path.join(full, name)), name
    result = json.load(open(os.path.join(full, "eval.json")))
    assert result["counts"]["all"] == 6 and result["skipped"] == 0
    os.remove(os.path.join(full, "eval.json"))
    train_vqa.main(args_for(data, full, "--eval-only"))
    assert json.load(open(os.path.join(full, "eval.json")))["accuracy"] == result["accuracy"]


def test_packed_multi_image_run(data, tmp_path, capsys):
    out = str(tmp_path / "packed")
    train_vqa.main(args_for(data, out, "--pack", "--max-steps", "2", "--eval-every", "0", "--test-samples", "3"))
    text = capsys.readouterr().out
    assert re.search(r"<image x(16|32)>", text)  # the first sample shown, with its image runs (adjacent tags touch)
    assert len(losses(out)) == 2 and os.path.exists(os.path.join(out, "eval.json"))


def test_evaluation_keeps_every_image_for_the_grid(data, trained):
    loaded = load_model(os.path.join(trained["full"], "best.pt"))
    tok, model = loaded.tokenizer, loaded.llava
    entries = load_conversations(data["test"], data["root"])
    ds = VQADataset(entries, data["root"], loaded.extras["processor"],
                    Encoder(tok, loaded.extras["image_token_id"], model.num_image_tokens, 240, loaded.extras["template"],
                            False, prompt_only=True))
    acc, total, kept, skipped = evaluate(model, ds, list(range(len(entries))), tok, train_vqa.special_ids(tok)[1],
                                         torch.autocast("cpu", enabled=False), batch_size=4, max_new_tokens=4,
                                         n_keep=6, progress=False)
    assert total["all"] == 6 and not skipped
    assert [len(r["images"]) for r in kept] == [len(e["images"]) for e in entries]
    for k, r in enumerate(kept):
        assert torch.equal(torch.stack(r["images"]), ds[k]["pixel_values"])


def test_cached_greedy_with_mixed_image_counts_equals_recomputing_the_prefix():
    torch.manual_seed(0)
    # the placeholder id lies outside the vocabulary, so no generated token can turn into one
    cfg = LlavaConfig(vision=vision_config("tiny"), text=llama_config("tiny", vocab_size=60), image_token_id=60)
    model = LlavaModel(cfg).eval()
    n = model.num_image_tokens
    im = [60] * n
    prompts = [[1] + im + [5] + im + [9, 7], [1] + im + [3], [1, 4] + im + im + [8, 8, 2]]
    counts = [2, 1, 2]
    pixels = torch.randn(sum(counts), 3, 32, 32)
    eos, steps = 59, 7
    got = greedy_generate(model, prompts, pixels, eos_id=eos, pad_id=0, max_new_tokens=steps,
                          autocast=torch.autocast("cpu", enabled=False))
    first = [0, 2, 3]
    for k, p in enumerate(prompts):  # one prompt, its own images, no padding, no cache
        ids, out = torch.tensor([p]), []
        with torch.no_grad():
            for _ in range(steps):
                nxt = int(model(ids, pixels[first[k]:first[k] + counts[k]])[0, -1].argmax())
                if nxt == eos:
                    break
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert got[k] == out


def test_generate_with_two_images_equals_full_recompute(data, trained):
    ck = os.path.join(trained["full"], "best.pt")
    a, b = (os.path.join(data["root"], "images", f"{i}.png") for i in (0, 1))
    prompt = "<image>\n<image>\nwhat color is the second shape?"
    res = generate.main(["--ckpt", ck, "--image", a, "--image", b, "--prompt", prompt, "--greedy",
                         "--max-new-tokens", "6", "--quiet"])
    loaded = load_model(ck)
    model, tok = loaded.llava, loaded.tokenizer
    ids, pixels = generate.encode_prompt(loaded, prompt, [a, b])
    img = loaded.extras["image_token_id"]
    assert pixels.shape == (2, 3, 32, 32) and [e - s for s, e in runs(ids, img)] == [model.num_image_tokens] * 2
    eos = loaded.extras["template"].end_of_turn_id(tok)
    x, ref = torch.tensor([ids]), []
    with torch.no_grad():  # the reference: the whole prefix again for every token, no cache
        for _ in range(6):
            nxt = int(model(x, pixels)[0, -1].argmax())
            if nxt == eos:
                break
            ref.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
    assert res[0]["token_ids"][0] == ref
    # the trained model answers with few tokens, so hold the engine's first logits (prefill) to the reference too:
    # two images in the wrong order would give other logits
    session = Session(load_model(ck), SamplerConfig(temperature=0), "cpu")
    seen = []
    prefill = session.decoder.lm_prefill
    session.decoder.lm_prefill = lambda *a: seen.append(prefill(*a)) or seen[-1]
    session.generate(ids, 2, 3, pixels)  # two samples of the prompt, one batch
    with torch.no_grad():
        want, other = model(torch.tensor([ids]), pixels)[0, -1], model(torch.tensor([ids]), pixels.flip(0))[0, -1]
    got = seen[0].reshape(2, -1)
    torch.testing.assert_close(got, torch.stack([want, want]), rtol=1e-5, atol=1e-5)
    assert (other - want).abs().max() > 1e-3
    # the image order matters: swapped images are other pixel_values in other runs
    _, swapped = generate.encode_prompt(loaded, prompt, [b, a])
    assert torch.equal(swapped, pixels.flip(0))
    # a prompt with fewer tags gets the missing ones in front; more tags than images is an error
    assert generate.encode_prompt(loaded, "<image>\nwhat color is the second shape?", [a, b])[0] == ids
    assert generate.encode_prompt(loaded, "what color is the second shape?", [a, b])[0] == ids
    with pytest.raises(SystemExit, match=r"error: the prompt holds 2 <image> tag\(s\) but 1 --image was given"):
        generate.main(["--ckpt", ck, "--image", a, "--prompt", prompt, "--max-new-tokens", "2"])
    # several samples of a two-image prompt decode as one batch: greedy gives each the same answer
    res2 = generate.main(["--ckpt", ck, "--image", a, "--image", b, "--prompt", prompt, "--greedy",
                          "--max-new-tokens", "6", "--num-samples", "2", "--quiet"])
    assert res2[0]["token_ids"] == [ref, ref]
