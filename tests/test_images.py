"""The one image reader / writer: formats, depths, channels, orientation, broken files."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from drsformer_jax.utils import images
from drsformer_jax.utils.images import (
    ImageReadError,
    probe_size,
    read_image,
    read_rgb8,
    write_image,
)

RNG = np.random.default_rng(0)


def ramp16(h, w, c):
    """16-bit values whose low bytes matter (Pillow's 8-bit reading would lose them)."""
    return RNG.integers(0, 65536, (h, w, c)).astype(np.uint16)


# --- an independent 16-bit PNG encoder: every filter type, optional Adam7 ----------------


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _filter_rows(data, bpp, kinds):
    """PNG filtering written straight from the spec, byte by byte (slow, obviously right)."""
    h, n = data.shape
    out = bytearray()
    for y in range(h):
        kind = kinds[y % len(kinds)]
        out.append(kind)
        for i in range(n):
            a = int(data[y, i - bpp]) if i >= bpp else 0
            b = int(data[y - 1, i]) if y > 0 else 0
            c = int(data[y - 1, i - bpp]) if y > 0 and i >= bpp else 0
            pred = [0, a, b, (a + b) // 2, _paeth(a, b, c)][kind]
            out.append((int(data[y, i]) - pred) % 256)
    return bytes(out)


def encode_png16(arr, kinds=(0, 1, 2, 3, 4), interlace=False, exif=None):
    h, w, c = arr.shape
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    big = arr.astype(">u2").view(np.uint8).reshape(h, w, 2 * c)
    if interlace:
        passes = [(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2),
                  (0, 1, 2, 2), (1, 0, 2, 1)]
        raw = b""
        for y0, x0, dy, dx in passes:
            sub = big[y0::dy, x0::dx]
            if sub.size:
                raw += _filter_rows(sub.reshape(sub.shape[0], -1), 2 * c, kinds)
    else:
        raw = _filter_rows(big.reshape(h, -1), 2 * c, kinds)

    def chunk(tag, payload):
        return (struct.pack(">I", len(payload)) + tag + payload
                + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, int(interlace))
    extra = chunk(b"eXIf", exif) if exif is not None else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("interlace", [False, True])
def test_16bit_png_all_filters(tmp_path, channels, interlace):
    arr = ramp16(11, 9, channels)
    path = tmp_path / "a.png"
    path.write_bytes(encode_png16(arr, interlace=interlace))
    got = read_image(path)
    assert got.dtype == np.uint16 and got.shape == (11, 9, channels)
    assert np.array_equal(got, arr)
    assert probe_size(path) == (11, 9)


def test_16bit_gray_png_matches_pillow(tmp_path):
    # Pillow writes 16-bit gray with its own adaptive filters and reads it in full.
    arr = np.cumsum(RNG.integers(0, 900, (23, 31)), axis=1).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "g.png")
    got = read_image(tmp_path / "g.png")
    assert np.array_equal(got[:, :, 0], np.asarray(Image.open(tmp_path / "g.png")))


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_write_read_round_trip(tmp_path, channels, dtype):
    arr = ramp16(7, 5, channels)
    arr = arr if dtype == np.uint16 else (arr >> 8).astype(np.uint8)
    write_image(tmp_path / "x.png", arr)
    got = read_image(tmp_path / "x.png")
    assert got.dtype == dtype and np.array_equal(got, arr)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary left behind


def test_16bit_colour_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    arr = ramp16(9, 13, 3)
    tifffile.imwrite(tmp_path / "c.tif", arr, photometric="rgb")
    tifffile.imwrite(tmp_path / "z.tiff", arr, photometric="rgb", compression="zlib")
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(arr, -1, 0), photometric="rgb",
                     planarconfig="separate")
    for name in ("c.tif", "z.tiff", "p.tif"):
        got = read_image(tmp_path / name)
        assert got.dtype == np.uint16 and np.array_equal(got, arr), name
        assert probe_size(tmp_path / name) == (9, 13)


def test_16bit_gray_tiff(tmp_path):
    arr = ramp16(6, 4, 1)[:, :, 0]
    Image.fromarray(arr).save(tmp_path / "g.tif")
    got = read_image(tmp_path / "g.tif")
    assert got.dtype == np.uint16 and np.array_equal(got[:, :, 0], arr)


def test_channels_of_8bit_kinds(tmp_path):
    rgb = RNG.integers(0, 256, (6, 8, 3)).astype(np.uint8)
    la = RNG.integers(0, 256, (6, 8, 2)).astype(np.uint8)
    Image.fromarray(la).save(tmp_path / "la.png")
    assert np.array_equal(read_image(tmp_path / "la.png"), la)

    pal = Image.fromarray(rgb).quantize(8)
    pal.save(tmp_path / "p.png")
    got = read_image(tmp_path / "p.png")
    assert got.shape == (6, 8, 3) and np.array_equal(got, np.asarray(pal.convert("RGB")))
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pt.png", transparency=0)
    got = read_image(tmp_path / "pt.png")
    assert got.shape == (6, 8, 4)
    assert set(np.unique(got[:, :, 3])) <= {0, 255} and (got[:, :, 3] == 0).any()

    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "g.jpg")
    assert read_image(tmp_path / "g.jpg").shape == (6, 8, 1)
    Image.fromarray(rgb).save(tmp_path / "a.bmp")
    assert np.array_equal(read_image(tmp_path / "a.bmp"), rgb)
    Image.fromarray(rgb).save(tmp_path / "a.webp", lossless=True)
    assert np.array_equal(read_image(tmp_path / "a.webp"), rgb)
    Image.fromarray(rgb).convert("1").save(tmp_path / "b.png")
    assert read_image(tmp_path / "b.png").shape == (6, 8, 1)


