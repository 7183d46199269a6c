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
    # by default transformers is measured both eagerly and compiled (on CPU smoke: the aot_eager backend)
    assert set(saved["results"]) == {"transformers_eager", "transformers_compiled", "ours"}
    for name in saved["results"]:
        assert saved["results"][name]["samples_per_s"] > 0 and saved["results"][name]["peak_mem_gb"] > 0
    assert saved["results"]["transformers_compiled"]["compile_error"] is None
    assert saved["ours_vs_compiled"] > 0 and saved["ours_vs_eager"] > 0
    assert saved["peer"] == "transformers_compiled" and saved["speedup"] == saved["ours_vs_compiled"]
    # transformers' initial weights copied into ours, same batch: the first losses agree to bf16 precision; the
    # compiled row starts from the same weights again (not the ones the eager row trained)
    assert saved["first_loss_diff_vs_eager"] < 1e-2 and saved["first_loss_diff_vs_compiled"] < 1e-2


def test_isolated_processes_build_the_same_weights(tmp_path):
    """--isolate on: each model measured in a fresh process; the seeds give both the same weights and batch."""
    out = tmp_path / "bench.json"
    bench_vqa_train.main(["--smoke", "--isolate", "on", "--compile-hf", "eager", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"transformers_eager", "ours"} and saved["peer"] == "transformers_eager"
    assert saved["first_loss_diff"] < 1e-2

