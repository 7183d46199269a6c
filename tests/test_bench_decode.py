"""benchmarks/bench_decode.py --smoke: every row of the GPU benchmark (transformers eager + dynamic cache and
static cache, greedy and sampled; ours; the measured-bandwidth floor; the float32 prefill-with-cache check;
Coeus) runs on CPU on tiny random models and lands in the JSON."""
import importlib.util
import json

import pytest

pytest.importorskip("transformers")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_decode", "benchmarks/bench_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_smoke_run_writes_every_row(tmp_path):
    out = tmp_path / "b.json"
    load_bench().main(["--smoke", "--out", str(out)])
    r = json.loads(out.read_text())
    for row in ("hf_eager_dynamic", "hf_static_compiled"):
        for name in ("greedy", "sampled"):
            assert r[row][name]["tokens_per_s"] > 0, (row, name)
    assert r["hf_static_compiled"]["cache"] == "static" and r["hf_static_compiled"]["compiled"] is False  # CPU
    assert r["hf_static_compiled"]["child_wall_s"] > 0  # the static row ran in its own process
    assert r["ours"]["tokens_per_s"] > 0 and r["coeus"]["tokens_per_s"] > 0
    for key in ("ours_vs_static_compiled_sampled", "ours_vs_static_compiled_greedy", "ours_vs_eager_dynamic_sampled",
                "ours_vs_eager_dynamic_greedy", "startup_s", "wall_s", "fraction_of_floor"):
        assert r[key] > 0, key
    # the floor: a bandwidth measured in this run over the bytes a token reads (weights but the embedding table,
    # plus the KV cache at the mean context)
    assert r["bandwidth_source"] == "measured" and r["bandwidth_measured_tbs"] > 0
    assert r["bytes_read_per_token"] == r["weight_bytes_read_per_token"] + r["kv_bytes_read_per_token"]
    assert r["weight_bytes_read_per_token"] < r["weight_bytes"]
    assert r["floor_tokens_per_s"] == pytest.approx(r["bandwidth_tbs"] * 1e12 / r["bytes_read_per_token"])
    assert r["fp32_prefill_with_cache"]["ok"], r["fp32_prefill_with_cache"]
    assert r["coordinate_descent"] is False and r["compile_caches"]["fx_graph_cache"] is True
    assert r["first_logits_max_abs_diff_vs_ours"] < 1e-4


def test_variants_of_our_decode_step_in_one_run(tmp_path):
    # --gemv both --gemv-prefetch both: without the kernels, with them but W read after the PDL wait, and with
    # both, each its own row, the ratios against ours (on this CPU the kernels fall back to nn.Linear)
    out = tmp_path / "b.json"
    load_bench().main(["--smoke", "--skip-hf", "--coeus-config", "", "--gemv", "both", "--gemv-prefetch", "both",
                       "--out", str(out)])
    r = json.loads(out.read_text())
    assert (r["ours_no_gemv"]["gemv"], r["ours_no_prefetch"]["gemv"], r["ours"]["gemv"]) == (False, True, True)
    assert (r["ours_no_prefetch"]["gemv_prefetch"], r["ours"]["gemv_prefetch"]) == (False, True)
    assert r["gemv_speedup"] > 0 and r["prefetch_speedup"] > 0


def test_a_dying_static_child_is_a_row_error_not_a_lost_run(monkeypatch):
    """The static-cache compiled peer has segfaulted under CUDA graphs; in its child process a death is a row."""
    import argparse
    import signal
    import subprocess
    bench = load_bench()
    args = argparse.Namespace(argv=["--smoke"], hf_static_timeout=60)
    real_run = subprocess.run

    def killed(cmd, **kw):  # the child dies by SIGSEGV, as it did on the H200
        return real_run([bench.sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(signal.SIGSEGV)})"],
                        **kw)
    monkeypatch.setattr(subprocess, "run", killed)
    row = bench.time_hf_static_in_child(args, 0.0)
    assert row["error"].startswith(f"child process died (signal {int(signal.SIGSEGV)})"), row


def test_help_names_the_peers(capsys):
    with pytest.raises(SystemExit):
        load_bench().main(["--help"])
    text = capsys.readouterr().out
    assert 'cache_implementation="static"' in text and "reduce-overhead" in text and "--coordinate-descent" in text


def test_fp32_prefill_check_survives_a_non_contiguous_sdpa_output(monkeypatch):
    """CUDA's float32 SDPA kernels return (B, H, T, D) as a transpose of a (B, T, H, D) buffer: the grouped-query
    prefill must not .view it (the crash the check in the benchmark guards). Emulated on CPU."""
    import torch
    import torch.nn.functional as F
    sdpa = F.scaled_dot_product_attention

    def transposed_layout(*a, **kw):
        y = sdpa(*a, **kw)
        return y.transpose(1, 2).contiguous().transpose(1, 2)  # same values, CUDA's memory layout

    monkeypatch.setattr(F, "scaled_dot_product_attention", transposed_layout)
    assert not transposed_layout(*(torch.randn(1, 2, 6, 4),) * 3).is_contiguous()
    chk = load_bench().fp32_prefill_with_cache_check("tiny", 9, "cpu")
    assert chk["ok"] and chk["error"] is None, chk
