"""derain at scale: tiles, buckets, batches, the compilation cache and awkward inputs.

The tiling and bucketing logic is checked against independent NumPy references
with a cheap fake model; the CLI runs a tiny real DRSformer on a folder of every
awkward kind of file. The CLI tests share one persistent compilation cache so
each image size compiles once per session (compiles dominate on CPU).
"""

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from drsformer_jax import derain, inference
from drsformer_jax.inference import photos
from drsformer_jax.utils.images import ImageReadError, read_image, write_image

RNG = np.random.default_rng(1)


# --- an independent reference of the release's tiled test ------------------------------


def release_tiled(fn, img, tile, overlap):
    """test.py's tile loop, written out from the spec: pad to 8, tiles, sum / count, clamp."""
    h, w = img.shape[:2]
    ph = (8 - h % 8) % 8
    pw = (8 - w % 8) % 8
    x = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="reflect")
    H, W = x.shape[:2]
    t = min(tile, H, W)
    stride = t - overlap
    hs = list(range(0, H - t, stride)) + [H - t]
    ws = list(range(0, W - t, stride)) + [W - t]
    E = np.zeros_like(x)
    Wt = np.zeros_like(x)
    for i in hs:
        for j in ws:
            E[i:i + t, j:j + t] += fn(x[None, i:i + t, j:j + t])[0]
            Wt[i:i + t, j:j + t] += 1
    return np.clip(E / Wt, 0, 1)[:h, :w]


def fake_model(x):
    """Non-local like the real model (a global mean), and leaves [0, 1] so clamping matters."""
    x = np.asarray(x, np.float32)
    return x * 1.3 + x.mean(axis=(1, 2, 3), keepdims=True) - 0.3


@pytest.mark.parametrize("shape,tile,overlap,batch", [
    ((37, 50), 16, 4, 1), ((100, 64), 32, 8, 3), ((64, 200), 48, 32, 2), ((29, 29), 24, 0, 5)])
def test_tiling_matches_release_reference(shape, tile, overlap, batch):
    img = RNG.random((*shape, 3), dtype=np.float32)
    got = inference.restore_tiled(fake_model, img, tile, overlap, batch)
    want = release_tiled(fake_model, img, tile, overlap)
    assert got.shape == want.shape == img.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # Teeth: the tiles' average is not the whole-image result for this model.
    whole = np.clip(fake_model(inference.pad_to_multiple(img)[None])[0][:shape[0], :shape[1]],
                    0, 1)
    assert np.abs(got - whole).max() > 1e-3


def test_tile_covering_the_image_equals_untiled():
    img = RNG.random((30, 27, 3), dtype=np.float32)  # pads to 32x32
    whole = np.clip(fake_model(inference.pad_to_multiple(img)[None])[0][:30, :27], 0, 1)
    for tile in (32, 64, 512):
        np.testing.assert_array_equal(inference.restore_tiled(fake_model, img, tile), whole)


def test_tile_positions():
    assert inference.tile_positions(100, 32, 8) == [0, 24, 48, 68]
    assert inference.tile_positions(64, 64, 32) == [0]
    assert inference.tile_positions(96, 32, 0) == [0, 32, 64]
    # A side smaller than the overlap: the release's stride would be negative and leave
    # pixels uncovered (NaN after the division); the stride becomes tile // 2.
    assert inference.tile_positions(200, 16, 32) == list(range(0, 184, 8)) + [184]
    img = RNG.random((16, 200, 3), dtype=np.float32)
    assert np.isfinite(inference.restore_tiled(fake_model, img, 64, 32)).all()


def test_bucket_rule():
    table = {1: 8, 5: 8, 8: 8, 127: 128, 128: 128, 129: 144, 255: 256, 257: 288, 321: 352,
             481: 512, 1000: 1024, 1025: 1152}
    assert {n: inference.bucket_side(n) for n in table} == table
    sides = np.arange(1, 5000)
    buckets = np.array([inference.bucket_side(int(n)) for n in sides])
    assert (buckets >= sides).all() and (buckets % 8 == 0).all()
    assert (buckets - sides < np.maximum(8, sides / 8)).all()  # grows by < 1/8
    assert len(set(buckets[(sides >= 200) & (sides <= 1000)])) <= 24  # vs 101 multiples of 8


