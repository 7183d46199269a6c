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
    # by default transformers is measured both eagerly and compiled (on CPU smoke: the aot_eager backend)
    assert set(saved["results"]) == {"transformers_eager", "transformers_compiled", "ours"}
    for name in saved["results"]:
        assert saved["results"][name]["tokens_per_s"] > 0 and saved["results"][name]["peak_mem_gb"] > 0
    assert saved["results"]["transformers_compiled"]["compile_error"] is None
    assert saved["results"]["transformers_compiled"]["compile_backend"] == "aot_eager"
    assert saved["ours_vs_compiled"] > 0 and saved["ours_vs_eager"] > 0
    assert saved["peer"] == "transformers_compiled" and saved["speedup"] == saved["ours_vs_compiled"]
    # same initial weights and batch: the first losses agree to bf16 precision, against both
    assert summary["first_loss_diff_vs_eager"] < 1e-2 and summary["first_loss_diff_vs_compiled"] < 1e-2


def test_smoke_run_of_the_qwen2_family(tmp_path):
    """A q/k/v-bias, tied-head decoder is measured against transformers' Qwen2ForCausalLM with the same weights."""
    summary = bench_llama_train.main(["--smoke", "--config", "tiny-qwen2", "--steps", "1", "--warmup", "0",
                                      "--compile-hf", "eager", "--out", str(tmp_path / "bench.json")])
    assert set(summary["results"]) == {"transformers_eager", "ours"} and "ours_vs_compiled" not in summary
    assert summary["peer"] == "transformers_eager" and summary["first_loss_diff"] < 1e-2 and not summary["goal_met"]


def test_loss_and_chunk_variants_and_profile(tmp_path):
    """--loss and --chunk lists give one 'ours' row each (the first is the headline), all on the same weights and
    batch; --profile profiles one more step of each and keeps its summary (on the CPU: the table only)."""
    summary = bench_llama_train.main(["--smoke", "--steps", "1", "--warmup", "0", "--compile-hf", "off",
                                      "--loss", "fused,fused-torch", "--chunk", "64,16", "--profile",
                                      "--out", str(tmp_path / "bench.json")])
    rows = summary["results"]
    assert set(rows) == {"transformers_eager", "ours", "ours[compile=none,loss=fused,chunk=16]",
                         "ours[compile=none,loss=fused-torch,chunk=64]", "ours[compile=none,loss=fused-torch,chunk=16]"}
    assert rows["ours"]["loss"] == "fused" and rows["ours"]["chunk"] == 64 and rows["ours"]["profile"] == {}
    first = {r["first_loss"] for name, r in rows.items() if name.startswith("ours")}
    assert max(first) - min(first) < 1e-3  # the chunking and the loss's implementation change no loss
    with pytest.raises(SystemExit):
        bench_llama_train.parse_args(["--loss", "fused,bogus"])
    with pytest.raises(SystemExit):
        bench_llama_train.parse_args(["--chunk", "4k"])


def test_fp8_row_and_its_loss_curve(tmp_path):
    """--fp8: ours with float8 matmuls as its own row on the same weights and batch, its loss curve against ours."""
    summary = bench_llama_train.main(["--smoke", "--steps", "4", "--warmup", "0", "--skip-hf", "--fp8",
                                      "--out", str(tmp_path / "bench.json")])
    rows = summary["results"]
    assert set(rows) == {"ours", "ours[fp8]"} and rows["ours[fp8]"]["fp8"] and not rows["ours"]["fp8"]
    assert len(rows["ours[fp8]"]["losses"]) == len(rows["ours"]["losses"]) == 4
    assert summary["fp8_vs_ours"] > 0 and summary["fp8_memory_vs_ours"] > 0
    assert summary["fp8_loss_max_abs_diff"] < 0.05 and summary["fp8_last_loss_rel_diff"] < 0.01
    assert rows["ours[fp8]"]["losses"] != rows["ours"]["losses"]  # float8 really ran
