"""The training scripts under torchrun (2 processes, gloo, CPU) against one process with the doubled
batch: the same per-step losses (<= 1e-5), read from each run's metrics.jsonl; and an FSDP2 run stopped
and resumed from its sharded torch.distributed.checkpoint folder.

Each 2-process run is one `python -m torch.distributed.run` subprocess; the one-process references run
in the test process (main(argv)), on the same tiny configs as the scripts' own tests.
"""
import os
import sys

import pytest
import torch
import torch.distributed

from utils.metrics import read_jsonl

sys.path.insert(0, os.path.dirname(__file__))
from torchrun_helper import torchrun as run_torchrun  # noqa: E402


pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.usefixtures("one_thread")]  # one_thread: see tests/conftest.py


def torchrun(script, args, nproc=2):
    return run_torchrun(script, args, nproc).stdout


def losses(out, key):
    return {r["step"]: r[key] for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if key in r}


def assert_same_losses(two, one, tol=1e-5):
    assert two.keys() == one.keys() and len(one) >= 2, (two, one)
    diff = max(abs(two[k] - one[k]) for k in one)
    assert diff <= tol, f"max diff {diff:.3g} > {tol}:\n2 procs {two}\n1 proc  {one}"
    vals = list(one.values())
    assert abs(vals[0] - vals[-1]) > 1e-4, "losses must move for the comparison to mean anything"


# --- train_coeus -------------------------------------------------------------------------------------------
def coeus_args(data, out, batch, *extra):
    return ["--data", data, "--out", str(out), "--config", "tiny", "--block-size", "32", "--batch-size", str(batch),
            "--grad-accum", "2", "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "2",
            "--log-interval", "1", "--sample-tokens", "4", "--warmup-iters", "1", "--lr", "3e-3", "--dropout", "0",
            "--no-compile", "--no-progress", *extra]


@pytest.mark.parametrize("mode", ["fsdp"])  # ddp: the same path, covered by the vqa and detect tests
def test_train_coeus_two_procs_equal_one_proc_doubled_batch(tmp_path, mode):
    import train_coeus
    from test_train_coeus import corpus_file
    from utils.checkpoint import load_checkpoint
    data = corpus_file(tmp_path)
    train_coeus.main(coeus_args(data, tmp_path / "one", 4))
    ref = losses(tmp_path / "one", "train_loss")
    two = tmp_path / "two"
    if mode == "ddp":
        torchrun("train_coeus.py", coeus_args(data, two, 2, "--dist", "ddp"))
    else:  # stop after step 2 (sharded save at the eval), resume from the sharded folder, finish
        torchrun("train_coeus.py", coeus_args(data, two, 2, "--dist", "fsdp", "--stop-at", "2"))
        assert os.path.isfile(two / "last_sharded" / ".metadata")
        torchrun("train_coeus.py", coeus_args(data, two, 2, "--dist", "fsdp", "--resume", two / "last_sharded"))
    assert_same_losses(losses(two, "train_loss"), ref)
    assert_same_losses(losses(two, "val_loss"), losses(tmp_path / "one", "val_loss"))
    # the gathered checkpoint is the plain one-process layout: a one-process run loads it
    a, b = load_checkpoint(two / "last.pt", expect_kind="coeus"), load_checkpoint(tmp_path / "one" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) < 1e-4
    assert "--- step 2 ---" in (two / "samples.txt").read_text()  # sampled on rank 0 (FSDP: a gathered copy)


# --- train_vqa ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_train_vqa_two_procs_equal_one_proc_doubled_batch(tmp_path, mode):
    import json
    import train_vqa
    from test_train_vqa import make_dataset
    root = str(tmp_path)
    entries = make_dataset(root)
    paths = {"root": root}
    for name, part in (("train", entries[:24]), ("val", entries[24:30]), ("test", entries[30:])):
        paths[name] = os.path.join(root, f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(part, f)

    def args(out, batch, *extra):  # 3 steps of 2 micro-batches: one epoch of the 24 training questions
        return ["--data", paths["train"], "--val-data", paths["val"], "--test-data", paths["test"],
                "--image-folder", root, "--data-dir", os.path.join(root, "cache"), "--out", str(out),
                "--vision", "tiny", "--llm", "tiny", "--batch-size", str(batch), "--grad-accum", "2",
                "--max-steps", "3", "--warmup", "1", "--log-every", "1", "--eval-every", "2", "--val-samples", "0",
                "--n-grid", "2", "--no-progress", "--lr", "3e-3", *extra]
    train_vqa.main(args(tmp_path / "one", 4))
    torchrun("train_vqa.py", args(tmp_path / "two", 2, "--dist", mode))
    assert_same_losses(losses(tmp_path / "two", "loss"), losses(tmp_path / "one", "loss"))
    assert losses(tmp_path / "two", "val_acc_all") == losses(tmp_path / "one", "val_acc_all")
    for f in ("last.pt", "best.pt", "metrics.png", "samples.png", "eval.json"):
        assert (tmp_path / "two" / f).is_file(), f
    one, two = (json.load(open(tmp_path / d / "eval.json")) for d in ("one", "two"))
    assert one["accuracy"] == two["accuracy"]


# --- train_detect ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_train_detect_two_procs_equal_one_proc_doubled_batch(tmp_path, mode):
    import train_detect
    from test_train_detect import TINY

    def args(out, batch, *extra):  # the box and caption losses divide by counts all-reduced over ranks
        return [*TINY, "--shapes-train", "12", "--max-steps", "3", "--batch-size", str(batch), "--out", str(out),
                "--tokenizer-cache", str(tmp_path / "tok"), *extra]
    res_one = train_detect.main(args(tmp_path / "one", 4))
    # fsdp: with activation checkpointing and the head's 0-dim parameter kept out of the sharding
    extra = ["--activation-checkpointing"] if mode == "fsdp" else []
    torchrun("train_detect.py", args(tmp_path / "two", 2, "--dist", mode, *extra))
    for key in ("loss", "lm", "det", "loss_bbox", "loss_caption", "grad_norm", "gnorm_detection"):
        assert_same_losses(losses(tmp_path / "two", key), losses(tmp_path / "one", key))
    import json
    res_two = json.load(open(tmp_path / "two" / "eval.json"))
    assert abs(res_two["map"] - res_one["map"]) < 1e-6
    for f in ("last.pt", "metrics.png", "predictions.png"):
        assert (tmp_path / "two" / f).is_file(), f