def reflect_index(i, n):
    """Where padded index i reads from along a side of n pixels: reflection without
    repeating the edge, again and again (one pixel: always itself)."""
    if n == 1:
        return 0
    m = i % (2 * (n - 1))
    return m if m < n else 2 * (n - 1) - m


@pytest.mark.parametrize("shape", [(1, 1), (1, 21), (21, 1), (5, 5), (3, 21), (2, 9), (13, 16)])
def test_pad_to_multiple_small_and_thin_images(shape):
    h, w = shape
    img = RNG.random((h, w, 3), dtype=np.float32)
    hp, wp = -(-h // 8) * 8, -(-w // 8) * 8
    want = img[np.array([reflect_index(i, h) for i in range(hp)])][
        :, np.array([reflect_index(j, w) for j in range(wp)])]
    got = inference.pad_to_multiple(img)
    assert got.shape == (hp, wp, 3)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(inference.pad_to_multiple(jnp.asarray(img))), want)
    # Batched, and to a given (bucket) size.
    big = inference.pad_to_multiple(img[None], size=(hp + 8, wp + 16))
    assert big.shape == (1, hp + 8, wp + 16, 3)
    np.testing.assert_array_equal(big[0, :hp, :wp], want)


def test_output_names_are_unique():
    names = photos.output_names([Path(n) for n in (
        "a.jpg", "a.png", "a_png.png", "A.PNG", "b.tif", "c.TIFF", "c.tif")])
    assert names == ["a_jpg.png", "a_png.png", "a_png_2.png", "A_png_3.png", "b.png",
                     "c_tiff.png", "c_tif.png"]
    assert len({n.casefold() for n in names}) == len(names)


# --- Restorer with a cheap jitted fake model ------------------------------------------------


class FakeModel:
    """Stands in for DRSformer: `dim`, `for_platform` and `apply`; records the shapes it
    is compiled for and the platform it was made for."""

    dim = 8

    def __init__(self):
        self.traced = []
        self.platform = None

    def for_platform(self, platform):
        self.platform = platform
        return self

    def apply(self, variables, x):
        self.traced.append(tuple(x.shape))
        return x * variables["a"] + jnp.mean(x, axis=(1, 2, 3), keepdims=True) - variables["b"]


VARIABLES = {"a": jnp.float32(1.3), "b": jnp.float32(0.3)}
NO_LIMIT = 2 ** 50  # bytes: plans that do not depend on this machine's free memory


def fake_reference(img, size):
    x = inference.pad_to_multiple(img, size=size)[None]
    return np.clip(fake_model(x)[0, :img.shape[0], :img.shape[1]], 0, 1)


def test_buckets_group_sizes_and_change_results():
    sizes = [(321, 481), (330, 490), (340, 500), (300, 450)]
    exact = inference.Restorer(FakeModel(), VARIABLES, memory_limit=NO_LIMIT)
    bucketed = inference.Restorer(FakeModel(), VARIABLES, buckets=True, memory_limit=NO_LIMIT)
    assert len({exact.plan(*s).key for s in sizes}) == 4
    assert len({bucketed.plan(*s).key for s in sizes}) == 2  # 352x512 and 320x480
    # Bright at the bottom: the extra reflected rows of the bucket shift the global mean.
    ramp = np.linspace(0, 1, 321, dtype=np.float32)[:, None, None] ** 4
    img = (ramp * 0.8 + RNG.random((321, 481, 3), dtype=np.float32) * 0.2).astype(np.float32)
    plan_b, plan_e = bucketed.plan(321, 481), exact.plan(321, 481)
    assert plan_b.size == (352, 512) and plan_e.size == (328, 488)
    got_b = bucketed.restore([img], plan_b)[0]
    got_e = exact.restore([img], plan_e)[0]
    np.testing.assert_allclose(got_b, fake_reference(img, (352, 512)), atol=1e-6)
    np.testing.assert_allclose(got_e, fake_reference(img, (328, 488)), atol=1e-6)
    # Padding more changes global statistics: bucketing is not exactly the release.
    assert np.abs(got_b - got_e).max() > 1e-3


