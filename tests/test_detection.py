"""Detection head shapes, gradients into the vision tower, teacher/student spans in padded and packed batches."""
import pytest
import torch

from models.detection import DetectionConfig, DetectionHead, DetectionModel, sine_positions_2d
from models.detection_loss import SetCriterion
from models.llama import LlamaConfig
from models.llava import LlavaConfig
from models.matcher import HungarianMatcher
from models.vit import vision_config
from utils.chat import PackCollator, PadCollator
from utils.detect_data import DetectionCollator, DetectionSamples, denormalise_boxes, normalise_boxes
from utils.image_processing import ImageProcessor
from utils.shapes_data import ShapesDataset
from utils.tokenizer import CharTokenizer


class EosCharTokenizer(CharTokenizer):
    """Char tokenizer with an end token (captions and answers need one)."""
    @property
    def eos_id(self):
        return self.stoi["$"]


def char_tokenizer():
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,:\n$"
    return EosCharTokenizer(chars)


def tiny_model(vocab, n_queries=5):
    lc = LlavaConfig(vision=vision_config("tiny", image_size=32, patch_size=8),
                     text=LlamaConfig(vocab_size=vocab, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                      max_seq_len=512),
                     image_token_id=vocab, feature_layer=-1)
    dc = DetectionConfig(hidden=32, num_queries=n_queries, decoder_layers=2, caption_layers=1, n_heads=4,
                         vocab_size=vocab, max_caption_len=16, eos_id=vocab - 1)
    return DetectionModel(lc, dc)


def samples(n=5, turns=3, seed=0):
    tok = char_tokenizer()
    model = tiny_model(tok.vocab_size)
    items = ShapesDataset(n, seed=seed, image_size=32, turns_per_sample=turns)
    ds = DetectionSamples(items, tok, ImageProcessor(32, pad_to_square=True), tok.vocab_size,
                          model.llava.num_image_tokens, 512, 16, tok.eos_id)
    return tok, model, items, ds


def test_head_shapes_and_aux_outputs():
    head = DetectionHead(hidden=32, num_queries=7, decoder_layers=3, caption_layers=2, adapter_bottleneck=4,
                         vision_dim=24, text_dim=40, n_heads=4, vocab_size=50, max_caption_len=6, eos_id=1)
    vis, text = torch.randn(2, 16, 24), torch.randn(2, 9, 40)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    outs = head(vis, text, mask)
    assert len(outs) == 3
    for o in outs:
        assert o["logits"].shape == (2, 7) and o["boxes"].shape == (2, 7, 4) and o["hidden"].shape == (2, 7, 32)
        assert ((o["boxes"] > 0) & (o["boxes"] < 1)).all()
    tokens = torch.randint(0, 50, (4, 6))
    assert head.caption_logits(outs[-1]["hidden"][0, :4], tokens).shape == (4, 6, 50)
    gen = head.caption.generate(outs[-1]["hidden"][0])
    assert gen.shape[0] == 7 and gen.shape[1] <= 6
    # padded text positions are ignored: changing them changes nothing
    text2 = text.clone()
    text2[1, 5:] = 100.0
    assert torch.allclose(head(vis, text2, mask)[-1]["boxes"], outs[-1]["boxes"], atol=1e-6)


def test_caption_decoder_is_causal_and_generate_is_greedy():
    head = DetectionHead(hidden=16, num_queries=3, caption_layers=2, n_heads=4, vocab_size=20, max_caption_len=5,
                         eos_id=19)
    states = torch.randn(3, 16)
    toks = torch.randint(0, 19, (3, 5))
    a = head.caption(states, toks)
    toks2 = toks.clone()
    toks2[:, 3:] = 7  # changing later inputs leaves earlier logits alone
    assert torch.allclose(head.caption(states, toks2)[:, :4], a[:, :4], atol=1e-6)
    gen = head.caption.generate(states)
    for i in range(3):  # each greedy token is the argmax given the previous ones
        seq = [t for t in gen[i].tolist() if t >= 0]
        x = torch.tensor([seq + [0]])
        logits = head.caption(states[i:i + 1], x[:, :len(seq)] if len(seq) else x[:, :1])
        assert logits[0, :len(seq)].argmax(-1).tolist() == seq


def test_adapters_start_as_identity_and_sine_positions():
    head = DetectionHead(hidden=16, vision_dim=16, text_dim=16, n_heads=4, vocab_size=10)
    x = torch.randn(2, 5, 16)
    assert torch.equal(head.vision_adapter(x), x) and torch.equal(head.text_adapter(x), x)
    pos = sine_positions_2d(16, 16, "cpu")
    assert pos.shape == (16, 16) and len({tuple(p) for p in pos.tolist()}) == 16


