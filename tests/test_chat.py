"""Chat template, label masking, truncation and the two collators (padded vs packed give the same loss)."""
import pytest
import torch

from models.llama import llama_config
from models.llava import LlavaConfig, LlavaModel
from models.vit import vision_config
from utils.chat import IGNORE, PackCollator, PadCollator, answer_spans, encode_conversation
from utils.tokenizer import SentencePieceTokenizer

WORDS = ("what color is the shape red blue green circle square triangle yes no is there a in image "
         "how many shapes are two three describe picture left right of it USER: ASSISTANT:").split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    return SentencePieceTokenizer.train(texts, 300, tmp_path_factory.mktemp("spm"), user_defined_symbols=["<image>"])


IMG, N = 4, 5  # <image> is piece 4 (first user-defined symbol); 5 tokens per image


def conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


CONVERSATIONS = [
    conv("<image>\nwhat color is the shape?", "red"),
    conv("<image>\nis there a circle?", "no", "how many shapes are there?", "two three", "describe it", "a blue square left of a green triangle"),
    [{"from": "system", "value": "describe picture"}] + conv("<image> left <image> right: what color?", "blue green"),
    conv("no image here", "yes"),
]


@pytest.mark.parametrize("c", CONVERSATIONS)
def test_unmasked_labels_decode_to_exactly_the_answers(tok, c):
    s = encode_conversation(c, tok, IMG, N, max_len=256)
    answers = [t["value"] for t in c if t["from"] == "gpt"]
    spans = answer_spans(s)
    assert sorted(spans) == list(range(len(answers)))
    for k, answer in enumerate(answers):
        assert spans[k][-1] == tok.eos_id          # end-of-turn learned
        assert tok.decode(spans[k][:-1]) == answer  # exactly the answer, nothing of the prompt
    n_img = sum(t["value"].count("<image>") for t in c)
    assert s["n_images"] == n_img and s["input_ids"].count(IMG) == n_img * N
    for i, lab, t in zip(s["input_ids"], s["labels"], s["turn_ids"]):
        assert (lab == IGNORE) == (t == -1)
        assert lab == IGNORE or lab == i
        if i == IMG or i == tok.bos_id:
            assert lab == IGNORE
    assert not s["truncated"]


def test_generation_prompt_is_a_prefix_of_the_training_sequence(tok):
    c = CONVERSATIONS[1]
    full = encode_conversation(c, tok, IMG, N, 256)
    for k in (1, 3, 5):
        prompt = encode_conversation(c[:k], tok, IMG, N, 256)
        n = len(prompt["input_ids"])
        assert full["input_ids"][:n] == prompt["input_ids"] and full["labels"][:n] == prompt["labels"]
        assert len(answer_spans(prompt)) == k // 2  # earlier answers only; the open turn has no label
        assert tok.decode(full["input_ids"][n:]).startswith(c[k]["value"])


def test_truncation_keeps_answers_and_image_tokens(tok):
    long_q = "<image>\n" + " ".join(WORDS * 6)
    c = conv(long_q, "a blue square")
    full = encode_conversation(c, tok, IMG, N, 10_000)
    s = encode_conversation(c, tok, IMG, N, 40)
    assert s["truncated"] and len(s["input_ids"]) == 40 and len(full["input_ids"]) > 40
    assert s["input_ids"].count(IMG) == N  # the image run is whole
    assert tok.decode(answer_spans(s)[0][:-1]) == "a blue square"
    assert s["input_ids"][-len(answer_spans(full)[0]):] == answer_spans(full)[0]
    with pytest.raises(ValueError, match="longer than the context"):
        encode_conversation(c, tok, IMG, N, 40, strict=True)
    with pytest.raises(ValueError, match="image tokens alone"):
        encode_conversation(c, tok, IMG, 50, 40)


def _samples(tok, seed=0, image_size=32):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, c in enumerate(CONVERSATIONS):
        s = encode_conversation(c, tok, IMG, 16, 256)
        s["pixel_values"] = torch.randn(s["n_images"], 3, image_size, image_size, generator=g) if s["n_images"] else None
        s["id"] = k
        out.append(s)
    return out