def test_batches_compile_one_program_per_size():
    model = FakeModel()
    restorer = inference.Restorer(model, VARIABLES, batch_size=4, memory_limit=NO_LIMIT)
    imgs = [RNG.random((13, 21, 3), dtype=np.float32) for _ in range(6)]
    plan = restorer.plan(13, 21)
    assert plan.batch == 4 and plan.size == (16, 24)
    out = restorer.restore(imgs, plan)  # chunks of 4 and 2, both run at batch 4
    assert model.traced == [(4, 16, 24, 3)]
    for img, got in zip(imgs, out, strict=True):
        assert got.shape == img.shape
        np.testing.assert_allclose(got, fake_reference(img, (16, 24)), atol=1e-6)
    restorer.restore(imgs[:3], plan)  # a group of 3 < 4: next power of two, 4 again
    restorer.restore(imgs[:1], plan)  # a lone image: batch 1
    assert model.traced == [(4, 16, 24, 3), (1, 16, 24, 3)]


def test_auto_tiling_when_memory_is_short():
    gib = 2 ** 30
    assert inference.estimate_memory(48, 100, 200, 2, "cpu") == 600 * 48 * 100 * 200 * 2
    assert inference.estimate_memory(48, 100, 200, 1, "tpu") == 200 * 48 * 100 * 200
    assert inference.estimate_memory(48, 100, 200, 1, "cuda") == 260 * 48 * 100 * 200
    need = inference.estimate_memory(FakeModel.dim, 200, 304)
    model = FakeModel()
    roomy = inference.Restorer(model, VARIABLES, memory_limit=need)
    assert model.platform == jax.local_devices()[0].platform  # the device it runs on
    assert roomy.plan(200, 300).tile is None
    limit = inference.estimate_memory(FakeModel.dim, 128, 128)
    short = inference.Restorer(FakeModel(), VARIABLES, memory_limit=limit, batch_size=8)
    plan = short.plan(200, 300)
    assert plan.tile == 128 and plan.size == (128, 128) and plan.batch == 1
    assert "tiling with 128x128 tiles" in plan.note and f"{limit / gib:.1f} GiB" in plan.note
    img = RNG.random((200, 300, 3), dtype=np.float32)
    got = short.restore([img], plan)[0]
    np.testing.assert_allclose(got, release_tiled(fake_model, img, 128, 32), atol=1e-6)
    assert inference.available_memory() is None or inference.available_memory() > 0


def test_explicit_tile_plan():
    restorer = inference.Restorer(FakeModel(), VARIABLES, tile=64, memory_limit=NO_LIMIT)
    assert restorer.plan(200, 300) == inference.Plan((64, 64), 1, 64)
    assert restorer.plan(20, 300).size == (24, 24)  # min(tile, H, W) of the padded size
    with pytest.raises(ValueError):
        inference.Restorer(FakeModel(), VARIABLES, tile=60)


# --- restore_jobs: failures of one job never stop the others ------------------------------------


def test_restore_jobs_reports_failures_and_goes_on(tmp_path):
    restorer = inference.Restorer(FakeModel(), VARIABLES, batch_size=2, memory_limit=NO_LIMIT)
    imgs = {n: RNG.random((9, 10, 3), dtype=np.float32) for n in "abcde"}
    saved = {}

    def job(name, size=(9, 10)):
        def load():
            if name == "b":
                raise ImageReadError("b.png: not a readable image (broken)")
            return imgs[name], name

        def save(out, context):
            if name == "c":
                raise OSError(28, "No space left on device")
            saved[context] = out

        return inference.Job(f"{name}.png", size, load, save)

    # 'e' has a wrong header size: it is re-planned from its pixels.
    jobs = [job(n) for n in "abcd"] + [job("e", (40, 40))]
    done, failures = inference.restore_jobs(restorer, jobs)
    assert done == 3 and sorted(saved) == ["a", "d", "e"]
    assert failures == ["b.png: not a readable image (broken)",
                        "c.png: cannot write the output (No space left on device)"]
    for name in saved:
        np.testing.assert_allclose(saved[name], fake_reference(imgs[name], (16, 16)), atol=1e-6)


class FragileModel(FakeModel):
    """Runs out of memory above `limit` pixels per call, as a device would."""

    limit = 64 * 64

    def apply(self, variables, x):
        if x.shape[0] * x.shape[1] * x.shape[2] > self.limit:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return super().apply(variables, x)


def test_tiled_images_show_per_tile_progress(capsys):
    restorer = inference.Restorer(FakeModel(), VARIABLES, tile=16, memory_limit=NO_LIMIT)
    img = RNG.random((40, 40, 3), dtype=np.float32)
    job = inference.Job("big.png", (40, 40), lambda: (img, None), lambda out, _: None)
    assert inference.restore_jobs(restorer, [job]) == (1, [])
    err = capsys.readouterr().err
    # Overlap 32 >= tile 16: stride 8, origins 0, 8, 16, 24 on each side: 16 tiles.
    assert "tile 1/16" in err and "tile 16/16" in err


