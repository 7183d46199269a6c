"""check_cuda.py runs on a CPU-only machine and --require-cuda fails there.

The torch.compile probe is skipped here (--skip-compile): on a busy 2-core CPU it compiles a C++ kernel for
about a minute; utils.runtime.compile_works is what it calls.
"""
import json
import subprocess
import sys

import pytest
import torch

import check_cuda


def test_json_report_runs(capsys):
    check_cuda.main(["--json", "--skip-compile"])
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["sdpa"]["math"] == "ok"  # the math backend runs everywhere
    for p in info["problems"]:
        assert p["problem"] and p["fix"]  # every problem comes with a fix


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_require_cuda_fails_without_gpu():
    r = subprocess.run([sys.executable, "check_cuda.py", "--require-cuda", "--skip-compile"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "--require-cuda" in r.stderr
    assert "CUDA available: False" in r.stdout and "fix:" in r.stdout
