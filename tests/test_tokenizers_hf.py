"""Hugging Face tokenizer.json (Llama-3 / Qwen2 style byte-level BPE) and Meta's Llama-3 tiktoken file: our ids
against transformers' (AutoTokenizer of a folder written by save_pretrained) and against transformers'
TikTokenConverter; decode round trips; the folder-level picker; the checkpoint dict round trip."""
import base64
import collections
import json
import os

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,  # noqa: E402
                        processors, trainers)

from utils.tokenizer import (LLAMA3_PATTERN, HFTokenizer, Llama3TiktokenTokenizer, SentencePieceTokenizer,  # noqa: E402
                             llama3_special_tokens, read_tiktoken_ranks, tokenizer_from_dict, tokenizer_from_folder)

QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # Qwen2's: one digit per token
CORPUS = ["The quick brown fox jumps over the lazy dog. 0123456789 and 42 or 1999!",
          "what color is the shape? red, blue, green; circle square triangle",
          "héllo wörld naïve café ünïcödé 日本語のテキスト 😀 it's we'll they're I'M",
          "  indented\n\n\tcode(x) = y + 1  # comment\r\n"] * 8
MIXED = ("Hello,  wörld!\t12345 6789   日本語 ünïcödé\n\n  x<|begin_of_text|>y <|eot_id|>\r\n 's 'LL naïve café "
         "😀 "
         "what   color?<|start_header_id|>user<|end_header_id|>\n\n  trailing   ")
QWEN_MIXED = MIXED + "<|im_start|>assistant\nred<|im_end|>\n<|endoftext|>end"


def _bpe(pattern, specials, vocab_size=600, nfc=False):
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(specials)
    return tok


def _save(tok, folder, config_edit=None, generation_config=None, **special):
    from transformers import PreTrainedTokenizerFast
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(folder)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(config_edit or {})
    with open(path, "w") as f:
        json.dump(cfg, f)
    if generation_config:
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump(generation_config, f)
    return str(folder)


def llama3_folder(folder):
    tok = _bpe(LLAMA3_PATTERN, llama3_special_tokens("3.1"))
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    # what meta-llama/Llama-3.1-8B-Instruct ships: the class and clean-up flag of its tokenizer_config.json
    return _save(tok, folder, {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True},
                 {"bos_token_id": tok.token_to_id(bos), "eos_token_id": [tok.token_to_id(t) for t in
                  ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]}, bos_token=bos, eos_token="<|eot_id|>")


def qwen2_folder(folder, add_bos_key=False):
    tok = _bpe(QWEN_PATTERN, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], nfc=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    edit = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "clean_up_tokenization_spaces": False}
    if add_bos_key:
        edit["add_bos_token"] = False
    return _save(tok, folder, edit, {"bos_token_id": tok.token_to_id("<|endoftext|>"),
                                     "eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
                                     "pad_token_id": tok.token_to_id("<|endoftext|>")},
                 eos_token="<|im_end|>", pad_token="<|endoftext|>")


def bos_without_post_processor_folder(folder):
    """No post-processor in tokenizer.json, add_bos_token in the config: transformers 5 adds no bos (it drops
    add_bos_token when a tokenizer.json is there)."""
    tok = _bpe(LLAMA3_PATTERN, ["<s>", "</s>"])
    return _save(tok, folder, {"add_bos_token": True}, bos_token="<s>", eos_token="</s>")


FOLDERS = {"llama3": llama3_folder, "qwen2": qwen2_folder, "qwen2_add_bos_key": lambda f: qwen2_folder(f, True),
           "bos_no_post_processor": bos_without_post_processor_folder}


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_ids_match_transformers(tmp_path, name):
    from transformers import AutoTokenizer
    folder = FOLDERS[name](tmp_path / name)
    ref = AutoTokenizer.from_pretrained(folder)
    ours = tokenizer_from_folder(folder)
    assert isinstance(ours, HFTokenizer)
    text = QWEN_MIXED if name.startswith("qwen") else MIXED
    for t in (text, "", " ", "a", "\n\n", "12345678901", "<|eot_id|>"):
        ids = ours.encode(t)
        assert ids == ref(t, add_special_tokens=False)["input_ids"], t
        assert ([ours.bos_id] if ours.bos_id is not None else []) + ids == ref(t)["input_ids"], t
        assert ours.encode(t, add_special_tokens=True) == ref(t)["input_ids"]
        assert ours.decode(ids) == t == ref.decode(ids)
    assert ours.bos_id == (ref.bos_token_id if name == "llama3" else None)  # the bos transformers adds
    assert (ours.eos_id, ours.pad_id, ours.vocab_size) == (ref.eos_token_id, ref.pad_token_id, len(ref))
    specials = [t for t in ("<|begin_of_text|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>")
                if t in ref.get_vocab()]
    assert specials
    for t in specials:
        assert ours.token_id(t) == ref.convert_tokens_to_ids(t) and ours.encode(t) == [ours.token_id(t)]
    with pytest.raises(KeyError):
        ours.token_id("<image>")
    again = tokenizer_from_dict(ours.to_dict())
    assert again.encode(text) == ours.encode(text) and again.to_dict() == ours.to_dict()
    specials_of = (lambda t: (t.bos_id, t.eos_id, t.pad_id, t.eos_ids))
    assert specials_of(again) == specials_of(ours)


