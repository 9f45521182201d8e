"""No-reference image quality: NIQE and BRISQUE as pyiqa computes them by default, in NumPy.

The DRSformer paper scores real rainy photos (no ground truth) with
``pyiqa.create_metric("niqe")`` and ``pyiqa.create_metric("brisque")``, default options
(pyiqa 0.1.16: ``version="original"``, ``test_y_channel=True``, ``color_space="yiq"``,
``crop_border=0``). Both functions here follow that code path step by step:

- Luminance: uint8 RGB / 255 in float32, YIQ's Y (0.299, 0.587, 0.114), times 255,
  rounded (half to even): integer levels 0..255.
- NIQE (Mittal et al. 2013), float64 like pyiqa: crop to whole 96x96 blocks (top-left);
  at two scales, normalise with a 7x7 Gaussian (sigma 7/6, replicated borders), fit
  per block an AGGD to the coefficients and to their products with the horizontal,
  vertical and two diagonal neighbours (circular within the block): 18 features per
  scale, 36 per block; the second scale is MATLAB's bicubic ``imresize(..., 0.5)`` with
  antialiasing. Score: sqrt(d' pinv((C_pristine + C_image) / 2) d), d the difference of
  the mean feature vectors; the pristine model is the NIQE release's.
- BRISQUE (Mittal et al. 2012), float32 like pyiqa: the same normalisation with zero
  borders on the whole image, a GGD fit and four AGGD fits of neighbour products
  (circular over the image) at two scales, 36 features scaled to [-1, 1] with the
  release's ranges, then the LIVE epsilon-SVR: sum_i c_i exp(-0.05 |f - s_i|^2) - rho,
  rho = -153.591, 774 support vectors.

Why BRISQUE reproduces pyiqa's float32 arithmetic rather than computing in float64:
in flat regions ``Y - mu`` is pure round-off, and its sign decides which side of the
asymmetric fits a pixel counts on, so the score depends on it. On the calibration image
I19 (large flat areas) float64 gives 63.93 where pyiqa gives 66.84. So the local means
and variances are computed as PyTorch's CPU convolution computes them (one fused
multiply-add per tap, taps in row-major order) and the resize as pyiqa's float32
weighted sum. The Y channel and the filtered maps then equal PyTorch's bit for bit, the
resized images too except a few pixels at the ends of PyTorch's vectorised blocks; what
remains (PyTorch's float32 sqrt, lgamma and reduction order) moves BRISQUE by ~1e-3.
pyiqa itself moves by up to 3e-3 with ``torch.set_num_threads`` (its reductions split
differently). NIQE is float64 in pyiqa; we agree with it to ~1e-5.

Parameters ship in ``data/`` (see ``data/README.md`` for provenance) and are loaded once.
"""

from __future__ import annotations

import functools
import math
from importlib import resources
from typing import NamedTuple

import numpy as np

__all__ = ["BRISQUE_MIN_SIZE", "NIQE_BLOCK_SIZE", "brisque", "niqe"]

NIQE_BLOCK_SIZE = 96
# The half-resolution scale must still hold one 7x7 Gaussian window: ceil(n / 2) >= 7.
BRISQUE_MIN_SIZE = 13

_F32 = np.float32
_F64 = np.float64
_YIQ_Y = np.array([0.299, 0.587, 0.114], dtype=_F32)
_WINDOW = 7
_SIGMA = 7.0 / 6.0
# pyiqa's shape grid for the GGD/AGGD moment matching: torch.arange(0.2, 10.001, 0.001)
# in float32 (9801 values; here rounded to nearest, PyTorch's may differ by 1 ulp).
_N_SHAPES = 9801


# ---------------------------------------------------------------------------- inputs


