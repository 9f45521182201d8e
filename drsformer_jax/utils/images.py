"""The project's one image reader and writer.

Everything that touches image files (derain, score, the input pipeline's folder
checks, the synthetic data set) goes through here, so that every tool sees the
same pixels for the same file.

What `read_image` gives, by kind of file:

- 8-bit RGB / RGBA / gray / gray+alpha: as stored (C = 3, 4, 1, 2), uint8.
- Palette images: RGB, or RGBA when they have transparency. Bilevel: gray uint8.
  CMYK, YCbCr and the like: RGB uint8.
- 16-bit PNGs (every colour type): uint16, decoded here (`_decode_png16`),
  because Pillow keeps only the high byte of 16-bit colour PNGs.
- 16-bit colour TIFFs (2 or more samples): uint16 through `tifffile`, for the
  same reason; 16-bit gray TIFFs and PNGs are read by Pillow.
- EXIF orientation (JPEG, PNG, TIFF, WebP) is applied, so the array is the
  image as a viewer shows it.

A file that cannot be decoded raises ImageReadError with one line naming it.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from drsformer_jax.utils.files import IMAGE_EXTENSIONS, is_image_file, write_bytes_atomic

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "from_float", "is_image_file", "png_header",
           "probe_size", "read_image", "read_rgb8", "to_float", "write_image"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ORIENTATION_TAG = 0x0112
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel
# Adam7 passes: (first row, first column, row step, column step).
_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2),
          (0, 1, 2, 2), (1, 0, 2, 1))


class ImageReadError(ValueError):
    """A file that is not a readable image; the message names the file."""


def png_header(data: bytes) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk; None if `data` is not a PNG."""
    # Signature, then the IHDR chunk: length, type, width, height, bit depth, colour type.
    if data[:8] != PNG_SIGNATURE or len(data) < 26 or data[12:16] != b"IHDR":
        return None
    return data[24], data[25]


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image as an HxWxC array, C in {1, 2, 3, 4}, dtype uint8 or uint16.

    C = 1 is gray, 2 gray + alpha, 3 RGB, 4 RGBA. EXIF orientation is applied.
    Raises ImageReadError (one line naming the file) when the file cannot be
    decoded: missing, empty, truncated, corrupt or not an image at all.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise ImageReadError(f"{path}: no such file") from e
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read ({e.strerror or e})") from e
    if not data:
        raise ImageReadError(f"{path}: empty file")
    try:
        if _is_png16(data):
            arr, orientation = _decode_png16(data)
        else:
            arr, orientation = _decode_with_pillow(data)
    except UnidentifiedImageError as e:
        raise ImageReadError(f"{path}: not a readable image (unknown format)") from e
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{path}: too large for Pillow's safety limit ({_short(e)})") from e
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error) as e:
        raise ImageReadError(f"{path}: not a readable image ({_short(e)})") from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(apply_orientation(arr, orientation))


