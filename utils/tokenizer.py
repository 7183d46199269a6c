"""Tokenizers shared by every script: char, sentencepiece, tiktoken, Hugging Face `tokenizer.json` (Llama-3,
Qwen2) and Meta's Llama-3 `tokenizer.model` (tiktoken ranks), all with one interface.

    tok.encode(text) -> list[int]      tok.decode(ids) -> str
    tok.vocab_size   tok.eos_id / tok.bos_id / tok.pad_id (None where absent)
    tok.token_id(piece) for special tokens such as "<image>" (KeyError when the tokenizer has no such token)
    tok.to_dict() -> plain dict stored in checkpoints; tokenizer_from_dict(d) rebuilds it.
    tokenizer_from_folder(path) -> the tokenizer of a Hugging Face (or Meta) model folder.

encode never adds bos/eos; `bos_id` is the token the chat template (utils/chat.py) puts in front.
"""
import base64
import hashlib
import json
import os


class CharTokenizer:
    kind = "char"

    def __init__(self, chars, specials=()):
        self.chars = list(chars)
        self.specials = list(specials)
        self.itos = self.chars + self.specials
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def train(cls, text, specials=()):
        return cls(sorted(set(text)), specials)

    @property
    def vocab_size(self):
        return len(self.itos)

    eos_id = bos_id = pad_id = None

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this char vocabulary") from None

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids if 0 <= i < len(self.itos))

    def token_id(self, piece):
        return self.stoi[piece]

    def to_dict(self):
        return {"kind": self.kind, "chars": "".join(self.chars), "specials": self.specials}


class SentencePieceTokenizer:
    """A sentencepiece model, trained here (cached by a hash of text + settings) or read from a file."""
    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(self.model_proto)

    @classmethod
    def from_file(cls, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        with open(path, "rb") as f:
            return cls(f.read())

    @classmethod
    def train(cls, texts, vocab_size, cache_dir, user_defined_symbols=(), character_coverage=1.0):
        """Train on an iterable of strings; the model is cached in cache_dir under a content hash."""
        import sentencepiece as spm
        texts = list(texts)
        h = hashlib.sha256()
        for t in texts:
            h.update(t.encode("utf-8", "replace"))
            h.update(b"\0")
        h.update(repr((vocab_size, tuple(user_defined_symbols), character_coverage)).encode())
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, f"spm-{vocab_size}-{h.hexdigest()[:12]}.model")
        if not os.path.exists(path):
            import io
            buf = io.BytesIO()
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
                model_type="bpe", character_coverage=character_coverage,
                user_defined_symbols=list(user_defined_symbols), pad_id=3, unk_id=0, bos_id=1, eos_id=2,
                byte_fallback=True, hard_vocab_limit=False, minloglevel=2, num_threads=2,
                train_extremely_large_corpus=False)
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(buf.getvalue())
            os.replace(tmp, path)
        return cls.from_file(path)

    @property
    def vocab_size(self):
        return self.sp.get_piece_size()

    @property
    def eos_id(self):
        return _none_if_neg(self.sp.eos_id())

    @property
    def bos_id(self):
        return _none_if_neg(self.sp.bos_id())

    @property
    def pad_id(self):
        return _none_if_neg(self.sp.pad_id())

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def token_id(self, piece):
        i = self.sp.piece_to_id(piece)
        if i == self.sp.unk_id() and piece != self.sp.id_to_piece(self.sp.unk_id()):
            raise KeyError(f"{piece!r} is not a token of this sentencepiece model")
        return i

    def to_dict(self):
        return {"kind": self.kind, "model_proto": self.model_proto}


