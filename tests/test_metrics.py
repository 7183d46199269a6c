"""utils/metrics.py: the logger (JSONL, plot, TensorBoard), per-group norms against direct sums, the first
sample's label-mask view."""
import math
import os

import pytest
import torch
import torch.nn as nn

from utils.metrics import MetricsLogger, describe_sample, group_norms, memory_stats, read_jsonl
from utils.tokenizer import CharTokenizer


def test_logger_writes_jsonl_plot_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log = MetricsLogger(tmp_path, tensorboard=tmp_path / "tb")
    for s in range(3):
        log.log(step=s, loss=torch.tensor(1.0 / (s + 1)), note="x")
    assert log.plot(groups=[["loss"]]) == str(tmp_path / "metrics.png") and (tmp_path / "metrics.png").is_file()
    log.close()
    assert [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == pytest.approx([1, 0.5, 1 / 3])
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("loss")] == [(0, 1.0), (1, 0.5), (2, 0.3333)]
    resumed = MetricsLogger(tmp_path, resume_step=1)  # rows past the resumed step are dropped
    assert [r["step"] for r in resumed.rows()] == [0, 1]


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "rank1", enabled=False)
    log.log(step=0, loss=1.0)
    assert log.plot() is None and not os.path.exists(tmp_path / "rank1")


def test_group_norms_equal_direct_sums():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    groups = [{"params": [m[0].weight, m[1].weight], "name": "w", "lr": 0.1},
              {"params": [m[0].bias], "name": "w", "lr": 0.1},             # same name: added up
              {"params": [m[1].bias], "group": "head", "lr": 0.01}]
    opt = torch.optim.SGD(groups, lr=1.0)
    m(torch.randn(5, 3)).pow(2).sum().backward()
    got = group_norms(opt)
    w = [m[0].weight, m[1].weight, m[0].bias]
    assert got["gnorm_w"] == pytest.approx(math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in w)))
    assert got["wnorm_w"] == pytest.approx(math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in w)))
    assert got["gnorm_head"] == pytest.approx(float(m[1].bias.grad.double().norm()))
    assert got["lr_w"] == 0.1 and got["lr_head"] == 0.01
    assert memory_stats("cpu") == {}


def test_describe_sample_marks_the_learned_tokens():
    tok = CharTokenizer.train("question? answer.")
    ids = tok.encode("question? answer.")
    labels = [-100] * 10 + ids[10:]
    text = describe_sample(tok, ids, labels)
    assert text.splitlines()[0] == "first training sample: 17 tokens, 7 learned; learned tokens in [[...]]:"
    assert text.splitlines()[1] == "question? [[answer.]]"
    assert "(first 4 of 17)" in describe_sample(tok, ids, labels, max_tokens=4)
    with_image = [99] * 3 + ids
    assert describe_sample(tok, with_image, [-100] * 13 + ids[10:], image_id=99).splitlines()[1] == \
        "<image x3>question? [[answer.]]"
