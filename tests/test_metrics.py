"""drsformer_jax.metrics against the release's own metric code.

The reference figures in fixtures/metrics/reference.json come from the release's
MATLAB scripts run in GNU Octave ("matlab", "rcdnet") and from its basicsr Python
code ("basicsr"), on the images of fixtures/metrics/synthetic.py
(tools/make_metric_vectors.py made them).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from drsformer_jax.evaluation import metrics

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
REFERENCE = json.loads((FIXTURES / "reference.json").read_text())


def _load_synthetic():
    spec = importlib.util.spec_from_file_location("metric_synthetic", FIXTURES / "synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


synthetic = _load_synthetic()
CASES = REFERENCE["cases"]

# Colours whose exact Y ends in .5 and that Octave's rgb2ycbcr rounds down because its
# floating-point sum lands just below the tie; we round the exact value (up).
OCTAVE_TIE_DOWN = {(123, 251, 249), (201, 227, 168), (209, 109, 9), (218, 58, 248),
                   (220, 208, 216), (242, 210, 148)}


def _pair(name: str) -> tuple[np.ndarray, np.ndarray]:
    case = CASES[name]
    return synthetic.make_case(case["kind"], case["height"], case["width"], case["seed"])


def _close(ours: float, ref: float, rel: float = 0.0, abs_: float = 0.0) -> bool:
    if math.isinf(ref):
        return ours == ref
    return math.isclose(ours, ref, rel_tol=rel, abs_tol=abs_)


def test_reference_covers_every_case_and_protocol():
    assert {name for name, *_ in synthetic.CASES} == set(CASES)
    for case in CASES.values():
        assert set(metrics.PROTOCOLS) <= set(case)


@pytest.mark.parametrize("protocol", metrics.PROTOCOLS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_release_code(name: str, protocol: str):
    ref = CASES[name][protocol]
    result, target = _pair(name)
    if "error" in ref:  # the MATLAB script itself fails on this pair
        with pytest.raises(ValueError, match="at least 11x11"):
            metrics.evaluate(result, target, protocol)
        return
    ours = metrics.evaluate(result, target, protocol)
    # basicsr's own PSNR is a float32 number under numpy 2 (~4e-6 dB steps); a tie
    # pixel rounded differently by Octave moves "matlab" by ~1e-6 dB (see below).
    assert _close(ours["psnr"], ref["psnr"], rel=1e-6), (ours, ref)
    assert _close(ours["ssim"], ref["ssim"], abs_=1e-6), (ours, ref)


def _octave_y_uint8(rgb: np.ndarray) -> np.ndarray:
    """Octave 7 / image 2.14 rgb2ycbcr on uint8, floating-point steps and all."""
    x = rgb.astype(np.float64) / 255.0
    kr, kb = 0.299, 0.114
    y = x[..., 0] * kr + x[..., 1] * (1.0 - kr - kb) + x[..., 2] * kb
    y = y * 219.0 / 255.0 + 16.0 / 255.0
    return np.floor(y * 255.0 + 0.5).astype(np.uint8)


def test_octave_emulation_matches_octave_on_recorded_colours():
    for group in REFERENCE["rgb2ycbcr"].values():
        rgb = np.array(group["rgb"], dtype=np.uint8)
        np.testing.assert_array_equal(_octave_y_uint8(rgb), group["octave_y_uint8"])


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if "error" not in c["matlab"]])
def test_matlab_protocol_equals_octave_given_its_tie_rounding(name, monkeypatch):
    # With Octave's way of rounding the .5 ties, everything else agrees to ~1e-13:
    # the tie convention is the only difference.
    monkeypatch.setattr(metrics, "_y_uint8", _octave_y_uint8)
    ref = CASES[name]["matlab"]
    ours = metrics.evaluate(*_pair(name), "matlab")
    assert _close(ours["psnr"], ref["psnr"], rel=1e-12)
    assert _close(ours["ssim"], ref["ssim"], abs_=1e-12)


def test_y_uint8_rounds_exact_ties_up_and_differs_from_octave_only_there():
    ties = REFERENCE["rgb2ycbcr"]["tie_colours"]
    rgb = np.array(ties["rgb"], dtype=np.uint8)
    assert len(rgb) == 194
    exact = 16.0 + (rgb.astype(np.float64) @ [65.481, 128.553, 24.966]) / 255.0
    ours = metrics.rgb_to_y(rgb, "matlab")
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, np.round(exact + 0.25))  # n.5 (+-fp) -> n + 1
    pairs = zip(ties["rgb"], ours, ties["octave_y_uint8"], strict=True)
    differs = {tuple(c) for c, a, b in pairs if a != b}
    assert differs == OCTAVE_TIE_DOWN


def test_rgb_to_y_matches_octave_on_sample_colours():
    sample = REFERENCE["rgb2ycbcr"]["sample_colours"]
    rgb = np.array(sample["rgb"], dtype=np.uint8)
    np.testing.assert_array_equal(metrics.rgb_to_y(rgb, "matlab"), sample["octave_y_uint8"])
    y = metrics.rgb_to_y(rgb, "rcdnet")
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, sample["octave_y_double"], rtol=0, atol=1e-15)
    yb = metrics.rgb_to_y(rgb, "basicsr")
    assert yb.dtype == np.float32
    np.testing.assert_allclose(yb, np.array(sample["octave_y_double"]) * 255, atol=3e-5)


def test_rgb_to_y_keeps_leading_shape():
    rgb = np.zeros((2, 5, 7, 3), np.uint8)
    for protocol in metrics.PROTOCOLS:
        assert metrics.rgb_to_y(rgb, protocol).shape == (2, 5, 7)
    with pytest.raises(ValueError, match=r"\(5, 4\)"):
        metrics.rgb_to_y(np.zeros((5, 4), np.uint8))


# ----------------------------------------------------------------- closed forms


@pytest.mark.parametrize("protocol", metrics.PROTOCOLS)
def test_identical_images_give_infinite_psnr_and_unit_ssim(protocol):
    target = synthetic.target(40, 33, seed=3)
    assert metrics.psnr(target.copy(), target, protocol) == math.inf
    assert metrics.ssim(target.copy(), target, protocol) == 1.0


@pytest.mark.parametrize("protocol", metrics.PROTOCOLS)
def test_grey_offset_has_closed_form_psnr_and_ssim(protocol):
    # Grey 85 and 170 have exact Y 89 and 162 (219 * 85 / 255 = 73): every protocol
    # sees a constant Y offset of 73 levels and constant images.
    result = synthetic.flat(24, 31, 170)
    target = synthetic.flat(24, 31, 85)
    expected_psnr = 20 * math.log10(255 / 73)
    c1 = (0.01 * 255) ** 2
    expected_ssim = (2 * 162 * 89 + c1) / (162**2 + 89**2 + c1)
    rel = 1e-6 if protocol == "basicsr" else 1e-12  # basicsr's Y is float32
    assert math.isclose(metrics.psnr(result, target, protocol), expected_psnr, rel_tol=rel)
    assert math.isclose(metrics.ssim(result, target, protocol), expected_ssim, rel_tol=1e-9)


@pytest.mark.parametrize("protocol", ["rcdnet", "basicsr"])
def test_colour_offset_psnr_is_closed_form_without_rounding(protocol):
    # Unrounded Y moves by exactly (65.481 dR + 128.553 dG + 24.966 dB) / 255.
    target = synthetic.target(30, 45, seed=1)
    assert target.max() <= 250
    result = target + np.array([3, 1, 5], np.uint8)
    dy = (65.481 * 3 + 128.553 * 1 + 24.966 * 5) / 255
    expected = 20 * math.log10(255 / dy)
    rel = 1e-6 if protocol == "basicsr" else 1e-12
    assert math.isclose(metrics.psnr(result, target, protocol), expected, rel_tol=rel)


def test_matlab_psnr_is_on_rounded_y():
    # Grey 100 and 101 have Y 101.88 and 102.74, rounded to 102 and 103: one pixel
    # among 100 is 1 level off (0.86 before rounding).
    target = np.full((10, 10, 3), 100, np.uint8)
    result = target.copy()
    result[3, 4] = (101, 101, 101)
    y_t = metrics.rgb_to_y(target, "matlab").astype(int)
    y_r = metrics.rgb_to_y(result, "matlab").astype(int)
    mse = np.mean((y_r - y_t) ** 2)
    assert mse == 1 / 100
    assert math.isclose(metrics.psnr(result, target, "matlab"), 10 * math.log10(255**2 * 100))


# ----------------------------------------------------------------- internals


@pytest.mark.parametrize(("size", "factor"), [
    (11, 1), (383, 1), (384, 2), (512, 2), (639, 2), (640, 3), (895, 3), (896, 4)])
def test_rcdnet_factor_rounds_half_away_from_zero(size, factor):
    assert metrics.rcdnet_factor(size, size + 100) == factor
    assert metrics.rcdnet_factor(size + 7, size) == factor


def _imfilter_box_subsample(x: np.ndarray, f: int) -> np.ndarray:
    """Straight from MATLAB's definition: kernel centre floor((f + 1) / 2), mirrored
    borders, correlation, then x(1:f:end, 1:f:end)."""
    c = (f + 1) // 2 - 1
    h, w = x.shape
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            acc = 0.0
            for di in range(f):
                for dj in range(f):
                    ii, jj = i + di - c, j + dj - c
                    ii = -ii - 1 if ii < 0 else (2 * h - ii - 1 if ii >= h else ii)
                    jj = -jj - 1 if jj < 0 else (2 * w - jj - 1 if jj >= w else jj)
                    acc += x[ii, jj]
            out[i, j] = acc / (f * f)
    return out[::f, ::f]


@pytest.mark.parametrize("f", [2, 3, 4, 5])
@pytest.mark.parametrize("shape", [(13, 17), (12, 16), (15, 14)])
def test_box_subsample_matches_imfilter_definition(f, shape):
    x = synthetic.target(*shape, seed=f)[..., 0].astype(np.float64)
    ours = metrics._box_subsample(x[None], f)[0]
    np.testing.assert_allclose(ours, _imfilter_box_subsample(x, f), rtol=1e-14)


# ----------------------------------------------------------------- batched path


@pytest.mark.parametrize("protocol", metrics.PROTOCOLS)
@pytest.mark.parametrize("shape", [(40, 52), (390, 384)])
def test_batch_equals_per_image(protocol, shape):
    n = 3 if shape[0] < 100 else 2
    results = np.stack([synthetic.result(*shape, seed=s) for s in range(n)])
    targets = np.stack([synthetic.target(*shape, seed=s) for s in range(n)])
    targets[-1] = results[-1]  # an identical pair too: inf in a batch
    psnrs, ssims = metrics.evaluate_batch(results, targets, protocol, chunk=2, workers=2)
    assert psnrs.shape == ssims.shape == (n,)
    for i in range(n):
        one = metrics.evaluate(results[i], targets[i], protocol)
        assert psnrs[i] == pytest.approx(one["psnr"], rel=1e-13, abs=0)
        assert ssims[i] == pytest.approx(one["ssim"], rel=1e-13, abs=0)
    assert psnrs[-1] == math.inf
    single = metrics.evaluate_batch(results, targets, protocol, chunk=1, workers=1)
    np.testing.assert_allclose(single[0], psnrs, rtol=1e-13)
    np.testing.assert_allclose(single[1], ssims, rtol=1e-13)


# ----------------------------------------------------------------- input checks


def test_shape_mismatch_names_both_shapes():
    a = np.zeros((20, 30, 3), np.uint8)
    b = np.zeros((20, 31, 3), np.uint8)
    with pytest.raises(ValueError, match=r"\(20, 30, 3\) vs \(20, 31, 3\)"):
        metrics.psnr(a, b)
    with pytest.raises(ValueError, match=r"\(1, 20, 30, 3\) vs \(1, 20, 31, 3\)"):
        metrics.evaluate_batch(a[None], b[None])


def test_dtype_and_layout_errors_name_the_array():
    a = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(ValueError, match=r"target must be uint8, got float32 \(shape \(20, 30,"):
        metrics.ssim(a, a.astype(np.float32))
    with pytest.raises(ValueError, match=r"result must be HxWx3 RGB, got shape \(20, 30\)"):
        metrics.evaluate(a[..., 0], a[..., 0])
    with pytest.raises(ValueError, match=r"NxHxWx3"):
        metrics.evaluate_batch(a, a)
    with pytest.raises(ValueError, match="unknown protocol 'psnr'"):
        metrics.evaluate(a, a, "psnr")


def test_too_small_for_ssim_follows_each_script():
    result, target = synthetic.result(10, 30, 9), synthetic.target(10, 30, 9)
    with pytest.raises(ValueError, match="at least 11x11 pixels, got 10x30"):
        metrics.ssim(result, target, "matlab")
    assert metrics.ssim(result, target, "rcdnet") == -math.inf  # ssim.m returns -Inf
    assert 0 < metrics.ssim(result, target, "basicsr") < 1  # replicated borders: fine
    assert math.isfinite(metrics.psnr(result, target, "matlab"))
