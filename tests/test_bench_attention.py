"""The attention-backend benchmark's whole path runs on the CPU in its smoke mode."""
import sys

import pytest

sys.path.insert(0, "benchmarks")
import bench_attention  # noqa: E402


def test_attention_benchmark_smoke(tmp_path):
    """benchmarks/bench_attention.py times forward + backward of every shape it knows (CPU: tiny shapes, math)."""
    summary = bench_attention.main(["--smoke", "--out", str(tmp_path / "attn.json")])
    assert [r["shape"] for r in summary["results"]] == [s[0] for s in bench_attention.SMOKE_SHAPES]
    for row in summary["results"]:
        assert "error" not in row and row["ms"] > 0 and row["rel_err_vs_fp32"] < 1e-5
    with pytest.raises(SystemExit):
        bench_attention.parse_args(["--variants", "default,bogus"])
