"""PSNR and SSIM exactly as the DRSformer paper's evaluation scripts compute them.

Three protocols, all on the luma (Y) channel of ITU-R BT.601 YCbCr:

- ``"matlab"`` (Rain200L/H, SPA-Data: ``evaluate_PSNR_SSIM.m``): Y from MATLAB's
  ``rgb2ycbcr`` on uint8, i.e. rounded to uint8; PSNR with peak 255; SSIM of Wang
  et al. (Gaussian window 11, sigma 1.5, K = (0.01, 0.03), L = 255) over the
  'valid' part of the image, averaged over that map.
- ``"rcdnet"`` (DID-Data, DDN-Data: RCDNet's ``statistic.m``/``psnr.m``/``ssim.m``):
  Y from ``rgb2ycbcr`` on ``im2double`` input, not rounded; PSNR with peak 1;
  SSIM on Y*255 after an f x f box filter ('symmetric' borders) and subsampling
  by f = max(1, round(min(H, W) / 256)), then as above.
- ``"basicsr"`` (the release's in-training validation): basicsr's float32 Y on
  0..255, not rounded; PSNR with peak 255; SSIM with replicated borders over the
  full image ('same' size).

All functions take HxWx3 uint8 RGB images (the batched ones NxHxWx3) and work in
float64: on the release's samples and our test images they agree with the scripts
run in GNU Octave to ~1e-13, far inside the 0.005 dB / 5e-5 that separates "the same
protocol" from "a close one". The one exception is by design: "matlab" rounds a
uint8 Y that is exactly n.5 up, as MATLAB's round does on the exact value, where
Octave's floating-point sum lands below n.5 for 6 of the 2^24 colours (one pixel of
one release sample: 3e-5 dB).

Edge cases follow the scripts: identical images give PSNR = inf; under "matlab"
an image smaller than 11x11 has no SSIM (the script fails; here: ValueError);
under "rcdnet" its SSIM is -inf, as ``ssim.m`` returns.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

PROTOCOLS = ("matlab", "rcdnet", "basicsr")

# BT.601 luma weights scaled by 219 (MATLAB's rgb2ycbcr matrix row), times 1000 so
# that the uint8 conversion can be done in exact integer arithmetic.
_W_R, _W_G, _W_B = 65481, 128553, 24966
_Y_DEN = 255_000  # Y = 16 + (65481 R + 128553 G + 24966 B) / 255000 for R, G, B in 0..255

_WIN = 11  # Gaussian window size of Wang et al.'s SSIM
_STRIP_PIXELS = 32 * 512  # SSIM works on strips of about this many pixels
_CHUNK_PIXELS = 512 * 512  # evaluate_batch's default: images of about this many pixels
_C1 = (0.01 * 255.0) ** 2
_C2 = (0.03 * 255.0) ** 2


def _gaussian_taps(size: int = _WIN, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


# fspecial('gaussian', 11, 1.5) (and cv2.getGaussianKernel) is the outer product of
# these taps up to rounding, so the 2-D window can be applied as two 1-D passes.
_TAPS = _gaussian_taps()


# --------------------------------------------------------------------------- checks


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")


def _check_pair(result: np.ndarray, target: np.ndarray, batched: bool) -> None:
    ndim, layout = (4, "NxHxWx3") if batched else (3, "HxWx3")
    for name, arr in (("result", result), ("target", target)):
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"{name} must be a numpy array, got {type(arr).__name__}")
        if arr.ndim != ndim or arr.shape[-1] != 3:
            raise ValueError(f"{name} must be {layout} RGB, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise ValueError(f"{name} must be uint8, got {arr.dtype} (shape {arr.shape})")
    if result.shape != target.shape:
        raise ValueError(f"result and target differ in shape: {result.shape} vs {target.shape}")
    if 0 in result.shape:
        raise ValueError(f"empty images: shape {result.shape}")


# ------------------------------------------------------------------------ colour


def _weighted_sum(rgb: np.ndarray) -> np.ndarray:
    """65481 R + 128553 G + 24966 B as int32 (at most 55,845,000: no overflow)."""
    c = rgb.astype(np.int32)
    return _W_R * c[..., 0] + _W_G * c[..., 1] + _W_B * c[..., 2]


def _y_uint8(rgb: np.ndarray) -> np.ndarray:
    # MATLAB rounds half away from zero; doing it on the exact rational value makes the
    # result independent of floating-point evaluation order, which decides the 194 of
    # the 2^24 colours whose Y is exactly n.5 (Octave rounds 6 of them down).
    s = _weighted_sum(rgb)
    return (16 + (s + _Y_DEN // 2) // _Y_DEN).astype(np.uint8)


def _y_basicsr(rgb: np.ndarray) -> np.ndarray:
    # basicsr's to_y_channel: float32 [0, 1] in, float64 dot product (on BGR), float32
    # out; the float32 steps are kept because they change the PSNR by up to ~1e-6 dB.
    x = (rgb.astype(np.float32) / np.float32(255.0)).astype(np.float64)
    y = x[..., 2] * 24.966 + x[..., 1] * 128.553 + x[..., 0] * 65.481
    y = ((y + 16.0) / 255.0).astype(np.float32)
    return y * np.float32(255.0)


def rgb_to_y(rgb: np.ndarray, protocol: str = "matlab") -> np.ndarray:
    """Luma of ...x3 uint8 RGB pixels as each protocol computes it.

    - "matlab": MATLAB ``rgb2ycbcr`` on uint8: uint8 Y in 16..235 (rounded).
    - "rcdnet": ``rgb2ycbcr(im2double(rgb))``: float64 Y in [16/255, 235/255].
    - "basicsr": basicsr's ``to_y_channel``: float32 Y in [16, 235], not rounded.
    """
    _check_protocol(protocol)
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim < 1 or rgb.shape[-1] != 3:
        raise ValueError(f"expected ...x3 uint8 RGB, got shape {rgb.shape} dtype {rgb.dtype}")
    if protocol == "matlab":
        return _y_uint8(rgb)
    if protocol == "rcdnet":
        return (_weighted_sum(rgb) / _Y_DEN + 16.0) / 255.0
    return _y_basicsr(rgb)


# -------------------------------------------------------------------------- PSNR


def _luma(rgb: np.ndarray, protocol: str) -> np.ndarray:
    """What PSNR and SSIM of a protocol start from: uint8 Y ("matlab"), the exact
    integer numerator of Y ("rcdnet"), float32 Y ("basicsr")."""
    if protocol == "matlab":
        return _y_uint8(rgb)
    if protocol == "rcdnet":
        return _weighted_sum(rgb)
    return _y_basicsr(rgb)


def _psnr_luma(ya: np.ndarray, yb: np.ndarray, protocol: str) -> np.ndarray:
    axes = (1, 2)
    n_pix = ya.shape[1] * ya.shape[2]
    if protocol == "matlab":
        d = ya.astype(np.int32) - yb
        mse = np.sum(d * d, axis=axes, dtype=np.int64) / n_pix  # exact integer sum
        peak_sq = 255.0**2
    elif protocol == "rcdnet":
        # Differences of the exact integer numerators avoid cancellation; each squared
        # term (< 2^53) is exact in float64.
        d = (ya - yb).astype(np.float64)
        mse = np.sum(d * d, axis=axes) / n_pix / float(_Y_DEN * 255) ** 2
        peak_sq = 1.0
    else:
        d = ya.astype(np.float64) - yb
        mse = np.mean(d * d, axis=axes)
        peak_sq = 255.0**2
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(peak_sq / mse)  # mse == 0 -> inf, as in the scripts


# -------------------------------------------------------------------------- SSIM


def _gauss_valid(x: np.ndarray) -> np.ndarray:
    """Correlates the last two axes with the 11x11 Gaussian, 'valid' part only."""
    for axis in (-2, -1):
        n = x.shape[axis] - (_WIN - 1)
        half = _WIN // 2

        def tap(k: int, x: np.ndarray = x, axis: int = axis, n: int = n) -> np.ndarray:
            index = [slice(None)] * x.ndim
            index[axis] = slice(k, k + n)
            return x[tuple(index)]

        acc = tap(half) * _TAPS[half]
        for k in range(half):  # the window is symmetric: pair the taps
            pair = tap(k) + tap(_WIN - 1 - k)
            pair *= _TAPS[k]
            acc += pair
        x = acc
    return x


def _ssim_valid(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean SSIM map of Wang et al. over the 'valid' region; a, b: float64 (N, H, W)."""
    n, h, w = a.shape
    out_h = h - (_WIN - 1)
    total = np.zeros(n)
    # Strips of output rows keep the working set in cache (~1 MB); whole maps at
    # 512x512 do not, and run several times slower.
    strip = max(1, _STRIP_PIXELS // (n * w))
    for r0 in range(0, out_h, strip):
        rows = slice(r0, min(r0 + strip, out_h) + _WIN - 1)
        sa, sb = a[:, rows], b[:, rows]
        mu1, mu2, sum_sq, prod = _gauss_valid(np.stack([sa, sb, sa * sa + sb * sb, sa * sb]))
        mu1_mu2 = mu1 * mu2
        mu_sq = mu1 * mu1 + mu2 * mu2
        sigma_sq = sum_sq - mu_sq  # sigma1^2 + sigma2^2
        sigma12 = prod - mu1_mu2
        ssim_map = ((2.0 * mu1_mu2 + _C1) * (2.0 * sigma12 + _C2)) / (
            (mu_sq + _C1) * (sigma_sq + _C2)
        )
        total += ssim_map.sum(axis=(1, 2))
    return total / (out_h * (w - (_WIN - 1)))


def _box_subsample(x: np.ndarray, f: int) -> np.ndarray:
    """MATLAB imfilter(x, ones(f)/f^2, 'symmetric', 'same') then x(1:f:end, 1:f:end)."""
    for axis in (1, 2):
        size = x.shape[axis]
        n_out = -(-size // f)
        # imfilter puts the kernel centre at floor((f + 1) / 2) (1-based), so the window
        # of an output pixel starts (f - 1) // 2 before it: none for f = 2.
        pre = (f - 1) // 2
        post = max(n_out * f - size - pre, 0)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (pre, post)
        x = np.pad(x, pad, mode="symmetric")
        index = [slice(None)] * x.ndim
        index[axis] = slice(0, n_out * f)
        x = x[tuple(index)]
        shape = x.shape[:axis] + (n_out, f) + x.shape[axis + 1 :]
        x = x.reshape(shape).mean(axis=axis + 1)
    return x


def rcdnet_factor(height: int, width: int) -> int:
    """RCDNet ssim.m's down-sampling factor max(1, round(min(H, W) / 256)).

    MATLAB's round goes half away from zero, so 640 pixels give 3, not 2.
    """
    return max(1, math.floor(min(height, width) / 256 + 0.5))


def _ssim_luma(ya: np.ndarray, yb: np.ndarray, protocol: str) -> np.ndarray:
    n, h, w = ya.shape
    if protocol == "matlab":
        if h < _WIN or w < _WIN:
            raise ValueError(
                f"SSIM needs images of at least {_WIN}x{_WIN} pixels, got {h}x{w} "
                "(the MATLAB script fails on them too)"
            )
        return _ssim_valid(ya.astype(np.float64), yb.astype(np.float64))
    if protocol == "rcdnet":
        if h < _WIN or w < _WIN:
            return np.full(n, -np.inf)  # what ssim.m returns for such images
        a = ya / _Y_DEN + 16.0  # = 255 * Y, what statistic.m passes to ssim.m
        b = yb / _Y_DEN + 16.0
        f = rcdnet_factor(h, w)
        if f > 1:
            a, b = _box_subsample(a, f), _box_subsample(b, f)
        return _ssim_valid(a, b)
    # basicsr: cv2.filter2D with BORDER_REPLICATE keeps the size; pad and go 'valid'.
    half = _WIN // 2
    pad = ((0, 0), (half, half), (half, half))
    a = np.pad(ya.astype(np.float64), pad, mode="edge")
    b = np.pad(yb.astype(np.float64), pad, mode="edge")
    return _ssim_valid(a, b)


# ----------------------------------------------------------------------- public API


def psnr(result: np.ndarray, target: np.ndarray, protocol: str = "matlab") -> float:
    """PSNR in dB of two HxWx3 uint8 RGB images (inf when their Y channels are equal)."""
    _check_protocol(protocol)
    _check_pair(result, target, batched=False)
    ya, yb = _luma(result[None], protocol), _luma(target[None], protocol)
    return float(_psnr_luma(ya, yb, protocol)[0])


def ssim(result: np.ndarray, target: np.ndarray, protocol: str = "matlab") -> float:
    """Mean SSIM of two HxWx3 uint8 RGB images on their Y channels."""
    _check_protocol(protocol)
    _check_pair(result, target, batched=False)
    ya, yb = _luma(result[None], protocol), _luma(target[None], protocol)
    return float(_ssim_luma(ya, yb, protocol)[0])


def evaluate(result: np.ndarray, target: np.ndarray, protocol: str = "matlab") -> dict[str, float]:
    """Both figures of one pair: ``{"psnr": dB, "ssim": value}``."""
    _check_protocol(protocol)
    _check_pair(result, target, batched=False)
    p, s = _evaluate_chunk(result[None], target[None], protocol)
    return {"psnr": float(p[0]), "ssim": float(s[0])}


def _evaluate_chunk(
    results: np.ndarray, targets: np.ndarray, protocol: str
) -> tuple[np.ndarray, np.ndarray]:
    ya, yb = _luma(results, protocol), _luma(targets, protocol)
    return _psnr_luma(ya, yb, protocol), _ssim_luma(ya, yb, protocol)


def evaluate_batch(
    results: np.ndarray,
    targets: np.ndarray,
    protocol: str = "matlab",
    *,
    chunk: int | None = None,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """PSNR[N] and SSIM[N] of N same-size pairs (NxHxWx3 uint8 RGB each).

    Gives the same numbers as calling ``evaluate`` per pair. Works ``chunk`` images
    at a time (default: as many as make ~512x512 pixels), bounding the float64
    temporaries to ~10 MB a chunk, on ``workers`` threads (default: one per CPU;
    numpy releases the GIL).
    """
    _check_protocol(protocol)
    _check_pair(results, targets, batched=True)
    n, h, w = results.shape[:3]
    if chunk is None:
        chunk = max(1, _CHUNK_PIXELS // (h * w))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    starts = range(0, n, chunk)
    workers = workers or os.cpu_count() or 1

    def run(i: int) -> tuple[np.ndarray, np.ndarray]:
        return _evaluate_chunk(results[i : i + chunk], targets[i : i + chunk], protocol)

    if workers == 1 or len(starts) == 1:
        parts = [run(i) for i in starts]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(run, starts))
    psnrs = np.concatenate([p for p, _ in parts])
    ssims = np.concatenate([s for _, s in parts])
    return psnrs, ssims