def test_out_of_memory_retries_smaller(capsys):
    model = FragileModel()
    restorer = inference.Restorer(model, VARIABLES, batch_size=2, memory_limit=NO_LIMIT)
    imgs = [RNG.random((100, 100, 3), dtype=np.float32) for _ in range(2)]
    saved = {}
    jobs = [inference.Job(f"{k}.png", (100, 100), lambda k=k: (imgs[k], k),
                       lambda out, k: saved.__setitem__(k, out)) for k in range(2)]
    done, failures = inference.restore_jobs(restorer, jobs)
    assert done == 2 and not failures
    # Batch of 2 at 104x104, then 1 at 104x104, then 64x64 tiles.
    assert model.traced == [(1, 64, 64, 3)]
    notes = capsys.readouterr().err  # notes go to stderr
    assert "retrying one at a time" in notes and "retrying with 64x64 tiles" in notes
    for k in range(2):
        np.testing.assert_allclose(saved[k], release_tiled(fake_model, imgs[k], 64, 32),
                                   atol=1e-6)
    # One image per call: the second image goes straight to the tiles that worked.
    restorer = inference.Restorer(FragileModel(), VARIABLES, memory_limit=NO_LIMIT)
    assert inference.restore_jobs(restorer, jobs) == (2, [])
    assert capsys.readouterr().err.count("retrying with 64x64 tiles") == 1
    hopeless = FragileModel()
    hopeless.limit = 0  # nothing fits: the image fails, named, and nothing else breaks
    restorer = inference.Restorer(hopeless, VARIABLES, batch_size=2, memory_limit=NO_LIMIT)
    done, failures = inference.restore_jobs(restorer, jobs[:1])
    assert done == 0 and failures == ["0.png: restoration failed (RESOURCE_EXHAUSTED: Out of "
                                      "memory while trying to allocate)"]


# --- the CLI on a tiny real model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(compilation_cache):
    return compilation_cache  # the worker's (conftest.py): each size compiles once


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from drsformer_jax.checkpoints.weights_dir import save_weights_dir
    from drsformer_jax.model.drsformer import DRSformer, init_params

    model = DRSformer(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 1, 1), use_mefc=False)
    folder = tmp_path_factory.mktemp("tiny") / "weights"
    save_weights_dir(folder, model.config(), init_params(model, 0))
    return folder


def _png16(path, arr):
    write_image(path, arr)  # the writer's encoder; the decoder is tested in test_images.py