def test_read_rgb8_of_every_kind(tmp_path):
    la = RNG.integers(0, 256, (4, 5, 2)).astype(np.uint8)
    write_image(tmp_path / "la.png", la)
    assert np.array_equal(read_rgb8(tmp_path / "la.png"), np.repeat(la[:, :, :1], 3, axis=2))
    arr = ramp16(4, 5, 4)
    write_image(tmp_path / "c.png", arr)
    want = np.round(arr[:, :, :3] / 257.0).astype(np.uint8)
    assert np.array_equal(read_rgb8(tmp_path / "c.png"), want)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_pillow(tmp_path, orientation):
    rgb = RNG.integers(0, 256, (5, 8, 3)).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    for name in ("o.png", "o.jpg", "o.tif", "o.webp"):
        Image.fromarray(rgb).save(tmp_path / name, exif=exif)
        want = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / name)))
        got = read_image(tmp_path / name)
        assert np.array_equal(got, want), name
        assert probe_size(tmp_path / name) == got.shape[:2], name
    if orientation != 1:
        assert got.shape[:2] == ((8, 5) if orientation >= 5 else (5, 8))
    # The 16-bit PNG decoder honours an eXIf chunk the same way.
    arr = ramp16(5, 8, 3)
    (tmp_path / "o16.png").write_bytes(encode_png16(arr, exif=exif.tobytes()))
    got16 = read_image(tmp_path / "o16.png")
    assert np.array_equal(got16, images.apply_orientation(arr, orientation))
    assert probe_size(tmp_path / "o16.png") == got16.shape[:2]


def _png8(tmp_path):
    Image.fromarray(RNG.integers(0, 256, (40, 40, 3)).astype(np.uint8)).save(tmp_path / "ok.png")
    return (tmp_path / "ok.png").read_bytes()


@pytest.mark.parametrize("case", ["truncated8", "truncated16", "text", "empty", "missing",
                                  "bad_crc16"])
def test_unreadable_files_raise_one_line_naming_the_file(tmp_path, case):
    path = tmp_path / f"{case}.png"
    if case == "truncated8":
        data = _png8(tmp_path)
        path.write_bytes(data[: len(data) // 2])
    elif case == "truncated16":
        data = encode_png16(ramp16(20, 20, 3), kinds=(0,))
        path.write_bytes(data[: len(data) - 40])
    elif case == "bad_crc16":
        data = bytearray(encode_png16(ramp16(4, 4, 3), kinds=(0,)))
        data[40] ^= 0xFF  # inside IDAT
        path.write_bytes(bytes(data))
    elif case == "text":
        path.write_text("this is not an image\n")
    elif case == "empty":
        path.write_bytes(b"")
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    if case == "empty":
        assert "empty file" in message


def test_probe_rejects_non_images(tmp_path):
    (tmp_path / "t.png").write_text("hello")
    with pytest.raises(ImageReadError, match="t.png"):
        probe_size(tmp_path / "t.png")


def test_write_image_rejects_bad_arrays(tmp_path):
    with pytest.raises(TypeError):
        write_image(tmp_path / "f.png", np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError):
        write_image(tmp_path / "f.png", np.zeros((2, 2, 5), np.uint8))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("orientation", [2, 6, 7])
def test_16bit_tiff_orientation(tmp_path, orientation):
    tifffile = pytest.importorskip("tifffile")
    arr = ramp16(5, 8, 3)
    tifffile.imwrite(tmp_path / "o.tif", arr, photometric="rgb",
                     extratags=[(274, "H", 1, orientation, True)])
    got = read_image(tmp_path / "o.tif")
    assert np.array_equal(got, images.apply_orientation(arr, orientation))
    assert probe_size(tmp_path / "o.tif") == got.shape[:2]


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    write_image(tmp_path / "x.png", np.zeros((3, 3, 3), np.uint8))
    assert (tmp_path / "x.png").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600


def test_unreadable_for_the_file_system_is_one_line(tmp_path, monkeypatch):
    import pathlib

    from drsformer_jax.utils import images

    (tmp_path / "dir.png").mkdir()
    for fn in (read_image, probe_size):
        with pytest.raises(ImageReadError, match=r"dir.png: cannot read \(Is a directory\)$"):
            fn(tmp_path / "dir.png")
    path = tmp_path / "locked.png"
    write_image(path, np.zeros((3, 3, 3), np.uint8))

    # A permission error as the OS raises it (chmod cannot deny root, who runs CI).
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    monkeypatch.setattr(images.Image, "open", denied)
    for fn in (read_image, probe_size):
        with pytest.raises(ImageReadError, match=r"locked.png: cannot read \(Permission"):
            fn(path)
