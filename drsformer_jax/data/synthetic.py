"""A synthetic paired deraining set: procedural clean images plus rain streaks.

NumPy only (no TensorFlow), so it can be used anywhere. Everything is a pure
function of its seed: `make_pair(seed, split, index, ...)` gives the same bytes
on every machine, which lets training and evaluation run on a fresh machine
with no download.

Clean images are drawn procedurally (smooth gradients, low-frequency colour
variation, anti-aliased convex shapes and ellipses filled with flat colour,
stripes, checkers or noise, thin lines and film grain) so that a deraining
network has edges, textures and smooth regions to preserve.

Rain follows the usual synthetic-rain model of Rain100/Rain200 style sets:
streak layers (random density, length, width, angle, brightness, tapered ends,
blurred to their width) screen-blended onto the background. Two regimes:

* ``light`` (like Rain200L): one or two sparse layers of thin short streaks.
* ``heavy`` (like Rain200H): three to five dense layers in several directions,
  the far ones seen through haze (``t * B + (1 - t) * A``: contrast loss toward a
  bright atmospheric light), the nearest drawn after the haze.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from drsformer_jax.utils import images

# Bump when the generator changes, so that cached sets are regenerated.
GENERATOR_VERSION = 1

SPLITS = ("train", "test")
REGIMES = ("light", "heavy")


@dataclass(frozen=True)
class RainRegime:
    """Ranges (lo, hi) the per-image rain parameters are drawn from."""

    layers: tuple[int, int]  # number of streak layers, inclusive
    density: tuple[float, float]  # streaks per 10,000 pixels, per layer
    length: tuple[float, float]  # streak length in pixels
    sigma: tuple[float, float]  # streak half-width (Gaussian sigma) in pixels
    brightness: tuple[float, float]  # peak added intensity in [0, 1]
    layer_angle_spread: float  # degrees between the directions of layers
    haze: tuple[float, float]  # transmission t; (1, 1) = no haze
    near_layers: int  # layers drawn after the haze (closest to the camera)


LIGHT = RainRegime(
    layers=(1, 2), density=(12.0, 30.0), length=(8.0, 20.0), sigma=(0.35, 0.6),
    brightness=(0.5, 0.85), layer_angle_spread=6.0, haze=(1.0, 1.0), near_layers=0,
)
HEAVY = RainRegime(
    layers=(3, 5), density=(20.0, 40.0), length=(18.0, 50.0), sigma=(0.5, 1.4),
    brightness=(0.3, 0.6), layer_angle_spread=25.0, haze=(0.7, 0.88), near_layers=1,
)
_REGIMES = {"light": LIGHT, "heavy": HEAVY}


# --------------------------------------------------------------------------
# Clean images.


def make_clean_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A procedural clean image, HxWx3 uint8, drawn from `rng`."""
    img = _background(rng, height, width)
    scale = min(height, width)
    for _ in range(int(rng.integers(8, 20))):
        _draw_shape(img, rng, scale)
    for _ in range(int(rng.integers(1, 5))):
        _draw_line(img, rng)
    img += rng.normal(0.0, 0.01, size=(height, width, 1)).astype(np.float32)  # film grain
    return _to_uint8(img)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c0, c1 = rng.uniform(0.05, 0.95, size=(2, 3)).astype(np.float32)
    a = rng.uniform(0.0, 2.0 * np.pi)
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    t = x * np.float32(np.cos(a)) + y * np.float32(np.sin(a))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = c0 + (c1 - c0) * t[:, :, None]
    img += _smooth_noise(rng, h, w, cells=4, amplitude=0.1)
    return img.astype(np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int,
                  amplitude: float, channels: int = 3) -> np.ndarray:
    """Random values on a coarse grid, bilinearly upsampled to h x w."""
    grid = rng.normal(0.0, amplitude, size=(cells + 1, cells + 1, channels)).astype(np.float32)
    # Bilinear interpolation as two small matrix products (fast at any size).
    wy, wx = _interp_matrix(h, cells), _interp_matrix(w, cells)
    return np.stack([wy @ grid[:, :, c] @ wx.T for c in range(channels)], axis=-1)


def _interp_matrix(n: int, cells: int) -> np.ndarray:
    """n x (cells + 1) linear-interpolation weights from a coarse grid to n samples."""
    g = np.linspace(0.0, cells, n, dtype=np.float32)
    i0 = np.minimum(g.astype(np.int64), cells - 1)
    f = g - i0
    m = np.zeros((n, cells + 1), np.float32)
    m[np.arange(n), i0] = 1.0 - f
    m[np.arange(n), i0 + 1] = f
    return m