def make_awkward_folder(folder):
    """Every awkward kind of input; returns {name: (h, w, channels, dtype)} of the readable."""
    import tifffile

    folder.mkdir()
    u8 = lambda *shape: RNG.integers(0, 256, shape).astype(np.uint8)  # noqa: E731
    u16 = lambda *shape: RNG.integers(0, 65536, shape).astype(np.uint16)  # noqa: E731
    expect = {}
    write_image(folder / "rgb.png", u8(13, 13, 3))
    expect["rgb.png"] = (13, 13, 3, np.uint8)
    _png16(folder / "gray16.png", u16(16, 11, 1))
    expect["gray16.png"] = (16, 11, 1, np.uint16)
    # Two inputs with the stem rgb16: their outputs are rgb16_png.png and rgb16_tif.png.
    _png16(folder / "rgb16.png", u16(11, 14, 3))
    expect["rgb16_png.png"] = (11, 14, 3, np.uint16)
    tifffile.imwrite(folder / "rgb16.tif", u16(12, 15, 3), photometric="rgb")
    expect["rgb16_tif.png"] = (12, 15, 3, np.uint16)
    write_image(folder / "rgba.png", u8(16, 13, 4))
    expect["rgba.png"] = (16, 13, 4, np.uint8)
    write_image(folder / "la.png", u8(10, 10, 2))
    expect["la.png"] = (10, 10, 2, np.uint8)
    Image.fromarray(u8(12, 16, 3)).quantize(16).save(folder / "palette.png", transparency=0)
    expect["palette.png"] = (12, 16, 4, np.uint8)
    Image.fromarray(u8(12, 12)).save(folder / "gray.jpg", quality=95)
    expect["gray.png"] = (12, 12, 1, np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 16 wide x 10 high, shown 10 wide x 16 high
    Image.fromarray(u8(10, 16, 3)).save(folder / "rotated.jpg", exif=exif)
    expect["rotated.png"] = (16, 10, 3, np.uint8)
    Image.fromarray(u8(14, 9, 3)).save(folder / "bitmap.bmp")
    expect["bitmap.png"] = (14, 9, 3, np.uint8)
    Image.fromarray(u8(9, 14, 3)).save(folder / "web.webp", lossless=True)
    expect["web.png"] = (9, 14, 3, np.uint8)
    write_image(folder / "five.png", u8(5, 5, 3))
    expect["five.png"] = (5, 5, 3, np.uint8)
    write_image(folder / "one.png", u8(1, 1, 3))
    expect["one.png"] = (1, 1, 3, np.uint8)
    write_image(folder / "thin.png", u8(3, 21, 3))
    expect["thin.png"] = (3, 21, 3, np.uint8)
    write_image(folder / "row.png", u8(1, 21, 3))  # one row: reflection has nothing to reflect
    expect["row.png"] = (1, 21, 3, np.uint8)
    full = (folder / "rgb.png").read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "text.png").write_text("not an image\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image extension\n")
    return expect


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def awkward_run(tmp_path_factory, tiny_weights, cache_dir):
    base = tmp_path_factory.mktemp("awkward")
    inputs, outputs = base / "in", base / "out"
    expect = make_awkward_folder(inputs)
    before = digest(inputs)
    capture = pytest.MonkeyPatch()
    import io
    import sys

    out, err = io.StringIO(), io.StringIO()
    capture.setattr(sys, "stdout", out)
    capture.setattr(sys, "stderr", err)
    try:
        rc = derain.main(["--checkpoint", str(tiny_weights), "--input", str(inputs),
                          "--output", str(outputs), "--cache-dir", str(cache_dir)])
    finally:
        capture.undo()
    return dict(inputs=inputs, outputs=outputs, expect=expect, before=before, rc=rc,
                out=out.getvalue(), err=err.getvalue())


def test_every_readable_input_gets_an_output_of_its_size_and_kind(awkward_run):
    expect, outputs = awkward_run["expect"], awkward_run["outputs"]
    assert sorted(p.name for p in outputs.iterdir()) == sorted(expect)
    for name, (h, w, c, dtype) in expect.items():
        got = read_image(outputs / name)
        assert got.shape == (h, w, c) and got.dtype == dtype, name


def test_alpha_is_kept_and_gray_stays_gray(awkward_run):
    inputs, outputs = awkward_run["inputs"], awkward_run["outputs"]
    for src, dst in (("rgba.png", "rgba.png"), ("la.png", "la.png"),
                     ("palette.png", "palette.png")):
        a, b = read_image(inputs / src), read_image(outputs / dst)
        np.testing.assert_array_equal(b[:, :, -1], a[:, :, -1])
        assert not np.array_equal(b[:, :, :-1], a[:, :, :-1])  # the colours were derained
    # 16 bits: the output uses the low byte too (not an 8-bit result scaled up).
    assert (read_image(outputs / "rgb16_png.png") % 257 != 0).any()


def test_unreadable_files_are_named_and_the_exit_status_is_1(awkward_run):
    assert awkward_run["rc"] == 1
    err = awkward_run["err"]
    inputs = awkward_run["inputs"]
    for name, why in (("truncated.png", "not a readable image"),
                      ("text.png", "not a readable image (unknown format)"),
                      ("empty.png", "empty file")):
        lines = [line for line in err.splitlines() if line.startswith(f"error: {inputs / name}")]
        assert len(lines) == 1 and why in lines[0], (name, err)
    assert "3 of 18 failed" in err and "Traceback" not in err
    assert "derained 15 of 18 images" in awkward_run["out"]
    # The progress bar, with its rate.
    assert "img/s" in err and "derain: 100%" in err


def test_inputs_are_untouched(awkward_run):
    assert digest(awkward_run["inputs"]) == awkward_run["before"]