class TiktokenTokenizer:
    """OpenAI's BPE (gpt2 / cl100k_base). The encoding file must be local: no network at run time."""
    kind = "tiktoken"

    def __init__(self, name):
        import tiktoken
        self.name = name
        try:
            self.enc = tiktoken.get_encoding(name)
        except Exception as e:
            raise RuntimeError(
                f"tiktoken encoding '{name}' is not available offline ({type(e).__name__}). Download it once on a "
                f"machine with network (python -c \"import tiktoken; tiktoken.get_encoding('{name}')\") and copy "
                f"the cache folder here, pointing TIKTOKEN_CACHE_DIR at it; or use --tokenizer char/sentencepiece"
            ) from None

    @property
    def vocab_size(self):
        return self.enc.n_vocab

    @property
    def eos_id(self):
        return self.enc.eot_token

    bos_id = pad_id = None

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def token_id(self, piece):
        return self.enc.encode_single_token(piece)

    def to_dict(self):
        return {"kind": self.kind, "name": self.name}


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (byte-level BPE of Llama-3, Qwen2, ...) through the `tokenizers` library.

    Gives the ids of `AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)`: special and added
    tokens written in the text (`<|eot_id|>`, `<|im_start|>`) are single ids, as transformers makes them.
    bos_id is the token transformers puts in front with add_special_tokens=True (`<|begin_of_text|>` for Llama-3;
    None for Qwen2, which adds none), found by running tokenizer.json's post-processor: transformers 5 ignores
    the config's add_bos_token / add_eos_token when a tokenizer.json is there (PreTrainedTokenizerBase.
    from_pretrained drops them), and a missing post-processor adds nothing. eos / pad:
    tokenizer_config.json, then special_tokens_map.json, then generation_config.json; eos_ids adds every
    generation_config eos (Llama-3.1-Instruct stops at 128001, 128008 and 128009).
    decode is the backend's decode with special tokens kept and no clean-up of spaces (transformers 5 skips
    the clean-up for BPE models as well), so decode(encode(text)) == text for text the normalizer keeps (Qwen2's
    is NFC).
    """
    kind = "hf_json"

    def __init__(self, tokenizer_json: str, bos_id=None, eos_id=None, pad_id=None, eos_ids=()):
        from tokenizers import Tokenizer
        self.tokenizer_json = tokenizer_json
        self.tok = Tokenizer.from_str(tokenizer_json)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.eos_ids = tuple(dict.fromkeys(([eos_id] if eos_id is not None else []) + list(eos_ids)))
        self._size = max(max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1,
                         self.tok.get_vocab_size(with_added_tokens=True))

    @classmethod
    def from_folder(cls, folder):
        from tokenizers import Tokenizer
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        tok = Tokenizer.from_file(path)
        cfg, smap, gen = (_read_json(os.path.join(folder, n)) for n in
                          ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"))

        def special(name):
            for d in (cfg, smap):
                if d.get(name) is not None:
                    t = _token_text(d[name])
                    i = tok.token_to_id(t)
                    if i is None:  # transformers adds a named special token the vocabulary lacks
                        tok.add_special_tokens([t])
                        i = tok.token_to_id(t)
                    return i
            return None

        bos, eos, pad = special("bos_token"), special("eos_token"), special("pad_token")
        gen_eos = gen.get("eos_token_id")
        gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
        if eos is None and gen_eos:
            eos = gen_eos[0]
        if pad is None and isinstance(gen.get("pad_token_id"), int):
            pad = gen["pad_token_id"]
        # the id the post-processor puts in front is the bos the chat template starts with
        probe = "a"
        plain, full = tok.encode(probe, add_special_tokens=False).ids, tok.encode(probe).ids
        k = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
        if k > 1:
            raise ValueError(f"{path}: the post-processor puts {k} tokens in front of the text; one bos is supported")
        added_bos = full[0] if k == 1 else None
        return cls(tok.to_str(), bos_id=added_bos, eos_id=eos, pad_id=pad, eos_ids=gen_eos)

    @property
    def vocab_size(self):
        return self._size

    def encode(self, text, add_special_tokens=False):
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=False):
        ids = [int(i) for i in ids if 0 <= int(i) < self._size]
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, piece):
        i = self.tok.token_to_id(piece)
        if i is None:
            raise KeyError(f"{piece!r} is not a token of this tokenizer")
        return i

    def to_dict(self):
        return {"kind": self.kind, "tokenizer_json": self.tokenizer_json, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id, "eos_ids": list(self.eos_ids)}


# Meta's llama3/tokenizer.py (and transformers' convert_llama_weights_to_hf.py): split pattern and the 256
# special tokens after the 128,000 ranks. Llama-3.1 renamed some reserved ids; the ids of the named ones
# that both have (begin/end of text, headers, eot) are the same.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL = 256


def llama3_special_tokens(version="3.1"):
    if version == "3":
        named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
        first = 5
    elif version == "3.1":
        named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
        first = 3
    else:
        raise ValueError(f"unknown Llama-3 tokenizer version {version!r} (expected '3' or '3.1')")
    return named + [f"<|reserved_special_token_{first + i}|>" for i in range(LLAMA3_NUM_SPECIAL - len(named))]


def read_tiktoken_ranks(data: bytes):
    """A tiktoken BPE file (`base64-token rank` per line, Meta's tokenizer.model) -> {token bytes: rank}."""
    ranks = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"line {n} of the tiktoken file is not 'base64-token rank'") from None
    return ranks