def probe_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of the image as `read_image` will return it, from the header only.

    Cheap (nothing is decoded), so a folder can be planned before it is read; a
    file that is not an image at all raises ImageReadError, but one that is
    truncated after its header is only found out by `read_image`.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            if im.format == "TIFF":
                orientation = 1  # Pillow's TIFF size is the turned one already
            else:
                # Orientation is read only where it is in the header: asking Pillow for
                # the EXIF of a PNG whose eXIf chunk follows the pixels decodes them.
                exif = im.getexif() if im.format != "PNG" or "exif" in im.info else {}
                orientation = exif.get(_ORIENTATION_TAG, 1)
    except FileNotFoundError as e:
        raise ImageReadError(f"{path}: no such file") from e
    except UnidentifiedImageError as e:
        what = "empty file" if path.stat().st_size == 0 else "not a readable image (unknown format)"
        raise ImageReadError(f"{path}: {what}") from e
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{path}: too large for Pillow's safety limit ({_short(e)})") from e
    except OSError as e:
        if e.errno is not None:  # the file system's error (permissions, a folder, ...)
            raise ImageReadError(f"{path}: cannot read ({e.strerror or e})") from e
        raise ImageReadError(f"{path}: not a readable image ({_short(e)})") from e
    except (SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageReadError(f"{path}: not a readable image ({_short(e)})") from e
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def read_rgb8(path: str | os.PathLike) -> np.ndarray:
    """Reads an image as HxWx3 uint8 RGB (what the release's cv2-based reader gives).

    Gray is repeated into three channels, alpha dropped, 16 bits rounded to 8.
    """
    arr = read_image(path)
    if arr.dtype == np.uint16:
        arr = np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
    if arr.shape[2] in (1, 2):
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
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
    """Writes HxWxC (C in {1, 2, 3, 4}) uint8 or uint16 pixels as PNG, atomically.

    The file appears complete or not at all, so an interrupted run never leaves
    a truncated output behind.
    """
    path = Path(path)
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"{path}: expected HxWxC pixels with C in 1..4, got {arr.shape}")
    if arr.dtype == np.uint16:
        # Pillow writes 16-bit gray only; a small encoder does every colour type.
        data = _encode_png16(arr)
    elif arr.dtype == np.uint8:
        buf = io.BytesIO()
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise TypeError(f"{path}: expected uint8 or uint16 pixels, got {arr.dtype}")
    write_bytes_atomic(path, data)


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """The HxWxC image as displayed for an EXIF orientation value (1..8).

    The same transforms as Pillow's ImageOps.exif_transpose, on arrays of any
    dtype; values outside 1..8 are treated as 1 (no transform).
    """
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return arr.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(arr, -1)
    if orientation == 7:
        return arr.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(arr, 1)
    return arr


# --- decoding ----------------------------------------------------------------------


def _decode_with_pillow(data: bytes) -> tuple[np.ndarray, int]:
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "TIFF" and _is_tiff16_colour(im):
            return _decode_tiff16(data), int(im.tag_v2.get(_ORIENTATION_TAG, 1) or 1)
        im.load()
        # Read after loading: Pillow turns TIFFs itself as it decodes them, and then
        # drops their orientation tag.
        orientation = int(im.getexif().get(_ORIENTATION_TAG, 1) or 1)
        return _to_array(im), orientation


def _to_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        # 16-bit gray may open as 32-bit 'I'; its values fit in uint16.
        arr = np.asarray(im)
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError(f"32-bit integer pixels out of 16-bit range in mode {mode}")
        return arr.astype(np.uint16)
    if mode in ("RGB", "RGBA", "L", "LA"):
        return np.asarray(im)
    if mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB" if mode != "1" else "L"))
    if mode in ("P", "PA"):
        has_alpha = "transparency" in im.info or mode == "PA"
        return np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
    if mode == "F":
        raise ValueError("floating-point images are not supported")
    return np.asarray(im.convert("RGB"))


def _is_tiff16_colour(im: Image.Image) -> bool:
    bits = im.tag_v2.get(258, (8,))  # BitsPerSample
    bits = bits if isinstance(bits, tuple) else (bits,)
    samples = int(im.tag_v2.get(277, 1))  # SamplesPerPixel
    return samples > 1 and max(bits) == 16


def _decode_tiff16(data: bytes) -> np.ndarray:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        arr = page.asarray()
        axes = page.axes
    if axes.endswith("SYX") or (axes.startswith("S") and arr.ndim == 3):
        arr = np.moveaxis(arr, 0, -1)  # planar configuration "separate"
    if arr.ndim != 3 or arr.shape[2] < 2 or arr.dtype != np.uint16:
        raise ValueError(f"unsupported 16-bit TIFF layout {axes} {arr.shape} {arr.dtype}")
    # Extra samples beyond RGBA (rare) are dropped; gray + alpha stays 2 channels.
    return arr[:, :, :4] if arr.shape[2] != 3 else arr


def _is_png16(data: bytes) -> bool:
    header = png_header(data)
    return header is not None and header[0] == 16