def test_pad_collator(tok):
    samples = _samples(tok)
    b = PadCollator(pad_id=tok.pad_id)(samples + [None])
    lengths = [len(s["input_ids"]) for s in samples]
    assert b["input_ids"].shape == (4, max(lengths)) and b["n_skipped"] == 1 and b["n_samples"] == 4
    assert b["attention_mask"].sum(1).tolist() == lengths
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()
    assert (b["turn_ids"][b["attention_mask"] == 0] == -1).all()
    assert b["pixel_values"].shape[0] == sum(s["n_images"] for s in samples)
    assert b["meta"]["id"] == [0, 1, 2, 3]


def test_pack_collator_layout_and_image_order(tok):
    samples = _samples(tok)
    for k, s in enumerate(samples):  # tag every image with (sample, image index)
        if s["pixel_values"] is not None:
            for j in range(len(s["pixel_values"])):
                s["pixel_values"][j] = 10 * k + j
    b = PackCollator(pad_id=tok.pad_id, max_len=160)(samples)
    assert b["input_ids"].shape[0] < len(samples)  # something was packed together
    # image runs, read row-major, must meet pixel_values in the same order
    expected = []
    for r in range(b["input_ids"].shape[0]):
        for k, (row, start, end) in sorted(enumerate(b["sample_rows"]), key=lambda x: x[1][1]):
            if row == r:
                expected += [10 * k + j for j in range(samples[k]["n_images"])]
    assert [int(p[0, 0, 0]) for p in b["pixel_values"]] == expected
    for k, (row, start, end) in enumerate(b["sample_rows"]):
        assert b["input_ids"][row, start:end].tolist() == samples[k]["input_ids"]
        assert b["labels"][row, start:end].tolist() == samples[k]["labels"]
        assert b["position_ids"][row, start:end].tolist() == list(range(end - start))
        seg = b["attention_mask"][row, start:end]
        assert (seg == seg[0]).all() and seg[0] > 0


def test_packed_and_padded_losses_are_equal(tok):
    torch.manual_seed(0)
    cfg = LlavaConfig(vision=vision_config("tiny"), text=llama_config("tiny", vocab_size=tok.vocab_size),
                      image_token_id=IMG, feature_layer=-2)
    model = LlavaModel(cfg).double().eval()
    samples = _samples(tok)
    for s in samples:
        if s["pixel_values"] is not None:
            s["pixel_values"] = s["pixel_values"].double()
    pad = PadCollator(tok.pad_id)(samples)
    pack = PackCollator(tok.pad_id, max_len=160)(samples)
    assert pack["input_ids"].shape[0] < pad["input_ids"].shape[0]
    with torch.no_grad():
        logits_pad, loss_pad = model(pad["input_ids"], pad["pixel_values"], attention_mask=pad["attention_mask"],
                                     labels=pad["labels"])
        logits_pack, loss_pack = model(pack["input_ids"], pack["pixel_values"], attention_mask=pack["attention_mask"],
                                       position_ids=pack["position_ids"], labels=pack["labels"])
        # and one sample alone, unpadded: the reference for both
        logits_one = [model(torch.tensor([s["input_ids"]]), s["pixel_values"])[0] for s in samples]
    torch.testing.assert_close(loss_pack, loss_pad, rtol=1e-10, atol=1e-10)
    for k, s in enumerate(samples):
        n = len(s["input_ids"])
        row, start, end = pack["sample_rows"][k]
        torch.testing.assert_close(logits_pack[row, start:end], logits_one[k], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(logits_pad[k, :n], logits_one[k], rtol=1e-9, atol=1e-9)
    # the loss is the token-weighted mean over all answer tokens of the batch
    n_tok = [sum(lab != IGNORE for lab in s["labels"][1:]) for s in samples]
    per = []
    for k, s in enumerate(samples):
        lg = logits_one[k][:-1].float()  # causal_lm_loss works in fp32
        tgt = torch.tensor(s["labels"][1:])
        per.append(torch.nn.functional.cross_entropy(lg, tgt, ignore_index=IGNORE, reduction="sum"))
    torch.testing.assert_close(loss_pad, sum(per) / sum(n_tok), rtol=1e-6, atol=1e-6)