def test_tile_covering_the_image_gives_the_untiled_png(awkward_run, tiny_weights, cache_dir,
                                                       tmp_path, capsys):
    hits = []

    def listen(event, **kwargs):
        hits.append(event)

    jax.monitoring.register_event_listener(listen)
    try:
        rc = derain.main(["--checkpoint", str(tiny_weights), "--input",
                          str(awkward_run["inputs"] / "rgb.png"), "--output", str(tmp_path),
                          "--tile", "16", "--cache-dir", str(cache_dir)])
    finally:
        jax.monitoring.unregister_event_listener(listen)
    assert rc == 0
    assert (tmp_path / "rgb.png").read_bytes() == \
        (awkward_run["outputs"] / "rgb.png").read_bytes()
    # The 16x16 program came from the persistent cache written by the first run.
    assert "/jax/compilation_cache/cache_hits" in hits
    assert any(p.name.startswith("jit_drsformer_forward") for p in cache_dir.iterdir())


def test_auto_tiling_note(awkward_run, tiny_weights, cache_dir, tmp_path, capsys):
    rc = derain.main(["--checkpoint", str(tiny_weights), "--input",
                      str(awkward_run["inputs"] / "rgb16.tif"), "--output", str(tmp_path),
                      "--memory-limit", "0.000001", "--cache-dir", str(cache_dir)])
    err = capsys.readouterr().err  # notes go to stderr
    assert rc == 0
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "rgb16.tif" in notes[0] and "tiling with 16x16 tiles" in notes[0]
    assert read_image(tmp_path / "rgb16.png").shape == (12, 15, 3)


def test_output_folder_equal_to_input(tmp_path, tiny_weights, cache_dir, capsys):
    write_image(tmp_path / "x.png", RNG.integers(0, 256, (13, 13, 3)).astype(np.uint8))
    Image.fromarray(RNG.integers(0, 256, (13, 13, 3)).astype(np.uint8)).save(tmp_path / "y.jpg")
    before = digest(tmp_path)
    args = ["--checkpoint", str(tiny_weights), "--input", str(tmp_path), "--output",
            str(tmp_path), "--cache-dir", str(cache_dir)]
    assert derain.main(args) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert digest(tmp_path) == before
    assert derain.main([*args, "--overwrite"]) == 1  # x.png -> x.png would replace x.png
    err = capsys.readouterr().err
    assert "x.png would replace an input" in err
    assert digest(tmp_path) == before | {"y.png": digest(tmp_path)["y.png"]}


@pytest.mark.parametrize("flags,message", [
    (["--tile", "20"], "multiple of 8"), (["--batch-size", "0"], ">= 1"),
    (["--tile-overlap", "-1"], ">= 0"), (["--memory-limit", "0"], "> 0")])