def _as_rgb(image: np.ndarray, metric: str) -> np.ndarray:
    """Validate a uint8 image and return it as HxWx3 (gray replicated, alpha dropped)."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{metric}: expected a numpy uint8 image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{metric}: expected a uint8 image (0..255), got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"{metric}: expected an HxWx3 RGB, HxWx4 RGBA or HxW / HxWx1 gray image, "
            f"got shape {image.shape}"
        )
    if image.shape[2] == 1:
        # pyiqa loads files with PIL's convert("RGB"): a gray image becomes R = G = B.
        return np.repeat(image, 3, axis=2)
    # convert("RGB") drops alpha without compositing.
    return image[:, :, :3]


def _fma32(a: np.ndarray, b: np.floating, c: np.ndarray) -> np.ndarray:
    """float32 a*b + c rounded once, as a fused multiply-add.

    The float32 product is exact in float64, so only the sum rounds twice (float64 then
    float32), which differs from a true FMA in rare ties: none on the 2^24 RGB colours
    nor on the calibration images' filtered maps.
    """
    return (a.astype(_F64) * _F64(b) + c).astype(_F32)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """pyiqa's ``to_y_channel(x, 255, "yiq")``: integer levels 0..255 as float32.

    The float32 matmul in PyTorch accumulates r, g, b with FMAs; mimicking that gives the
    same rounded level for all 2^24 colours (a plain float32 sum differs for 1869).
    """
    x = rgb.astype(_F32) / _F32(255)
    y = x[..., 0] * _YIQ_Y[0]
    y = _fma32(x[..., 1], _YIQ_Y[1], y)
    y = _fma32(x[..., 2], _YIQ_Y[2], y)
    return np.round(y * _F32(255))


# ------------------------------------------------------------------ filters, resize


@functools.cache
def _gaussian_window() -> np.ndarray:
    """MATLAB fspecial("gaussian", 7, 7/6), rounded to float32 as pyiqa's fspecial does."""
    m = (_WINDOW - 1) / 2
    r = np.arange(-m, m + 1)
    h = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2.0 * _SIGMA * _SIGMA))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    return (h / h.sum()).astype(_F32)