@pytest.mark.parametrize("pack", [False, True])
def test_spans_and_images_in_padded_and_packed_batches(pack):
    tok, model, items, ds = samples(n=5, turns=3)
    n_img = model.llava.num_image_tokens
    base = PackCollator(0, 512) if pack else PadCollator(0)
    b = DetectionCollator(base, tok.vocab_size, n_img)([ds[i] for i in range(5)])
    if pack:
        assert b["input_ids"].shape[0] < 5  # really packed
    T = b["input_ids"].shape[1]
    for i, (r, s, e) in enumerate(b["sample_rows"]):
        item = items[i]
        labels, smask = b["labels"][r], b["student_mask"][r]
        student_ids = [int(t) for t, m in zip(labels[s:e], smask[s:e]) if m and t != -100]
        teacher_ids = [int(t) for t, m in zip(labels[s:e], smask[s:e]) if not m and t != -100]
        eos = tok.decode([tok.eos_id])
        assert tok.decode(student_ids) == item["turns"][-1]["response"] + eos
        assert tok.decode(teacher_ids) == "".join(t["response"] + eos for t in item["turns"][:-1])
        # the detection image is the student's (last) image of this sample
        img = b["pixel_values"][b["det_image_index"][i]]
        assert torch.equal(img, ds.proc(item["images"][-1]))
        # memory: this sample's tokens up to (not into) the student's answer, all image tokens included
        mem = b["memory_index"][i][b["memory_mask"][i]]
        rows, cols = mem // T, mem % T
        assert (rows == r).all() and cols[0] == s and (cols < e).all()
        assert int((b["input_ids"][r, cols] == tok.vocab_size).sum()) == 3 * n_img
        first_student = s + int(smask[s:e].nonzero()[0])
        assert int(cols[-1]) == first_student - 1
        # targets came through with the sample
        assert torch.equal(b["targets"][i]["boxes"], normalise_boxes(item["boxes"], 32, 32)[0])
        caps = [tok.decode([t for t in c.tolist() if t >= 0 and t != tok.eos_id]) for c in b["targets"][i]["captions"]]
        assert caps == item["captions"]


def test_box_normalisation_round_trip_non_square():
    boxes = [[10, 5, 30, 25], [0, 0, 40, 20]]
    nb, frame = normalise_boxes(boxes, 40, 20)  # padded to 40x40, offset (0, 10)
    assert frame == (40, 0, 10)
    assert torch.allclose(nb[1], torch.tensor([0.5, 0.5, 1.0, 0.5]))
    xywh = denormalise_boxes(nb, frame)
    assert torch.allclose(xywh, torch.tensor([[10.0, 5, 20, 20], [0, 0, 40, 20]]))


def test_embed_from_vision_features_matches_embed_from_pixels():
    tok, model, items, ds = samples(n=2, turns=2)
    b = DetectionCollator(PadCollator(0), tok.vocab_size, model.llava.num_image_tokens)([ds[0], ds[1]])
    ref = model.llava.embed(b["input_ids"], b["pixel_values"])
    got = model.llava.embed(b["input_ids"], vision_features=model.vision_features(b["pixel_values"]))
    assert torch.allclose(ref, got, atol=1e-6)


def test_both_losses_reach_the_vision_tower():
    tok, model, items, ds = samples(n=3, turns=2, seed=3)
    b = DetectionCollator(PadCollator(0), tok.vocab_size, model.llava.num_image_tokens)([ds[i] for i in range(3)])
    crit = SetCriterion(HungarianMatcher())
    logits, _, outs = model(b["input_ids"], b["pixel_values"], b["attention_mask"], None, b["det_image_index"],
                            b["memory_index"], b["memory_mask"])
    lm = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)
    det, parts, _ = crit(outs, b["targets"], caption_fn=model.head.caption_logits)
    assert set(parts) == {"loss_obj", "loss_bbox", "loss_giou", "loss_caption"}
    patch = model.llava.vision_tower.patch_embed.weight
    last_block = model.llava.vision_tower.blocks[-1].mlp.fc2.weight
    for name, loss in (("lm", lm), ("detection", det)):
        model.zero_grad()
        loss.backward(retain_graph=True)
        assert patch.grad is not None and patch.grad.abs().sum() > 0, name
        assert last_block.grad is not None and last_block.grad.abs().sum() > 0, name
    # the detection loss reaches every part of the head, captions included
    model.zero_grad()
    det.backward()
    for n, p in model.head.named_parameters():
        assert p.grad is not None, n


def test_reference_points_and_spatial_prior():
    head = DetectionHead(hidden=16, num_queries=4, n_heads=4, vocab_size=10)
    ref = head.ref_logits.sigmoid()
    assert torch.allclose(ref, torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]))
    keep = torch.ones(2, 1, 1, 4 + 3, dtype=torch.bool)
    keep[1, ..., -1] = False
    bias = head.attention_bias(ref, keep, 4, torch.float32)  # 2x2 vision grid (centres = the refs), 3 text tokens
    assert bias.shape == (2, 1, 4, 7)
    # Gaussian in the distance: 0 on the query's own patch, -d^2 / (2 sigma^2) elsewhere (sigma = 0.25)
    d2 = torch.tensor([[0, 0.25, 0.25, 0.5], [0.25, 0, 0.5, 0.25], [0.25, 0.5, 0, 0.25], [0.5, 0.25, 0.25, 0]])
    assert torch.allclose(bias[0, 0, :, :4], -d2 / (2 * 0.25 ** 2), atol=1e-5)
    assert (bias[:, :, :, 4:6] == 0).all() and (bias[1, :, :, 6] < -1e8).all() and (bias[0, :, :, 6] == 0).all()
    # untrained, every box sits on its query's reference point
    outs = head(torch.randn(1, 16, 16), torch.randn(1, 3, 16), torch.ones(1, 3, dtype=torch.bool))
    assert torch.allclose(outs[-1]["boxes"][0, :, :2], ref, atol=1e-6)