def test_special_ids_of_the_families(tmp_path):
    llama = tokenizer_from_folder(llama3_folder(tmp_path / "l"))
    n = llama.token_id("<|begin_of_text|>")
    assert llama.bos_id == n and llama.eos_id == n + 9 == llama.token_id("<|eot_id|>")
    assert llama.eos_ids == (n + 9, n + 1, n + 8)  # generation_config's stop tokens after the tokenizer's eos
    assert llama.pad_id is None and llama.vocab_size == n + 256
    qwen = tokenizer_from_folder(qwen2_folder(tmp_path / "q"))
    assert qwen.bos_id is None and qwen.eos_id == qwen.token_id("<|im_end|>")
    assert qwen.pad_id == qwen.token_id("<|endoftext|>") and qwen.eos_ids == (qwen.eos_id, qwen.pad_id)


# --- Meta's tiktoken tokenizer.model -----------------------------------------------------------------------

def _byte_order():
    """The 256 single bytes in GPT-2's order (printable first), as Meta's file ranks them: rank != byte value."""
    first = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    return first + [b for b in range(256) if b not in first]


def _train_ranks(n_merges=120):
    import regex
    words = collections.Counter(w.encode() for text in CORPUS for w in regex.findall(LLAMA3_PATTERN, text))
    ranks = {bytes([b]): r for r, b in enumerate(_byte_order())}
    splits = {w: [bytes([b]) for b in w] for w in words}
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, parts in splits.items():
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], -ranks[kv[0][0]], -ranks[kv[0][1]]))
        ranks[a + b] = len(ranks)
        for w, parts in splits.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = out
    return ranks


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory):
    ranks = _train_ranks()
    folder = tmp_path_factory.mktemp("meta_llama3")
    path = folder / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for t, r in ranks.items()))
    return str(path), ranks


def _converted_reference(path):
    """transformers' conversion of Meta's file (convert_llama_weights_to_hf.py: TikTokenConverter + the
    Llama-3 pre-tokenizer and specials), an independent BPE implementation to compare tiktoken's ids with."""
    from transformers.convert_slow_tokenizer import TikTokenConverter
    converter = TikTokenConverter(vocab_file=path)  # its default pattern is Llama-3's
    assert converter.pattern == LLAMA3_PATTERN
    tok = converter.tokenizer()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(converter.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(llama3_special_tokens("3.1"))
    return tok


def test_tiktoken_file_matches_transformers_conversion(tiktoken_file):
    path, ranks = tiktoken_file
    with open(path, "rb") as f:
        assert read_tiktoken_ranks(f.read()) == ranks
    ours = tokenizer_from_folder(os.path.dirname(path))
    assert isinstance(ours, Llama3TiktokenTokenizer)
    n = len(ranks)
    assert ours.vocab_size == n + 256 and ours.bos_id == n and ours.eos_id == n + 1
    assert ours.token_id("<|eot_id|>") == n + 9 and ours.token_id("<|start_header_id|>") == n + 6
    assert ours.token_id("<|reserved_special_token_247|>") == n + 255 and ours.eos_ids == (n + 1, n + 8, n + 9)
    ref = _converted_reference(path)
    for t in (MIXED, "", " ", "\n\n", "12345678901", "the shape is red", "  日本語😀\t\t x"):
        ids = ours.encode(t)
        assert ids == ref.encode(t, add_special_tokens=False).ids, t
        assert ours.decode(ids) == t
    assert max(ours.encode(CORPUS[0])) >= 256  # the merges are used, not only the bytes
    again = tokenizer_from_dict(ours.to_dict())
    assert again.encode(MIXED) == ours.encode(MIXED)


def test_meta_folder_version_from_params_json(tiktoken_file, tmp_path):
    import shutil
    n = len(tiktoken_file[1])
    for params, version, name in (({"dim": 8}, "3", "<|reserved_special_token_4|>"),
                                  ({"dim": 8, "use_scaled_rope": True}, "3.1", "<|eom_id|>")):
        folder = tmp_path / version
        folder.mkdir()
        shutil.copy(tiktoken_file[0], folder / "tokenizer.model")
        (folder / "params.json").write_text(json.dumps(params))
        tok = tokenizer_from_folder(str(folder))
        assert tok.version == version and tok.token_id(name) == n + 8 and tok.token_id("<|eot_id|>") == n + 9


def test_llama3_special_token_tables():
    for v in ("3", "3.1"):
        table = llama3_special_tokens(v)
        assert len(table) == len(set(table)) == 256
        assert [table.index(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                         "<|end_header_id|>", "<|eot_id|>")] == [0, 1, 6, 7, 9]
    assert llama3_special_tokens("3")[-1] == "<|reserved_special_token_250|>"
    assert llama3_special_tokens("3.1")[8] == "<|eom_id|>"


def test_folder_picks_json_then_sentencepiece_then_tiktoken(tmp_path, tiktoken_file):
    import shutil
    folder = llama3_folder(tmp_path / "both")
    shutil.copy(tiktoken_file[0], os.path.join(folder, "tokenizer.model"))
    assert isinstance(tokenizer_from_folder(folder), HFTokenizer)  # tokenizer.json first
    texts = ["what color is the shape", "red blue green circle square"] * 20
    sp = SentencePieceTokenizer.train(texts, 300, str(tmp_path / "spm"))
    spm_folder = tmp_path / "spm_folder"
    spm_folder.mkdir()
    (spm_folder / "tokenizer.model").write_bytes(sp.model_proto)
    assert isinstance(tokenizer_from_folder(str(spm_folder)), SentencePieceTokenizer)
    shutil.copy(os.path.join(folder, "tokenizer.json"), spm_folder / "tokenizer.json")
    assert isinstance(tokenizer_from_folder(str(spm_folder)), HFTokenizer)
    assert isinstance(tokenizer_from_folder(str(spm_folder), prefer_sentencepiece=True), SentencePieceTokenizer)
    with pytest.raises(FileNotFoundError):
        tokenizer_from_folder(str(tmp_path / "empty_nonexistent"))