def _correlate64(img: np.ndarray, mode: str) -> np.ndarray:
    """7x7 'same' correlation in float64 (NIQE: pyiqa runs it in float64)."""
    k = _gaussian_window().astype(_F64)
    h, w = img.shape
    p = np.pad(img, _WINDOW // 2, mode=mode)
    out = np.zeros((h, w), _F64)
    for i in range(_WINDOW):
        for j in range(_WINDOW):
            out += k[i, j] * p[i : i + h, j : j + w]
    return out


def _correlate32(img: np.ndarray, mode: str) -> np.ndarray:
    """7x7 'same' correlation in float32, as PyTorch's CPU conv2d rounds it.

    One fused multiply-add per tap, taps in row-major order: bit-equal to torch 2.13 on
    the calibration images (a plain multiply-then-add gives other bits on ~25% of pixels).
    """
    k = _gaussian_window()
    h, w = img.shape
    p = np.pad(img, _WINDOW // 2, mode=mode).astype(_F64)
    acc = np.zeros((h, w), _F32)
    prod = np.empty((h, w), _F64)
    for i in range(_WINDOW):
        for j in range(_WINDOW):
            # float32 x float32 is exact in float64; the float64 add rounds into float32.
            np.multiply(p[i : i + h, j : j + w], _F64(k[i, j]), out=prod)
            np.add(prod, acc, out=acc, casting="same_kind")
    return acc


def _normalize(img: np.ndarray, mode: str) -> np.ndarray:
    """pyiqa's normalize_img_with_gauss: (x - mu) / (sqrt(|E[x^2] - mu^2| + eps) + 1)."""
    if img.dtype == _F32:
        mu, m2 = _correlate32(img, mode), _correlate32(img * img, mode)
    else:
        mu, m2 = _correlate64(img, mode), _correlate64(img * img, mode)
    sigma = np.sqrt(np.abs(m2 - mu * mu) + np.finfo(img.dtype).eps)
    return (img - mu) / (sigma + img.dtype.type(1))


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' bicubic kernel, a = -0.5 (MATLAB imresize)."""
    ax = np.abs(x)
    near = (1.5 * ax - 2.5) * ax * ax + 1
    far = ((-0.5 * ax + 2.5) * ax - 4) * ax + 2
    return np.where(ax <= 1, near, np.where(ax <= 2, far, 0.0))


@functools.cache
def _half_taps() -> np.ndarray:
    """Weights of MATLAB's antialiased bicubic imresize at scale 1/2.

    Antialiasing stretches the kernel by 2 (8 taps; pyiqa keeps a margin of one on each
    side: 10), every output sample sits 4.5 input samples after its first tap. The
    result is exactly [0, -3, -9, 29, 111, 111, 29, -9, -3, 0] / 256, so float32 or
    float64 weights are the same numbers.
    """
    taps = 10
    w = _cubic((4.5 - np.arange(taps)) * 0.5)
    return (w / w.sum()).astype(_F32)


def _resize_half_axis0(x: np.ndarray) -> np.ndarray:
    """Halve axis 0 (output ceil(n/2)), MATLAB 'symmetric' borders, float32.

    pyiqa multiplies the 10 gathered samples by their weights and sums them in order, in
    float32 (PyTorch's reduction does so except at the ends of its vectorised blocks).
    """
    n = x.shape[0]
    first = 2 * np.arange(-(-n // 2)) - 4
    out = np.zeros((first.size,) + x.shape[1:], _F32)
    for k, wk in enumerate(_half_taps()):
        idx = first + k
        idx = np.where(idx < 0, -idx - 1, idx)  # MATLAB symmetric: a b | a b c ... c | c b
        idx = np.where(idx >= n, 2 * n - 1 - idx, idx)
        out += x[idx] * wk
    return out


def _imresize_half(x: np.ndarray) -> np.ndarray:
    """pyiqa's ``imresize(x, scale=0.5, antialiasing=True)``: rows, then columns, float32."""
    x = _resize_half_axis0(x.astype(_F32))
    return np.ascontiguousarray(_resize_half_axis0(x.T).T)


# ------------------------------------------------------------- distribution fitting


class _ShapeTable(NamedTuple):
    alpha: np.ndarray  # the shape grid
    lg1: np.ndarray  # lgamma(1 / alpha)
    lg2: np.ndarray  # lgamma(2 / alpha)
    lg3: np.ndarray  # lgamma(3 / alpha)
    r_aggd: np.ndarray  # Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a))
    r_ggd: np.ndarray  # Gamma(1/a) Gamma(3/a) / Gamma(2/a)^2


@functools.cache
def _shape_table(dtype: type) -> _ShapeTable:
    """The moment-matching tables, in the precision pyiqa evaluates them (NIQE float64,
    BRISQUE float32: there the float32 lgammas are combined in float32)."""
    alpha = (0.2 + 0.001 * np.arange(_N_SHAPES)).astype(_F32).astype(dtype)

    def lgam(k: int) -> np.ndarray:
        # k / alpha in the working precision, lgamma in float64 rounded to it.
        return np.array([math.lgamma(v) for v in dtype(k) / alpha], dtype=_F64).astype(dtype)

    lg1, lg2, lg3 = lgam(1), lgam(2), lgam(3)
    two = dtype(2)
    return _ShapeTable(
        alpha, lg1, lg2, lg3, np.exp(two * lg2 - (lg1 + lg3)), np.exp(lg1 + lg3 - two * lg2)
    )


def _aggd(x: np.ndarray, table: _ShapeTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pyiqa's estimate_aggd_param on rows of x (B, N): grid index of the shape, and the
    left / right standard deviations. NaN where a side is empty (flat data)."""
    dt = x.dtype.type
    x2 = x * x
    neg = x < 0
    pos = x > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        std_l = np.sqrt(np.where(neg, x2, 0).sum(axis=1) / neg.sum(axis=1).astype(dt))
        std_r = np.sqrt(np.where(pos, x2, 0).sum(axis=1) / pos.sum(axis=1).astype(dt))
        g = std_l / std_r
        r_hat = np.abs(x).mean(axis=1) ** 2 / x2.mean(axis=1)
        one = dt(1)
        r_norm = r_hat * (g * g * g + one) * (g + one) / ((g * g + one) * (g * g + one))
        # First index of the smallest gap; an all-NaN row gives 0, as torch.argmin does.
        idx = np.abs(table.r_aggd[None, :] - r_norm[:, None]).argmin(axis=1)
    return idx, std_l, std_r


# --------------------------------------------------------------------------- NIQE


@functools.cache
def _niqe_model() -> tuple[np.ndarray, np.ndarray]:
    with (
        resources.as_file(resources.files(__package__) / "data" / "niqe_pris_params.npz") as p,
        np.load(p) as data,
    ):
        return data["mu_pris_param"].reshape(-1).astype(_F64), data["cov_pris_param"].astype(_F64)


def _niqe_block_features(blocks: np.ndarray) -> np.ndarray:
    """18 features per block (B, s, s): AGGD of the coefficients and of 4 neighbour products."""
    t = _shape_table(_F64)
    n = blocks.shape[0]
    idx, std_l, std_r = _aggd(blocks.reshape(n, -1), t)
    scale = np.sqrt(np.exp(t.lg1[idx] - t.lg3[idx]))
    feats = [t.alpha[idx], (std_l * scale + std_r * scale) / 2]
    # Neighbour products via a circular shift inside each block (torch.roll in pyiqa).
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        prod = blocks * np.roll(blocks, shift, axis=(1, 2))
        idx, std_l, std_r = _aggd(prod.reshape(n, -1), t)
        scale = np.sqrt(np.exp(t.lg1[idx] - t.lg3[idx]))
        beta_l, beta_r = std_l * scale, std_r * scale
        mean = (beta_r - beta_l) * np.exp(t.lg2[idx] - t.lg1[idx])
        feats += [t.alpha[idx], mean, beta_l, beta_r]
    return np.stack(feats, axis=1)


def niqe(image: np.ndarray) -> float:
    """NIQE of a uint8 image as ``pyiqa.create_metric("niqe")`` computes it (lower is better).

    Args:
        image: HxWx3 uint8 RGB. HxW or HxWx1 uint8 gray is taken as R = G = B (what pyiqa
            does with a gray file, which it loads as RGB); its Y is then the gray level
            itself. HxWx4 RGBA: alpha is dropped, as PIL's ``convert("RGB")``.

    Returns:
        The score; pixels beyond the last whole 96x96 block (bottom, right) are ignored.

    Raises:
        ValueError: not a uint8 array of one of those shapes, smaller than 96x96, or with
            no 96x96 block whose features are defined (e.g. a flat image; pyiqa fails too).
    """
    rgb = _as_rgb(image, "NIQE")
    h, w = rgb.shape[:2]
    bs = NIQE_BLOCK_SIZE
    if h < bs or w < bs:
        raise ValueError(f"NIQE: the image must be at least {bs}x{bs} pixels, got {w}x{h} (WxH)")
    nh, nw = h // bs, w // bs
    img = _luma(rgb)[: nh * bs, : nw * bs].astype(_F64)

    feats = []
    for scale in (1, 2):
        norm = _normalize(img, "edge")
        s = bs // scale
        blocks = norm.reshape(nh, s, nw, s).swapaxes(1, 2).reshape(nh * nw, s, s)
        feats.append(_niqe_block_features(blocks))
        if scale == 1:
            # pyiqa's imresize casts to float32 whatever the input dtype.
            img = _imresize_half(img / 255.0).astype(_F64) * 255.0
    f = np.concatenate(feats, axis=1)

    # pyiqa: nanmean per feature, covariance over the blocks without any NaN.
    complete = f[~np.isnan(f).any(axis=1)]
    if complete.shape[0] == 0:
        raise ValueError("NIQE: undefined for this image, no 96x96 block has finite features")
    mu = np.nanmean(f, axis=0)
    cov = np.cov(complete, rowvar=False, ddof=1 if complete.shape[0] > 1 else 0)
    mu_p, cov_p = _niqe_model()
    a = (cov_p + cov) / 2
    # torch.linalg.pinv's default cut-off: max(m, n) * eps times the largest singular value.
    inv = np.linalg.pinv(a, rcond=max(a.shape) * np.finfo(_F64).eps)
    d = mu_p - mu
    return float(np.sqrt(d @ inv @ d))


# ------------------------------------------------------------------------- BRISQUE


class _SVR(NamedTuple):
    support_vectors: np.ndarray
    coefficients: np.ndarray
    gamma: float
    rho: float
    feature_ranges: np.ndarray


@functools.cache
def _brisque_model() -> _SVR:
    with (
        resources.as_file(resources.files(__package__) / "data" / "brisque_live_svr.npz") as p,
        np.load(p) as d,
    ):
        return _SVR(
            d["support_vectors"],
            d["coefficients"],
            float(d["gamma"]),
            float(d["rho"]),
            d["feature_ranges"],
        )


def _brisque_scale_features(luma: np.ndarray) -> np.ndarray:
    """18 features of one scale, float32 as in pyiqa's natural_scene_statistics."""
    t = _shape_table(_F32)
    norm = _normalize(luma, "constant")
    flat = norm.reshape(1, -1)
    sigma_sq = (flat * flat).mean(axis=1)
    sigma = np.sqrt(sigma_sq)
    if np.all(np.isclose(sigma, 0.0)):  # pyiqa asserts here (e.g. an all-black image)
        raise ValueError("BRISQUE: undefined for this image, its normalised luminance is all 0")
    rho = sigma_sq / np.abs(flat).mean(axis=1) ** 2
    shape = np.abs(rho[:, None] - t.r_ggd[None, :]).argmin(axis=1)
    feats = [t.alpha[shape], sigma * sigma]
    # Neighbour products via a circular shift over the whole image (torch.roll in pyiqa).
    for shift in ((0, 1), (1, 0), (1, 1), (-1, 1)):
        prod = (norm * np.roll(norm, shift, axis=(0, 1))).reshape(1, -1)
        idx, std_l, std_r = _aggd(prod, t)
        eta = (std_r - std_l) * np.exp(t.lg2[idx] - (t.lg1[idx] + t.lg3[idx]) / _F32(2))
        feats += [t.alpha[idx], eta, std_l * std_l, std_r * std_r]
    return np.concatenate(feats)


def brisque(image: np.ndarray) -> float:
    """BRISQUE of a uint8 image as ``pyiqa.create_metric("brisque")`` computes it.

    Lower is better; typically 0..100, outside that range for very unusual images.

    Args:
        image: HxWx3 uint8 RGB. HxW or HxWx1 uint8 gray is taken as R = G = B (what pyiqa
            does with a gray file, which it loads as RGB); its Y is then the gray level
            itself. HxWx4 RGBA: alpha is dropped, as PIL's ``convert("RGB")``.

    Returns:
        The score of the whole image.

    Raises:
        ValueError: not a uint8 array of one of those shapes, smaller than 13x13 (the
            half-resolution scale needs one 7x7 window), or with undefined features
            (e.g. a flat image, where pyiqa returns NaN or fails).
    """
    rgb = _as_rgb(image, "BRISQUE")
    h, w = rgb.shape[:2]
    m = BRISQUE_MIN_SIZE
    if h < m or w < m:
        raise ValueError(f"BRISQUE: the image must be at least {m}x{m} pixels, got {w}x{h} (WxH)")
    luma = _luma(rgb)
    feats = [_brisque_scale_features(luma), _brisque_scale_features(_imresize_half(luma))]
    f = np.concatenate(feats).astype(_F64)
    if not np.isfinite(f).all():
        raise ValueError("BRISQUE: undefined for this image, some features are not finite")

    svr = _brisque_model()
    lo, hi = svr.feature_ranges[:, 0], svr.feature_ranges[:, 1]
    scaled = -1.0 + 2.0 * (f - lo) / (hi - lo)
    # Scaling and SVR in float64: pyiqa's float32 here moves the score by ~1e-5 only.
    dist = ((scaled[None, :] - svr.support_vectors) ** 2).sum(axis=1)
    return float(np.exp(-svr.gamma * dist) @ svr.coefficients - svr.rho)