def _draw_shape(img: np.ndarray, rng: np.random.Generator, scale: int) -> None:
    h, w, _ = img.shape
    r = np.exp(rng.uniform(np.log(0.02), np.log(0.3))) * scale  # many small, few large
    cy, cx = rng.uniform(-0.1, 1.1) * h, rng.uniform(-0.1, 1.1) * w
    y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, h)
    x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, w)
    if y0 >= y1 or x0 >= x1:
        return
    y = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    x = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    if rng.random() < 0.4:  # ellipse
        ry = r * rng.uniform(0.4, 1.0)
        a = rng.uniform(0.0, np.pi)
        u = x * np.float32(np.cos(a)) + y * np.float32(np.sin(a))
        v = -x * np.float32(np.sin(a)) + y * np.float32(np.cos(a))
        d = np.sqrt((u / r) ** 2 + (v / ry) ** 2)
        inside = (1.0 - d) * np.float32(ry)  # ~ signed distance in pixels
    else:  # convex polygon: minimum distance to its edges
        n = int(rng.integers(3, 7))
        # Jittered regular angles: vertices on a circle in order, gaps < pi, so
        # the polygon is convex and contains its centroid.
        step = 2.0 * np.pi / n
        angles = rng.uniform(0, step) + step * (np.arange(n) + rng.uniform(-0.3, 0.3, n))
        vx, vy = r * np.cos(angles), r * np.sin(angles)
        mx, my = vx.mean(), vy.mean()
        inside = np.full((y1 - y0, x1 - x0), np.inf, np.float32)
        for i in range(n):
            ex, ey = vx[(i + 1) % n] - vx[i], vy[(i + 1) % n] - vy[i]
            norm = max(float(np.hypot(ex, ey)), 1e-6)
            nx, ny = -ey / norm, ex / norm
            if (mx - vx[i]) * nx + (my - vy[i]) * ny < 0:  # make the normal point inward
                nx, ny = -nx, -ny
            dist = ((x - np.float32(vx[i])) * np.float32(nx)
                    + (y - np.float32(vy[i])) * np.float32(ny))
            inside = np.minimum(inside, dist)
    alpha = np.clip(inside + 0.5, 0.0, 1.0)[:, :, None]  # 1-pixel anti-aliased edge
    if not alpha.any():
        return
    fill = _fill(rng, y, x)
    region = img[y0:y1, x0:x1]
    region += alpha * (fill - region)


