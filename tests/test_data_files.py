"""utils/data_files.py: every unreadable image is one DataError naming the file; no data path leaves its folder."""
import os

import pytest

from tests.bad_files import png_bytes, write_bad_images
from utils.data_files import open_image, resolve_in_folder
from utils.errors import DataError


def test_open_image_reads_a_good_image_and_names_every_bad_one(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes((5, 7)))
    assert open_image(good).size == (5, 7)
    reasons = {"missing": "image not found", "zero": "cannot read image", "truncated": "cannot read image",
               "text": "cannot read image", "bomb": "decompression bomb"}
    for kind, path in write_bad_images(tmp_path / "bad").items():
        with pytest.raises(DataError) as e:
            open_image(path)
        msg = str(e.value)
        assert str(path) in msg and reasons[kind] in msg and "\n" not in msg, (kind, msg)


def test_paths_stay_inside_their_folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(png_bytes())
    (tmp_path / "secret.txt").write_text("no")
    assert resolve_in_folder(root, "sub/a.png") == os.path.realpath(root / "sub" / "a.png")
    assert resolve_in_folder(root, "sub/../sub/a.png").endswith("a.png")
    os.symlink(root / "sub" / "a.png", root / "inside.png")          # a link within the folder is fine
    assert resolve_in_folder(root, "inside.png").endswith(os.path.join("sub", "a.png"))
    os.symlink(tmp_path / "secret.txt", root / "leak.png")            # a link out of it is not
    for name in ("../secret.txt", "../../../../etc/passwd", "/etc/passwd", "leak.png"):
        with pytest.raises(DataError, match="points outside its folder") as e:
            resolve_in_folder(root, name, "entry 3")
        assert str(e.value).startswith("entry 3: ")
