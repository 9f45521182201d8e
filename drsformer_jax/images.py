"""The project's one image reader and writer.

Everything that touches image files (derain, score, the input pipeline's folder
checks, the synthetic data set) goes through here, so that every tool sees the
same pixels for the same file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(ValueError):
    """A file that is not a readable image; the message names the file."""


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image as an HxWxC array, C in {1, 3, 4}, dtype uint8 or uint16.

    EXIF orientation is applied. Palette and bilevel images become RGB(A) / gray
    uint8. Raises ImageReadError (one line naming the file) when the file cannot
    be decoded.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            arr = _to_array(im)
    except FileNotFoundError as e:
        raise ImageReadError(f"{path}: no such file") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: not a readable image ({_short(e)})") from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def read_rgb8(path: str | os.PathLike) -> np.ndarray:
    """Reads an image as HxWx3 uint8 RGB (what the release's cv2-based reader gives)."""
    arr = read_image(path)
    if arr.dtype == np.uint16:
        arr = np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def to_float(arr: np.ndarray) -> np.ndarray:
    """uint8 / uint16 -> float32 in [0, 1]."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    raise TypeError(f"expected uint8 or uint16 pixels, got {arr.dtype}")


def from_float(x: np.ndarray, dtype: np.dtype = np.uint8) -> np.ndarray:
    """float in [0, 1] -> uint8 / uint16, clipped and rounded half to even.

    This is skimage's img_as_ubyte conversion, which the release's test.py uses.
    """
    peak = np.iinfo(dtype).max
    return np.rint(np.clip(np.asarray(x, np.float64), 0.0, 1.0) * peak).astype(dtype)


def write_image(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Writes HxWxC (C in {1, 3, 4}) uint8 or uint16 pixels as PNG, atomically.

    The file appears complete or not at all, so an interrupted run never leaves
    a truncated output behind.
    """
    path = Path(path)
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.dtype == np.uint16:
        if arr.ndim != 2:
            # Pillow cannot write 16-bit colour PNGs; a small encoder does.
            data = _encode_png16(arr)
        else:
            data = None
            image = Image.fromarray(arr.astype(np.uint16), mode="I;16")
    elif arr.dtype == np.uint8:
        data = None
        image = Image.fromarray(arr)
    else:
        raise TypeError(f"{path}: expected uint8 or uint16 pixels, got {arr.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if data is not None:
                f.write(data)
            else:
                image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _to_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        # 16-bit PNGs open as 32-bit 'I'; their values fit in uint16.
        arr = np.asarray(im)
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError(f"32-bit integer pixels out of 16-bit range in mode {mode}")
        return arr.astype(np.uint16)
    if mode in ("RGB", "RGBA", "L"):
        im.load()
        return np.asarray(im)
    if mode == "LA":
        return np.asarray(im.convert("RGBA"))
    if mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB" if mode != "1" else "L"))
    if mode in ("P", "PA"):
        has_alpha = "transparency" in im.info or mode == "PA"
        return np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
    if mode == "F":
        raise ValueError("floating-point images are not supported")
    return np.asarray(im.convert("RGB"))


def _encode_png16(arr: np.ndarray) -> bytes:
    import struct
    import zlib

    h, w, c = arr.shape
    color_type = {3: 2, 4: 6}[c]
    rows = arr.astype(">u2").reshape(h, w * c)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))

    def chunk(tag: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
