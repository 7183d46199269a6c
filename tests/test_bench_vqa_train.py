"""The VQA training benchmark's whole path (ours and transformers' LLaVA, same weights, JSON out) runs on CPU."""
import json
import sys

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, "benchmarks")
import bench_vqa_train  # noqa: E402


def test_smoke_run_writes_json_and_first_losses_agree(tmp_path):
    out = tmp_path / "bench.json"
    bench_vqa_train.main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"transformers", "ours"}
    assert saved["results"]["ours"]["samples_per_s"] > 0 and saved["speedup"] > 0
    # transformers' initial weights copied into ours, same batch: the first losses agree to bf16 precision
    assert saved["first_loss_diff"] < 1e-2


def test_isolated_processes_build_the_same_weights(tmp_path):
    """--isolate on: each model measured in a fresh process; the seeds give both the same weights and batch."""
    out = tmp_path / "bench.json"
    bench_vqa_train.main(["--smoke", "--isolate", "on", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"transformers", "ours"}
    assert saved["first_loss_diff"] < 1e-2
