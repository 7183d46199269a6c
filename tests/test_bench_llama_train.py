"""The training benchmark's whole path (both models, same weights, JSON out) runs on CPU in its smoke mode."""
import json
import sys

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, "benchmarks")
import bench_llama_train  # noqa: E402


def test_smoke_run_writes_json_and_losses_agree(tmp_path):
    out = tmp_path / "bench.json"
    summary = bench_llama_train.main(["--smoke", "--steps", "1", "--warmup", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"transformers", "ours"}
    assert saved["results"]["ours"]["tokens_per_s"] > 0 and "speedup" in saved
    # same initial weights and batch: the first losses agree to bf16 precision
    assert summary["first_loss_diff"] < 1e-2


def test_smoke_run_of_the_qwen2_family(tmp_path):
    """A q/k/v-bias, tied-head decoder is measured against transformers' Qwen2ForCausalLM with the same weights."""
    summary = bench_llama_train.main(["--smoke", "--config", "tiny-qwen2", "--steps", "1", "--warmup", "0",
                                      "--out", str(tmp_path / "bench.json")])
    assert summary["first_loss_diff"] < 1e-2