def test_bad_flags_are_refused(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        derain.main(["--checkpoint", "x", "--input", str(tmp_path), "--output", "y", *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    write_image(tmp_path / "x.png", np.zeros((8, 8, 3), np.uint8))
    rc = derain.main(["--checkpoint", str(tmp_path / "nope"), "--input", str(tmp_path),
                      "--output", str(tmp_path / "out"), "--cache-dir", "none"])
    err = capsys.readouterr().err
    assert rc == 1 and "nope: no such checkpoint directory" in err and "Traceback" not in err


def test_cli_buckets_and_batches(tmp_path, monkeypatch, capsys):
    """--buckets and --batch-size reach the Restorer; same-bucket images share a batch."""
    from drsformer_jax.utils.images import from_float

    model = FakeModel()
    asked = {}

    def fake_make_restorer(checkpoint, **kwargs):
        asked.update(kwargs)
        return inference.Restorer(model, VARIABLES, buckets=kwargs["buckets"],
                                  batch_size=kwargs["batch_size"], memory_limit=NO_LIMIT)

    monkeypatch.setattr(derain, "make_restorer", fake_make_restorer)
    sizes = {"a": (130, 140), "b": (135, 150), "c": (140, 141), "d": (9, 9), "e": (10, 12)}
    imgs = {k: RNG.integers(0, 256, (*hw, 3)).astype(np.uint8) for k, hw in sizes.items()}
    for k, img in imgs.items():
        write_image(tmp_path / f"{k}.png", img)
    rc = derain.main(["--checkpoint", "unused", "--input", str(tmp_path), "--output",
                      str(tmp_path / "out"), "--buckets", "--batch-size", "4"])
    assert rc == 0
    assert asked["buckets"] is True and asked["batch_size"] == 4 and asked["tile"] is None
    # Buckets: a, c -> 144x144 (a batch of two), b -> 144x160, d, e -> 16x16 (two).
    assert sorted(model.traced) == [(1, 144, 160, 3), (2, 16, 16, 3), (2, 144, 144, 3)]
    bucket = {"a": (144, 144), "b": (144, 160), "c": (144, 144), "d": (16, 16), "e": (16, 16)}
    for k, img in imgs.items():
        want = from_float(fake_reference(img.astype(np.float32) / 255, bucket[k]))
        np.testing.assert_array_equal(read_image(tmp_path / "out" / f"{k}.png"), want)
    captured = capsys.readouterr()
    assert "derained 5 of 5 images" in captured.out and "images/s" in captured.out
    assert "img/s" in captured.err


def test_unusable_cache_dir_is_a_note(tmp_path, tiny_weights, capsys):
    (tmp_path / "file").write_text("")
    restorer = derain.make_restorer(tiny_weights, cache_dir=tmp_path / "file" / "cache")
    assert isinstance(restorer, inference.Restorer)
    assert "note: compilation cache off" in capsys.readouterr().err
    assert jax.config.jax_compilation_cache_dir is None


def test_default_path_is_the_release_procedure(fixtures_dir):
    """No --tile / --buckets: the Restorer gives the release's outputs (parity fixture)."""
    from drsformer_jax.checkpoints import conversion
    from drsformer_jax.model.drsformer import from_config
    from drsformer_jax.testing import random_state_dict

    with np.load(fixtures_dir / "parity.npz") as f:
        fx = {k: f[k] for k in f.files}
    shapes = [tuple(int(d) for d in s.split("x")) if s else () for s in fx["no_mefc/shapes"]]
    names = [str(n) for n in fx["no_mefc/names"]]
    sd = random_state_dict(zip(names, shapes, strict=True), int(fx["seed"]))
    config, params = conversion.state_dict_to_flax(sd)
    restorer = inference.Restorer(from_config(config), {"params": params})
    x, want = fx["input"], np.clip(fx["no_mefc/output"], 0, 1)
    plan = restorer.plan(*x.shape[1:3])
    assert plan == inference.Plan((48, 64), 1)  # whole image, no tiles, no extra padding
    got = restorer.restore(list(x), plan)
    assert np.abs(np.stack(got) - want).max() <= 1e-5
    assert np.abs(want - x).mean() > 0.1  # teeth: the model changes the image


# --- every local device ---------------------------------------------------------------------

FOUR_DEVICES = """
import sys
import jax
from drsformer_jax import derain, inference
assert jax.local_device_count() == 4
weights, inputs, out, tiled = sys.argv[1:5]
restorer = inference.make_restorer(weights, batch_size=2, cache_dir="none")
plan = restorer.plan(40, 48)
assert plan.batch == 8, plan  # two per device
for args in (["--input", inputs, "--output", out, "--batch-size", "2"],
             ["--input", inputs, "--output", tiled, "--tile", "24", "--tile-overlap", "8"]):
    assert derain.main(["--checkpoint", weights, "--cache-dir", "none", *args]) == 0
"""


def test_four_devices_derain_like_one(tiny_weights, tmp_path):
    """derain's batches (and tiles) spread over 4 simulated devices give one device's PNGs."""
    import os
    import subprocess
    import sys

    inputs = tmp_path / "in"
    inputs.mkdir()
    for k, hw in enumerate([(40, 48)] * 3 + [(37, 53)]):
        write_image(inputs / f"{k}.png", RNG.integers(0, 256, (*hw, 3)).astype(np.uint8))
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root),
               XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", FOUR_DEVICES, str(tiny_weights), str(inputs),
                           str(tmp_path / "four"), str(tmp_path / "four_tiled")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert jax.local_device_count() == 1
    for flags, four in ((["--batch-size", "2"], "four"),
                        (["--tile", "24", "--tile-overlap", "8"], "four_tiled")):
        assert derain.main(["--checkpoint", str(tiny_weights), "--input", str(inputs),
                            "--output", str(tmp_path / "one"), "--cache-dir", "none",
                            "--overwrite", *flags]) == 0
        for k in range(4):
            one = read_image(tmp_path / "one" / f"{k}.png").astype(int)
            many = read_image(tmp_path / four / f"{k}.png").astype(int)
            # Batching may change the last bit of a float, so a rounding edge by one level.
            assert np.abs(one - many).max() <= 1 and (one != many).mean() < 0.01
