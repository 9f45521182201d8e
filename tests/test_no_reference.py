"""NIQE / BRISQUE (drsformer_jax.evaluation.no_reference) against pyiqa's published values.

Reference: pyiqa 0.1.16, ResultsCalibra/calibration_summary.csv, rows "niqe(ours)" and
"brisque(ours)" (pyiqa's own results; the "niqe" / "brisque" rows are the original
MATLAB code's), columns I03, I04, I06, I08, I19 of ResultsCalibra/dist_dir, which
tests/fixtures/iqa/ holds as lossless PNGs.

Tolerances: 0.003 (NIQE) and 0.03 (BRISQUE) against the published figures; we are
within 6e-4 and 4.2e-3. A local run of pyiqa 0.1.16 on torch 2.13.0+cpu (parameter
files made from the ones shipped here) differs from the published figures by as much
(I03 NIQE 15.653206, I06 BRISQUE 1.077393): pyiqa's own result depends on PyTorch's
arithmetic, through round-off in flat image regions. Against that local run we are
within 1.5e-5 (NIQE) and 1.2e-3 (BRISQUE), checked below with 1e-4 and 0.01.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from drsformer_jax.evaluation import no_reference
from drsformer_jax.evaluation.no_reference import brisque, niqe

FIXTURES = Path(__file__).parent / "fixtures" / "iqa"
NAMES = ("I03", "I04", "I06", "I08", "I19")
PUBLISHED_NIQE = dict(zip(NAMES, (15.6538, 3.6549, 3.2342, 3.1922, 9.0722), strict=True))
PUBLISHED_BRISQUE = dict(zip(NAMES, (94.6443, -0.1068, 1.0732, 5.1447, 66.8415), strict=True))
LOCAL_NIQE = dict(zip(NAMES, (15.653206, 3.654908, 3.234191, 3.192150, 9.072738), strict=True))
LOCAL_BRISQUE = dict(zip(NAMES, (94.645355, -0.107666, 1.077393, 5.141846, 66.838562), strict=True))


def _load(name: str) -> np.ndarray:
    with Image.open(FIXTURES / f"{name}.png") as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def scores() -> dict[str, tuple[float, float]]:
    return {name: (niqe(_load(name)), brisque(_load(name))) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_niqe_matches_pyiqa_published(scores, name):
    assert scores[name][0] == pytest.approx(PUBLISHED_NIQE[name], abs=0.003)
    assert scores[name][0] == pytest.approx(LOCAL_NIQE[name], abs=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_brisque_matches_pyiqa_published(scores, name):
    assert scores[name][1] == pytest.approx(PUBLISHED_BRISQUE[name], abs=0.03)
    assert scores[name][1] == pytest.approx(LOCAL_BRISQUE[name], abs=0.01)


def test_fixtures_are_the_calibration_images():
    for name in NAMES:
        img = _load(name)
        assert img.shape == (384, 512, 3) and img.dtype == np.uint8


def test_luma_rounds_like_pytorch():
    # Colours whose Y*255 lies at n.5: a plain float32 sum, or exact arithmetic, rounds
    # them the other way from pyiqa's float32 matmul (values from torch 2.13 CPU).
    rgb = np.array([[[0, 214, 113], [41, 225, 19], [218, 192, 251], [0, 8, 86]]], np.uint8)
    np.testing.assert_array_equal(no_reference._luma(rgb), [[138, 147, 207, 15]])
    # R = G = B = g gives Y = g exactly, for every level.
    g = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(no_reference._luma(np.stack([g, g, g], -1)[None]), g[None])


def test_half_resize_weights_and_borders():
    # MATLAB imresize(x, 0.5) bicubic + antialiasing: 8 taps [-3 -9 29 111 111 29 -9 -3]/256.
    taps = no_reference._half_taps()
    np.testing.assert_array_equal(taps * 256, [0, -3, -9, 29, 111, 111, 29, -9, -3, 0])
    x = np.arange(21, dtype=np.float32)[:, None]
    y = no_reference._resize_half_axis0(x)
    assert y.shape == (11, 1)  # ceil(21 / 2)
    # Output p is centred on input 2p + 0.5; away from the borders a ramp stays a ramp.
    np.testing.assert_array_equal(y[2:8, 0], 2 * np.arange(2, 8) + 0.5)
    # MATLAB's symmetric border (c b a | a b c ...): output 0 reads inputs 2 1 0 0 1 2 3 4.
    w = np.array([-3, -9, 29, 111, 111, 29, -9, -3])
    assert y[0, 0] == (w @ [2, 1, 0, 0, 1, 2, 3, 4]) / 256
    assert y[-1, 0] == (w @ [17, 18, 19, 20, 20, 19, 18, 17]) / 256  # odd length: 4 past the end


@pytest.fixture(scope="module")
def small_rgb() -> np.ndarray:
    return _load("I03")[:200, 100:310]


def test_gray_is_treated_as_rgb_with_equal_channels(small_rgb):
    gray = np.asarray(Image.fromarray(small_rgb).convert("L"))
    as_rgb = np.repeat(gray[:, :, None], 3, axis=2)
    for metric in (niqe, brisque):
        ref = metric(as_rgb)
        assert metric(gray) == ref
        assert metric(gray[:, :, None]) == ref
    assert niqe(gray) != niqe(small_rgb)  # the colour image's Y is not its PIL "L"


def test_rgba_drops_alpha(small_rgb):
    alpha = np.full(small_rgb.shape[:2] + (1,), 7, np.uint8)
    rgba = np.concatenate([small_rgb, alpha], axis=2)
    assert niqe(rgba) == niqe(small_rgb)
    assert brisque(rgba) == brisque(small_rgb)


def test_niqe_ignores_pixels_past_the_last_whole_block(small_rgb):
    # 200x210 -> two 96-row x two 96-column blocks: the first 192x192 pixels only.
    changed = small_rgb.copy()
    changed[192:, :] = 0
    changed[:, 192:] = 255
    assert niqe(changed) == niqe(small_rgb) == niqe(small_rgb[:192, :192])


def test_too_small_images_are_rejected(small_rgb):
    with pytest.raises(ValueError,
                       match=r"NIQE: the image must be at least 96x96 .* got 210x95 \(WxH\)"):
        niqe(small_rgb[:95])
    with pytest.raises(ValueError, match=r"at least 96x96 .* got 12x200"):
        niqe(small_rgb[:, :12])
    with pytest.raises(ValueError, match=r"BRISQUE: the image must be at least 13x13 .* 210x12"):
        brisque(small_rgb[:12])
    noise = np.random.default_rng(0).integers(0, 256, (13, 13, 3), dtype=np.uint8)
    assert np.isfinite(brisque(noise))
    assert np.isfinite(niqe(small_rgb[:96, :96]))


@pytest.mark.parametrize("metric", [niqe, brisque])
def test_wrong_dtype_or_shape_is_rejected(metric, small_rgb):
    name = metric.__name__.upper()
    with pytest.raises(ValueError, match=rf"{name}: expected a uint8 image .* got dtype float32"):
        metric(small_rgb.astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"expected a uint8 image .* got dtype uint16"):
        metric(small_rgb.astype(np.uint16))
    with pytest.raises(ValueError, match=r"HxWx3 RGB.* got shape \(200, 210, 2\)"):
        metric(small_rgb[:, :, :2])
    with pytest.raises(ValueError, match=r"got shape \(1, 200, 210, 3\)"):
        metric(small_rgb[None])
    with pytest.raises(ValueError, match=r"expected a numpy uint8 image, got list"):
        metric(small_rgb.tolist())


def test_flat_images_are_undefined():
    # pyiqa fails (NIQE: SVD of NaN; BRISQUE on black: an assertion) or returns NaN.
    with pytest.raises(ValueError, match="NIQE: undefined for this image"):
        niqe(np.full((100, 100, 3), 128, np.uint8))
    with pytest.raises(ValueError, match="BRISQUE: undefined for this image"):
        brisque(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="BRISQUE: undefined for this image"):
        brisque(np.full((64, 64, 3), 128, np.uint8))


def test_shipped_parameters():
    mu, cov = no_reference._niqe_model()
    assert mu.shape == (36,) and cov.shape == (36, 36)
    np.testing.assert_allclose(cov, cov.T)
    svr = no_reference._brisque_model()
    assert svr.support_vectors.shape == (774, 36) and svr.coefficients.shape == (774,)
    assert (svr.gamma, svr.rho) == (0.05, -153.591)
    assert svr.feature_ranges.shape == (36, 2)
    assert tuple(svr.feature_ranges[0]) == (0.338, 10.0)
    assert np.all(svr.feature_ranges[:, 1] > svr.feature_ranges[:, 0])
