"""Tokenizers shared by every script: char, sentencepiece and tiktoken, all with one interface.

    tok.encode(text) -> list[int]      tok.decode(ids) -> str
    tok.vocab_size   tok.eos_id / tok.bos_id / tok.pad_id (None where absent)
    tok.token_id(piece) for special tokens such as "<image>"
    tok.to_dict() -> plain dict stored in checkpoints; tokenizer_from_dict(d) rebuilds it.
"""
import hashlib
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
    raise ValueError(f"unknown tokenizer kind {kind!r} in checkpoint")
