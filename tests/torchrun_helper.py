"""Launch a script under torchrun on CPU/gloo for the distributed tests."""
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT_CLASH = ("eaddrinuse", "address already in use")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, args, nproc=2, timeout=300, attempts=3):
    """Run `python -m torch.distributed.run script *args` with nproc processes; returns the CompletedProcess.

    The free port is picked before torchrun binds it, so another process may take it in between (seen on a
    loaded CI box): only that failure is retried, with a new port."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    for attempt in range(attempts):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", os.path.join(ROOT, script), *map(str, args)]
        p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        clash = any(m in (p.stdout + p.stderr).lower() for m in PORT_CLASH)
        if p.returncode == 0 or not clash:
            break
    assert p.returncode == 0, f"torchrun {script} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p
