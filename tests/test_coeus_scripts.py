"""The long-sequence scripts on tiny sizes (CPU): they run, write their files, and their checks pass."""
import csv
import json

import pytest
import torch

import stress_test_massive
import test_infinite_context
from benchmarks import bench_gla_kernel


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.mark.parametrize("mode", ["step", "prefill"])
def test_infinite_context_tiny(tmp_path, mode, capsys):
    test_infinite_context.main(["--config", "tiny", "--tokens", "256", "--check-tokens", "100", "--mode", mode,
                                "--segment", "32", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "infinite_context.json").read_text())
    assert all(res["checks"].values()) and res["logit_rel_err"] <= 1e-4
    out = capsys.readouterr().out
    assert "KV cache for 256 tokens" in out and "all checks passed" in out


def test_stress_sweep_tiny(tmp_path):
    # one subprocess per point on CPU; a bad mode is recorded as an error and the sweep goes on
    stress_test_massive.main(["--config", "tiny", "--lengths", "64", "--modes", "parallel,nosuchmode",
                              "--repeats", "1", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "stress.csv")))
    assert [(r["mode"], r["T"]) for r in rows] == [("parallel", "64"), ("nosuchmode", "64")]
    assert float(rows[0]["seconds"]) > 0 and float(rows[0]["peak_mib"]) > 0 and rows[1]["seconds"] == "error"
    assert (tmp_path / "stress.png").is_file()


def test_stress_point_in_process():
    args = stress_test_massive.parse_args(["--config", "tiny", "--repeats", "1", "--step-tokens", "5"])
    for mode in ("parallel", "prefill", "step", "llama"):
        row = stress_test_massive.measure(mode, 70, args, "cpu", torch.float32)
        assert row["seconds"] > 0, mode


def test_kernel_bench_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["bench", "--smoke", "--out", str(tmp_path)])
    bench_gla_kernel.main()
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["T"] for r in rows] == [256, 512] and all(r["ours_c64_ms"] > 0 for r in rows)
