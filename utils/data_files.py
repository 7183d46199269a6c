"""Reading what a user points the scripts at, so that bad input ends in one clear line and never escapes its folder.

    path = resolve_in_folder(image_folder, entry["image"], f"entry {i}")   # DataError if it leaves the folder
    img = open_image(path)                                                # DataError for any unreadable image

Pillow's decompression-bomb guard stays on: an image whose header claims more than Image.MAX_IMAGE_PIXELS
(about 179 M pixels) is refused like any other unreadable file, before its pixels are decoded.
"""
import os

from PIL import Image

from utils.errors import DataError


def resolve_in_folder(folder, name, what="path"):
    """folder/name as a real path (symlinks followed), refused with a DataError naming `what` if it lies outside
    folder: `../../etc/passwd`, an absolute path, or a symlink out of the folder."""
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, os.fspath(name)))
    if os.path.commonpath([root, path]) != root:
        raise DataError(f"{what}: {name!r} points outside its folder {folder}")
    return path


def open_image(path):
    """Open and fully decode an image (errors surface here, not later in a worker). Any failure -- missing,
    empty, truncated, not an image, a decompression bomb -- is one DataError naming the file and the reason."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"cannot read image {path} (decompression bomb: {e})") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ... for bad files
        raise DataError(f"cannot read image {path} ({type(e).__name__}: {e})") from None


def skip_reason(err):
    """The short reason a counted skip records (the DataError's text after the file name)."""
    msg = str(err)
    return msg[msg.index("(") + 1:-1] if "(" in msg and msg.endswith(")") else msg