def _fill(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    c0 = rng.uniform(0.0, 1.0, 3).astype(np.float32)
    kind = rng.integers(0, 5)
    if kind == 0:  # flat colour
        return np.broadcast_to(c0, (y.shape[0], x.shape[1], 3))
    c1 = rng.uniform(0.0, 1.0, 3).astype(np.float32)
    a = rng.uniform(0.0, np.pi)
    u = x * np.float32(np.cos(a)) + y * np.float32(np.sin(a))
    if kind == 1:  # stripes
        period = rng.uniform(3.0, 16.0)
        t = 0.5 + 0.5 * np.sin(u * np.float32(2 * np.pi / period))
    elif kind == 2:  # checkerboard
        cell = rng.uniform(3.0, 12.0)
        v = -x * np.float32(np.sin(a)) + y * np.float32(np.cos(a))
        t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    elif kind == 3:  # linear gradient
        span = max(float(u.max() - u.min()), 1.0)
        t = (u - u.min()) / np.float32(span)
    else:  # fine noise texture
        t = rng.uniform(0.0, 1.0, size=(y.shape[0], x.shape[1])).astype(np.float32)
    return c0 + (c1 - c0) * t[:, :, None]


def _draw_line(img: np.ndarray, rng: np.random.Generator) -> None:
    """A thin anti-aliased straight line (wires, branches, edges of objects)."""
    h, w, _ = img.shape
    p = rng.uniform(0.0, 1.0, 2) * (w, h)
    a = rng.uniform(0.0, np.pi)
    half_width = rng.uniform(0.4, 1.5)
    y = np.arange(h, dtype=np.float32)[:, None] - np.float32(p[1])
    x = np.arange(w, dtype=np.float32)[None, :] - np.float32(p[0])
    dist = np.abs(x * np.float32(np.sin(a)) - y * np.float32(np.cos(a)))
    alpha = np.clip(half_width + 0.5 - dist, 0.0, 1.0)[:, :, None]
    img += alpha * (rng.uniform(0.0, 1.0, 3).astype(np.float32) - img)


# --------------------------------------------------------------------------
# Rain.


def add_rain(clean: np.ndarray, rng: np.random.Generator, regime: str = "heavy") -> np.ndarray:
    """Composites random rain onto `clean` (HxWx3 uint8); returns rainy uint8."""
    params = _regime(regime)
    h, w, _ = clean.shape
    img = images.to_float(clean)
    base_angle = rng.uniform(-30.0, 30.0)
    n_layers = int(rng.integers(params.layers[0], params.layers[1] + 1))
    # Far layers first: shorter, thinner, dimmer; the last ones are nearest.
    depth = np.sort(rng.uniform(0.0, 1.0, n_layers))
    layers = []
    for z in depth:
        angle = base_angle + rng.uniform(-1.0, 1.0) * params.layer_angle_spread
        layers.append(_streak_layer(
            rng, h, w,
            density=_lerp(params.density, rng.random()),
            length=_lerp(params.length, 0.5 * z + 0.5 * rng.random()),
            sigma=_lerp(params.sigma, z),
            brightness=_lerp(params.brightness, 0.5 * z + 0.5 * rng.random()),
            angle=angle,
        ))
    n_near = min(params.near_layers, n_layers - 1)
    far = _screen_sum(layers[: n_layers - n_near])
    img = _screen(img, far[:, :, None])
    if params.haze != (1.0, 1.0):
        t = np.float32(rng.uniform(*params.haze))
        light = rng.uniform(0.75, 0.95) + rng.uniform(-0.03, 0.03, 3)  # slightly tinted
        # Transmission varies smoothly a little across the image.
        t_map = np.clip(t + _smooth_noise(rng, h, w, cells=2, amplitude=0.05, channels=1),
                        0.3, 1.0)
        img = t_map * img + (1.0 - t_map) * light.astype(np.float32)
    if n_near:
        img = _screen(img, _screen_sum(layers[n_layers - n_near:])[:, :, None])
    return _to_uint8(img)


def _regime(regime: str) -> RainRegime:
    try:
        return _REGIMES[regime]
    except KeyError:
        raise ValueError(f"unknown rain regime {regime!r}; expected one of {REGIMES}") from None


def _lerp(lo_hi: tuple[float, float], t: float) -> float:
    return float(lo_hi[0] + (lo_hi[1] - lo_hi[0]) * t)


def _screen(base: np.ndarray, layer: np.ndarray) -> np.ndarray:
    # Screen blending: a bright streak brightens a dark background more than a
    # bright one and never pushes it past white.
    return base + layer * (1.0 - base)


def _screen_sum(layers: Sequence[np.ndarray]) -> np.ndarray:
    out = np.zeros_like(layers[0])
    for layer in layers:
        out = _screen(out, layer)
    return out


def _streak_layer(rng: np.random.Generator, h: int, w: int, *, density: float, length: float,
                  sigma: float, brightness: float, angle: float) -> np.ndarray:
    """One layer of roughly parallel streaks, HxW float32 in [0, 1]."""
    margin = 0.7 * length  # half the longest streak: streaks may enter from outside
    count = max(1, int(round(density * (h + 2 * margin) * (w + 2 * margin) / 1e4)))
    lengths = length * rng.uniform(0.6, 1.4, count)
    theta = np.deg2rad(angle + rng.normal(0.0, 2.0, count))
    cx = rng.uniform(-margin, w + margin, count)
    cy = rng.uniform(-margin, h + margin, count)
    peak = brightness * rng.uniform(0.5, 1.0, count)
    k = int(np.ceil(lengths.max())) + 1  # samples along each streak, <= 1 px apart
    t = np.linspace(-0.5, 0.5, k)
    px = cx[:, None] + t[None, :] * (lengths * np.sin(theta))[:, None]
    py = cy[:, None] + t[None, :] * (lengths * np.cos(theta))[:, None]
    taper = np.sqrt(np.clip(1.0 - (2.0 * t) ** 2, 0.0, 1.0))  # drops fade at both ends
    weight = peak[:, None] * taper[None, :] * (lengths / (k - 1))[:, None]
    layer = _splat(px.ravel(), py.ravel(), weight.ravel(), h, w)
    # Blur to the streak width; scale so a streak's centre keeps its brightness.
    layer = _gaussian_blur(layer, sigma) * np.float32(np.sqrt(2 * np.pi) * max(sigma, 0.4))
    return np.clip(layer, 0.0, 1.0)


def _splat(x: np.ndarray, y: np.ndarray, weight: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear splatting of weighted points onto an HxW canvas."""
    # Points outside the frame are clamped onto a 1-pixel ring around it that
    # is cut off at the end (cheaper than masking them out).
    x = np.clip(x, -1.0, w) + 1.0
    y = np.clip(y, -1.0, h) + 1.0
    x0 = x.astype(np.int64)
    y0 = y.astype(np.int64)
    fx = (x - x0) * weight
    fy = y - y0
    wp = w + 3
    base = y0 * wp + x0
    idx = np.concatenate([base, base + 1, base + wp, base + wp + 1])
    wts = np.concatenate([(1 - fy) * (weight - fx), (1 - fy) * fx, fy * (weight - fx), fy * fx])
    out = np.bincount(idx, weights=wts, minlength=(h + 3) * wp)
    return out.reshape(h + 3, wp)[1:h + 1, 1:w + 1].astype(np.float32)


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array (edge-replicated borders)."""
    radius = max(1, int(np.ceil(3.0 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        xp = np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        out = np.zeros_like(x)
        for i, tap in enumerate(taps):
            out += tap * (xp[i:i + n] if axis == 0 else xp[:, i:i + n])
        x = out
    return x


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------
# Pairs and data sets.


def make_pair(seed: int, split: str, index: int, height: int, width: int,
              regime: str = "heavy") -> tuple[np.ndarray, np.ndarray]:
    """(rainy, clean) uint8 HxWx3, a pure function of the arguments.

    The clean image depends on (seed, split, index, size) only, so the light and
    heavy sets of one seed share their backgrounds, as Rain200L and Rain200H do.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    _regime(regime)
    key = [int(seed), SPLITS.index(split), int(index)]
    clean = make_clean_image(np.random.default_rng(key), height, width)
    rainy = add_rain(clean, np.random.default_rng([*key, 1 + REGIMES.index(regime)]), regime)
    return rainy, clean


def example_name(index: int) -> str:
    """File name of example `index`; zero-padded so that name order = index order."""
    return f"{index:05d}.png"


def write_dataset(root: str | os.PathLike, name: str, num_train: int, num_test: int,
                  size: int | tuple[int, int], regime: str = "heavy", seed: int = 0,
                  progress: bool = False) -> Path:
    """Writes `<root>/{train,test}/<name>/{input,target}/NNNNN.png`; returns root.

    The release's folder layout, so that the synthetic set goes through the same
    folder code path as the real ones. Files are written atomically, so two
    processes writing the same set at once leave a correct set behind.
    """
    height, width = (size, size) if isinstance(size, int) else size
    root = Path(root)
    jobs = [("train", i) for i in range(num_train)] + [("test", i) for i in range(num_test)]
    def write(job: tuple[str, int]) -> None:
        split, i = job
        rainy, clean = make_pair(seed, split, i, height, width, regime)
        folder = root / split / name
        images.write_image(folder / "input" / example_name(i), rainy)
        images.write_image(folder / "target" / example_name(i), clean)

    # Each pair depends only on (seed, split, index): threads (NumPy and the PNG
    # encoder release the GIL) give the same files in less time.
    with (tqdm(total=len(jobs), desc=f"synthetic {name} ({regime})", unit=" pairs",
               disable=not progress) as bar,
          ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool):
        for _ in pool.map(write, jobs):
            bar.update(1)
    return root


def ensure_dataset(cache_root: str | os.PathLike, name: str, num_train: int, num_test: int,
                   size: int | tuple[int, int], regime: str = "heavy", seed: int = 0,
                   progress: bool = True) -> Path:
    """Writes the set under `cache_root/<key>/` once; returns that folder.

    `<key>` names every parameter and GENERATOR_VERSION, so a changed parameter
    gives a new folder rather than a stale set. A marker file, written last,
    says the set is complete.
    """
    height, width = (size, size) if isinstance(size, int) else size
    params = {"name": name, "num_train": int(num_train), "num_test": int(num_test),
              "height": int(height), "width": int(width), "regime": regime, "seed": int(seed),
              "generator_version": GENERATOR_VERSION}
    key = (f"{name}_{regime}_seed{seed}_{height}x{width}_train{num_train}_test{num_test}"
           f"_v{GENERATOR_VERSION}")
    folder = Path(cache_root) / key
    marker = folder / "COMPLETE.json"
    if marker.exists() and json.loads(marker.read_text()) == params:
        return folder
    write_dataset(folder, name, num_train, num_test, (height, width), regime, seed,
                  progress=progress)
    images.write_bytes_atomic(marker, (json.dumps(params, indent=1) + "\n").encode())
    return folder
