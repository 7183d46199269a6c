"""Running Triton kernels on the CPU in tests: Triton's interpreter, in a fresh Python (TRITON_INTERPRET is read
when a kernel is defined, so it cannot be switched on inside the test process)."""
import os
import subprocess
import sys
import textwrap

import pytest

from kernels.launch import triton_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_triton = pytest.mark.skipif(not triton_available(), reason="needs Triton (its interpreter runs the kernels "
                                  "on the CPU)")


def run_in_interpreter(script):
    """Run a Python script (dedented) with TRITON_INTERPRET=1 from the repository root; returns its stdout."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout
