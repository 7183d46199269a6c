"""Broken input files the reliability tests build: what a researcher meets in a real data set."""
import io
import struct
import zlib

from PIL import Image


def png_bytes(size=(8, 8), color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png_bytes(width=100_000, height=100_000):
    """A small valid PNG whose IHDR claims width x height pixels (CRC fixed): Pillow's bomb guard must refuse it."""
    data = bytearray(png_bytes())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length + type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr + 13]))  # over the type and the 13 data bytes
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def write_bad_images(folder):
    """{kind: path} of images that cannot be used: missing, zero bytes, truncated, not an image, a bomb."""
    folder.mkdir(parents=True, exist_ok=True)
    good = png_bytes()
    files = {"zero": b"", "truncated": good[:len(good) // 2], "text": b"just some text, not a picture\n",
             "bomb": bomb_png_bytes()}
    paths = {"missing": folder / "missing.png"}
    for kind, data in files.items():
        paths[kind] = folder / f"{kind}.png"
        paths[kind].write_bytes(data)
    return paths
