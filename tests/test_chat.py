"""Chat template, label masking, truncation and the two collators (padded vs packed give the same loss)."""
import pytest
import torch

from models.llama import llama_config
from models.llava import LlavaConfig, LlavaModel
from models.vit import vision_config
from utils.chat import (IGNORE, ChatTemplate, ImagesDoNotFit, PackCollator, PadCollator, answer_spans,
                        encode_conversation, template_for)
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
    with pytest.raises(ImagesDoNotFit, match=r"image tokens alone \(1 image\(s\), 50 tokens\)"):
        encode_conversation(c, tok, IMG, 50, 40)
    two = conv("<image> and <image>\n" + " ".join(WORDS * 6), "a blue square")  # two images: both stay whole
    s = encode_conversation(two, tok, IMG, N, 40)
    assert s["truncated"] and len(s["input_ids"]) == 40 and s["input_ids"].count(IMG) == 2 * N and s["n_images"] == 2
    assert tok.decode(answer_spans(s)[0][:-1]) == "a blue square"
    with pytest.raises(ImagesDoNotFit, match=r"\(2 image\(s\), 50 tokens\)"):
        encode_conversation(two, tok, IMG, 25, 40)


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


# --- the Llama-3 and ChatML templates, against transformers' apply_chat_template ------------------------------

# the chat templates of meta-llama/Meta-Llama-3-8B-Instruct and Qwen/Qwen2-7B-Instruct (tokenizer_config.json)
LLAMA3_JINJA = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_JINJA = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
STYLE_SPECIALS = {"llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>", "<image>"],
                  "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]}


@pytest.fixture(scope="module", params=["llama3", "chatml"])
def hf_tok(request, tmp_path_factory):
    """(style, our tokenizer, transformers' tokenizer) of a tiny byte-level BPE folder with the family's specials."""
    pytest.importorskip("tokenizers")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from utils.tokenizer import LLAMA3_PATTERN, tokenizer_from_folder
    style = request.param
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    texts = [" ".join(WORDS[i:] + WORDS[:i]) + "\n\nsystem user assistant 123 ?" for i in range(len(WORDS))]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(STYLE_SPECIALS[style])
    if style == "llama3":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
        special = dict(bos_token=bos, eos_token="<|eot_id|>")
    else:
        special = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    folder = str(tmp_path_factory.mktemp(style))
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(folder)
    ref = AutoTokenizer.from_pretrained(folder)
    ref.chat_template = LLAMA3_JINJA if style == "llama3" else CHATML_JINJA
    return style, tokenizer_from_folder(folder), ref


def _messages(c):
    return [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]} for t in c]


def _hf_ids(ref, messages, add_generation_prompt):
    out = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


IMAGE_CHAT = [{"from": "system", "value": "describe picture"}] + conv(
    "<image>what color is the shape?", "red", "how many shapes are there?", "two three")


def test_special_templates_give_the_ids_of_apply_chat_template(hf_tok):
    style, tok, ref = hf_tok
    template = template_for(tokenizer=tok)
    assert template.style == style
    img = tok.token_id("<image>")
    for k in (2, 4):  # prompts that end with a user turn, then the whole conversation
        prompt = encode_conversation(IMAGE_CHAT[:k], tok, img, 1, 10_000, template)
        assert prompt["input_ids"] == _hf_ids(ref, _messages(IMAGE_CHAT[:k]), True)
    full = encode_conversation(IMAGE_CHAT, tok, img, 1, 10_000, template)
    assert full["input_ids"] == _hf_ids(ref, _messages(IMAGE_CHAT), False)


def test_special_templates_mask_all_but_the_answers_and_their_end_of_turn(hf_tok):
    style, tok, ref = hf_tok
    template = ChatTemplate(style=style)
    eot = template.end_of_turn_id(tok)
    assert eot == tok.token_id("<|eot_id|>" if style == "llama3" else "<|im_end|>")
    img, n = tok.token_id("<image>"), 5
    c = conv("<image>\nwhat color is the shape?", "red", "<image> left of <image>: how many?", "two three")
    s = encode_conversation(c, tok, img, n, 10_000, template)
    spans = answer_spans(s)
    assert sorted(spans) == [0, 1]
    for k, answer in enumerate(["red", "two three"]):
        assert spans[k][-1] == eot and eot not in spans[k][:-1]
        assert tok.decode(spans[k]) == answer + tok.decode([eot])  # the answer and its end-of-turn, nothing else
    assert s["n_images"] == 3 and s["input_ids"].count(img) == 3 * n
    runs = "".join("i" if i == img else "." for i in s["input_ids"])
    assert runs.count("i" * n) == 3 and "i" * (n + 1) not in runs  # each image one run of n tokens
    for i, lab, t in zip(s["input_ids"], s["labels"], s["turn_ids"]):
        assert (lab == IGNORE) == (t == -1) and (lab == IGNORE or lab == i)
    if tok.bos_id is not None:
        assert s["input_ids"][0] == tok.bos_id and s["labels"][0] == IGNORE
    for k in (1, 3):  # the generation prompt is a prefix of the training sequence
        p = encode_conversation(c[:k], tok, img, n, 10_000, template)
        m = len(p["input_ids"])
        assert s["input_ids"][:m] == p["input_ids"] and s["labels"][:m] == p["labels"]
        assert tok.decode(s["input_ids"][m:]).startswith(c[k]["value"])
    t = encode_conversation(c, tok, img, n, len(s["input_ids"]) - 4, template)
    assert t["truncated"] and answer_spans(t)[0] == spans[0] and t["input_ids"].count(img) == 3 * n


def test_template_dict_round_trip_and_choice(tok):
    old = ChatTemplate(system="be brief")
    assert old.to_dict() == dict(user="USER:", assistant="ASSISTANT:", system="be brief")  # what checkpoints hold
    for t in (old, ChatTemplate(style="llama3"), ChatTemplate(style="chatml", system="You are a helpful assistant.")):
        back = ChatTemplate.from_dict(t.to_dict())
        assert vars(back) == vars(t) and vars(ChatTemplate(**t.to_dict())) == vars(t)
    assert template_for("qwen2").style == "chatml" and template_for("Qwen2.5").style == "chatml"
    assert template_for("llama3").style == "llama3" and template_for("llama", tok).style == "llava"
    assert template_for("llava").style == "llava" and template_for(None, tok).style == "llava"
    with pytest.raises(ValueError, match="needs the token"):
        encode_conversation(conv("hi", "yes"), tok, IMG, N, 256, ChatTemplate(style="chatml"))
    with pytest.raises(ValueError, match="unknown chat template style"):
        ChatTemplate(style="vicuna")