def is_tiktoken_file(path):
    """True for a tiktoken ranks file (text), False for a sentencepiece model (protobuf)."""
    with open(path, "rb") as f:
        head = f.read(4096).split(b"\n")[0]
    try:
        token, rank = head.decode("ascii").split()
        base64.b64decode(token, validate=True)
        return rank.isdigit()
    except (UnicodeDecodeError, ValueError):
        return False


class Llama3TiktokenTokenizer:
    """Meta's original Llama-3 `tokenizer.model` through tiktoken, as Meta's llama3/tokenizer.py builds it.

    Special tokens written in the text are single ids (what the Hugging Face folder of the same model does),
    unlike Meta's encode, which reads them as plain text by default. bos = <|begin_of_text|>,
    eos = <|end_of_text|>; eos_ids adds <|eot_id|> (and <|eom_id|> for 3.1), Meta's stop tokens.
    """
    kind = "llama3_tiktoken"

    def __init__(self, ranks_file: bytes, version="3.1"):
        import tiktoken
        self.ranks_file, self.version = bytes(ranks_file), version
        ranks = read_tiktoken_ranks(self.ranks_file)
        n = len(ranks)
        self.special_tokens = {t: n + i for i, t in enumerate(llama3_special_tokens(version))}
        self.enc = tiktoken.Encoding(name="llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eos_ids = tuple(self.special_tokens[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
                             if t in self.special_tokens)

    pad_id = None

    @classmethod
    def from_file(cls, path, version="3.1"):
        with open(path, "rb") as f:
            return cls(f.read(), version)

    @property
    def vocab_size(self):
        return self.enc.n_vocab

    def encode(self, text):
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def token_id(self, piece):
        if piece in self.special_tokens:
            return self.special_tokens[piece]
        try:
            return self.enc.encode_single_token(piece)
        except KeyError:
            raise KeyError(f"{piece!r} is not a token of this tokenizer") from None

    def to_dict(self):
        return {"kind": self.kind, "ranks_file": self.ranks_file, "version": self.version}


def _read_json(path):
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(t):
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return t["content"] if isinstance(t, dict) else str(t)


def _llama3_version(folder):
    """'3' for a Meta folder whose params.json has no use_scaled_rope (Llama-3.0), else '3.1'."""
    params = _read_json(os.path.join(folder, "params.json"))
    return "3" if params and "use_scaled_rope" not in params else "3.1"


def tokenizer_from_folder(folder, prefer_sentencepiece=False):
    """The tokenizer of a model folder: tokenizer.json (HF fast tokenizer), else tokenizer.model as a
    sentencepiece model, else tokenizer.model as a Llama-3 tiktoken file (also under original/, where HF's
    Llama-3 repos keep Meta's). prefer_sentencepiece: a folder that ships both (Llama-2, TinyLlama) reads
    tokenizer.model, the way this project's checkpoints of those models were tokenized."""
    json_path = os.path.join(folder, "tokenizer.json")
    models = [os.path.join(folder, "tokenizer.model"), os.path.join(folder, "original", "tokenizer.model")]
    model = next((p for p in models if os.path.isfile(p)), None)
    if model is not None and not is_tiktoken_file(model) and (prefer_sentencepiece or not os.path.isfile(json_path)):
        return SentencePieceTokenizer.from_file(model)
    if os.path.isfile(json_path):
        return HFTokenizer.from_folder(folder)
    if model is not None:
        return Llama3TiktokenTokenizer.from_file(model, _llama3_version(os.path.dirname(model)))
    raise FileNotFoundError(f"{folder} has no tokenizer.json or tokenizer.model")


def _none_if_neg(i):
    return None if i is None or i < 0 else i


def tokenizer_from_dict(d):
    kind = d.get("kind")
    if kind == "char":
        return CharTokenizer(d["chars"], d.get("specials", ()))
    if kind == "sentencepiece":
        return SentencePieceTokenizer(d["model_proto"])
    if kind == "tiktoken":
        return TiktokenTokenizer(d["name"])
    if kind == HFTokenizer.kind:
        return HFTokenizer(d["tokenizer_json"], d.get("bos_id"), d.get("eos_id"), d.get("pad_id"), d.get("eos_ids", ()))
    if kind == Llama3TiktokenTokenizer.kind:
        return Llama3TiktokenTokenizer(d["ranks_file"], d.get("version", "3.1"))
    raise ValueError(f"unknown tokenizer kind {kind!r} in checkpoint")