def _decode_png16(data: bytes) -> tuple[np.ndarray, int]:
    """A 16-bit PNG -> (HxWxC uint16, EXIF orientation). tRNS colour keys are ignored."""
    pos, idat, header, orientation = 8, [], None, 1
    while True:
        if pos + 8 > len(data):
            raise ValueError("truncated PNG (no IEND chunk)")
        (length,), tag = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        payload = data[pos + 8:pos + 8 + length]
        crc = data[pos + 8 + length:pos + 12 + length]
        if len(payload) != length or len(crc) != 4:
            raise ValueError("truncated PNG")
        if struct.unpack(">I", crc)[0] != zlib.crc32(tag + payload) & 0xFFFFFFFF:
            raise ValueError(f"broken PNG ({tag.decode('latin-1')} chunk fails its CRC)")
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", payload)
        elif tag == b"IDAT":
            idat.append(payload)
        elif tag == b"eXIf":
            exif = Image.Exif()
            exif.load(payload)
            orientation = int(exif.get(_ORIENTATION_TAG, 1) or 1)
        elif tag == b"IEND":
            break
        pos += 12 + length
    width, height, depth, colour, compression, filtering, interlace = header
    if colour not in _PNG_CHANNELS or compression or filtering or interlace > 1:
        raise ValueError(f"unsupported PNG header (colour type {colour}, interlace {interlace})")
    channels = _PNG_CHANNELS[colour]
    bpp = 2 * channels  # bytes per pixel
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    out = np.zeros((height, width * bpp), np.uint8)
    offset = 0
    for y0, x0, dy, dx in passes:
        h, w = -(-(height - y0) // dy), -(-(width - x0) // dx)
        if h <= 0 or w <= 0:
            continue  # an empty pass has no bytes at all, not even filter types
        size = h * (1 + w * bpp)
        if offset + size > raw.size:
            raise ValueError("truncated PNG (image data ends early)")
        rows = _unfilter(raw[offset:offset + size].reshape(h, 1 + w * bpp), bpp)
        out.reshape(height, width, bpp)[y0::dy, x0::dx] = rows.reshape(h, w, bpp)
        offset += size
    arr = out.view(">u2").reshape(height, width, channels).astype(np.uint16)
    return arr, orientation


def _unfilter(rows: np.ndarray, bpp: int) -> np.ndarray:
    """Undoes PNG's per-row filters (None, Sub, Up, Average, Paeth).

    Byte (y, x) of a pixel depends on the same byte of its left, upper and
    upper-left neighbours, so all bytes on one anti-diagonal y + x = d are
    independent: the loop runs over the h + w - 1 diagonals, each step vectorised
    over the diagonal's pixels and their bytes, whatever mix of filters the rows use.
    """
    h = rows.shape[0]
    kinds = rows[:, 0].astype(np.int32)
    if kinds.max(initial=0) > 4:
        raise ValueError(f"broken PNG (unknown row filter {kinds.max()})")
    if not kinds.any():
        return rows[:, 1:]  # filter None everywhere (what write_image writes)
    filt = rows[:, 1:].reshape(h, -1, bpp).astype(np.int32)
    w = filt.shape[1]
    # One row and one column of zeros in front: what the filters see outside the image.
    out = np.zeros((h + 1, w + 1, bpp), np.int32)
    for d in range(h + w - 1):
        y = np.arange(max(0, d - w + 1), min(d, h - 1) + 1)
        x = d - y
        a, b, c = out[y + 1, x], out[y, x + 1], out[y, x]  # left, up, upper-left
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        kind = kinds[y][:, None]
        pred = np.select([kind == 1, kind == 2, kind == 3, kind == 4],
                         [a, b, (a + b) >> 1, paeth], 0)
        out[y + 1, x + 1] = (filt[y, x] + pred) & 0xFF
    return out[1:, 1:].astype(np.uint8).reshape(h, w * bpp)


def _encode_png16(arr: np.ndarray) -> bytes:
    h, w, c = arr.shape
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = arr.astype(">u2").reshape(h, w * c)
    # Filter type 0 (None) on every row: simple, and zlib still compresses well.
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows.view(np.uint8)], axis=1)

    def chunk(tag: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    return (PNG_SIGNATURE + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
