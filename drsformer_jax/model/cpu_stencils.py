"""The CPU stencil engine: depthwise and grouped convolutions as shifted multiply-adds.

Performance only: this is `conv_impl="shift"` of `convolution.grouped_conv`, and it
equals the plain `lax.conv_general_dilated` formulation (`conv_impl="xla"`) in values
and gradients up to float rounding; see `test_cpu_stencils_equal_lax_conv` in
tests/test_model.py, the test that says so. Nothing here is part of the paper's model.

Why it exists: XLA:CPU runs `feature_group_count` convolutions through a slow generic
path. Here a convolution is a sum of shifted multiply-adds, one per kernel tap and
group member, which XLA fuses into one loop over the output (`shifted_depthwise_sum`,
with a hand-written VJP). Grouped convolutions first split the input into one
contiguous array per group member. In NCHW with 'same' padding the taps are
contiguous slices of flattened, row-padded H x W planes with the columns that wrap
into the next row masked (`_flat_shift_sum`), which XLA:CPU vectorises whatever it
fuses them with. Kernels are HWIO; TPUs use the NHWC form as well (see
`convolution.FORMULATIONS`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def stencil_grouped_conv(x: jax.Array, kernel: jax.Array, dilation: int, ph: int, pw: int,
                         channels_first: bool) -> jax.Array:
    """`convolution.grouped_conv` as shifted multiply-adds, with its padding resolved.

    x: (N, H, W, G * m), or (N, G * m, H, W) with `channels_first`; kernel (kh, kw, m, G)
    (output channel g reads input channels g*m .. g*m+m-1); zero padding (ph, pw) per
    side (negative crops); stride 1.
    """
    m = kernel.shape[2]
    if m == 1:
        return shifted_depthwise_sum((x,), (kernel[:, :, 0, :],), dilation, ph, pw,
                                     channels_first)
    # Member r of group g is input channel g*m + r. Split the input once into m
    # arrays (member r of every group), so that the taps are contiguous multiply-adds
    # over whole channel vectors or planes; summing interleaved channel pairs after a
    # depthwise conv instead is much slower on XLA:CPU.
    axis = 1 if channels_first else x.ndim - 1
    members = tuple(lax.slice_in_dim(x, r, None, m, axis=axis) for r in range(m))
    if not channels_first:
        # Channels last, XLA would otherwise re-derive the strided channel slices in
        # every tap (strided vector loads); channels first they are whole planes.
        members = lax.optimization_barrier(members)
    return shifted_depthwise_sum(members, tuple(kernel[:, :, r, :] for r in range(m)),
                                 dilation, ph, pw, channels_first)


def pad_spatial(x: jax.Array, ph: int, pw: int, channels_first: bool) -> jax.Array:
    """Zero padding of H and W by (ph, pw) per side; negative values crop."""
    if ph == 0 and pw == 0:
        return x
    spatial = [(ph, ph, 0), (pw, pw, 0)]
    config = ([(0, 0, 0), (0, 0, 0)] + spatial if channels_first
              else [(0, 0, 0)] + spatial + [(0, 0, 0)])
    return lax.pad(x, jnp.zeros((), x.dtype), config)


def _tap(xp: jax.Array, i: int, j: int, h: int, w: int, channels_first: bool) -> jax.Array:
    if channels_first:
        return xp[:, :, i:i + h, j:j + w]
    return xp[:, i:i + h, j:j + w, :]


def _per_channel(v: jax.Array, channels_first: bool) -> jax.Array:
    """A (C,) vector shaped to broadcast against the activations."""
    return v[:, None, None] if channels_first else v


def _out_size(x: jax.Array, kh: int, kw: int, dilation: int, ph: int, pw: int,
              channels_first: bool) -> tuple[int, int]:
    h, w = (x.shape[2], x.shape[3]) if channels_first else (x.shape[1], x.shape[2])
    return h + 2 * ph - dilation * (kh - 1), w + 2 * pw - dilation * (kw - 1)


def _is_same_static(x: jax.Array, kh: int, kw: int, dilation: int, ph: int, pw: int) -> bool:
    """Static shape and 'same' padding: the output is as large as the input."""
    return (2 * ph == dilation * (kh - 1) and 2 * pw == dilation * (kw - 1)
            and all(isinstance(d, int) for d in x.shape))


def _flat_padded(x: jax.Array, ph: int, pw: int) -> tuple[jax.Array, int]:
    """(N, C, H, W) -> (N, C, (H + 2 r) W) with r >= ph + ceil(pw / W) zero rows above
    and below, each plane flattened, and the offset of row -ph, column 0.

    Tap (i, j) of a 'same' convolution at output pixel p = y W + x is then element
    offset + p + i d W + j d - pw: one contiguous slice per tap of one padded copy
    (the rows past ph take the slices' overhang of pw at both ends). r is 3 or 7 where
    that suffices, so that the convolutions of one input (MSFN's 3x3 and 5x5, MEFC's
    six experts) pad it alike and XLA keeps one padded copy for all of them.

    x is materialised before it is padded (an optimization barrier): XLA:CPU otherwise
    fuses a producing stencil (another convolution, or its input gradient in the
    backward pass) into the pad, and that fused loop runs at scalar speed.
    """
    x = lax.optimization_barrier(x)
    n, c, h, w = x.shape
    need = ph - (-pw // w)
    r = 3 if need <= 3 else max(7, need)
    rows = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (0, 0, 0), (r, r, 0), (0, 0, 0)])
    return rows.reshape(n, c, (h + 2 * r) * w), (r - ph) * w


def _mask_columns(t: jax.Array, h: int, w: int, shift: int) -> jax.Array:
    """Zeroes the pixels of flattened (N, C, H W) planes whose column x + shift is
    outside 0 .. W-1: there the flat slice of a tap read a neighbouring row."""
    if shift == 0:
        return t
    col = lax.broadcasted_iota(jnp.int32, (h, w), 1).reshape(h * w)
    valid = (col < w - shift) if shift > 0 else (col >= -shift)
    return jnp.where(valid, t, jnp.zeros((), t.dtype))


def _flat_taps(x: jax.Array, kh: int, kw: int, dilation: int, ph: int,
               pw: int) -> list[list[jax.Array]]:
    """taps[i][j]: tap (i, j) of a 'same' convolution of NCHW x, as (N, C, H W) slices of
    one flattened, row-padded copy (columns that wrap into the next row not yet masked)."""
    n, c, h, w = x.shape
    xf, offset = _flat_padded(x, ph, pw)

    def tap(i: int, j: int) -> jax.Array:
        start = offset + (i * w + j) * dilation - pw
        return lax.slice_in_dim(xf, start, start + h * w, axis=2)

    return [[tap(i, j) for j in range(kw)] for i in range(kh)]


def _flat_shift_sum(xs: tuple[jax.Array, ...], kernels: tuple[jax.Array, ...],
                    dilation: int, ph: int, pw: int) -> jax.Array:
    """`_shift_sum` of NCHW inputs with 'same' padding over flattened planes.

    Every tap is a contiguous slice of a flattened plane, so the fused loop
    vectorises whatever shape its consumer gives it. With (N, C, H, W) taps, XLA:CPU
    fuses a following matmul's (N, C, H*W) reshape into the stencil and indexes it by
    division and remainder, which does not vectorise: a depthwise conv followed by a
    1x1 conv (MEFC, MSFN, TKSA) then runs much slower than the two apart.
    """
    kh, kw = kernels[0].shape[:2]
    n, c, h, w = xs[0].shape
    taps = [_flat_taps(x, kh, kw, dilation, ph, pw) for x in xs]
    out = None
    for j in range(kw):
        part = None
        for i in range(kh):
            for x_taps, kernel in zip(taps, kernels, strict=True):
                term = x_taps[i][j] * kernel[i, j][:, None]
                part = term if part is None else part + term
        part = _mask_columns(part, h, w, j * dilation - pw)
        out = part if out is None else out + part
    return out.reshape(n, c, h, w)


def _shift_sum(xs: tuple[jax.Array, ...], kernels: tuple[jax.Array, ...], dilation: int,
               ph: int, pw: int, channels_first: bool) -> jax.Array:
    """sum over r and taps (i, j) of pad(xs[r]) shifted by (i*d, j*d), times kernels[r][i, j]."""
    kh, kw = kernels[0].shape[:2]
    if channels_first and _is_same_static(xs[0], kh, kw, dilation, ph, pw):
        return _flat_shift_sum(xs, kernels, dilation, ph, pw)
    h, w = _out_size(xs[0], kh, kw, dilation, ph, pw, channels_first)
    padded = [pad_spatial(x, ph, pw, channels_first) for x in xs]
    out = None
    for i in range(kh):
        for j in range(kw):
            for xp, kernel in zip(padded, kernels, strict=True):
                tap = _tap(xp, i * dilation, j * dilation, h, w, channels_first)
                term = tap * _per_channel(kernel[i, j], channels_first)
                out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def shifted_depthwise_sum(xs: tuple[jax.Array, ...], kernels: tuple[jax.Array, ...],
                          dilation: int, ph: int, pw: int,
                          channels_first: bool = False) -> jax.Array:
    """sum_r depthwise_conv(xs[r], kernels[r]) as shifted multiply-adds, one fused pass.

    Every xs[r] has the same shape (NHWC, or NCHW with `channels_first`), every
    kernel is (kh, kw, C); zero padding (ph, pw) per side (negative crops),
    stride 1, so the output is H + 2 ph - d (kh - 1) high.
    """
    return _shift_sum(xs, kernels, dilation, ph, pw, channels_first)


def _shifted_depthwise_sum_fwd(xs, kernels, dilation, ph, pw, channels_first):
    return _shift_sum(xs, kernels, dilation, ph, pw, channels_first), (xs, kernels)


def _shifted_depthwise_sum_bwd(dilation, ph, pw, channels_first, residuals, g):
    # Written out because autodiff of the pads and slices is slower on CPU: each input
    # gradient is the same shifted sum with the flipped kernel, each kernel gradient a
    # sum over (N, H, W) per tap. The per-tap sums are ONE variadic reduce (k*k
    # accumulators, one pass over g): as k*k separate `jnp.sum`s, XLA:CPU's YNNPACK
    # reduce fusion takes them and materialises every shifted tap of x as its own
    # full-size buffer, all alive at once (gigabytes per block of the full model).
    # Only the inputs and kernels are saved for the backward (the residuals above).
    xs, kernels = residuals
    kh, kw = kernels[0].shape[:2]
    qh, qw = dilation * (kh - 1) - ph, dilation * (kw - 1) - pw
    dxs = tuple(_shift_sum((g,), (k[::-1, ::-1],), dilation, qh, qw, channels_first)
                for k in kernels)
    # Accumulated in at least float32, as jnp.sum does for 16-bit floats.
    acc = jnp.promote_types(g.dtype, jnp.float32)
    zero = jnp.zeros((), acc)
    dks = []
    for x, kernel in zip(xs, kernels, strict=True):
        prods, axes = _tap_products(x, g, kh, kw, dilation, ph, pw, channels_first)
        sums = lax.reduce(tuple(p.astype(acc) for p in prods), (zero,) * len(prods),
                          lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True)), axes)
        dks.append(jnp.stack(sums).reshape(kernel.shape).astype(kernel.dtype))
    return dxs, tuple(dks)


def _tap_products(x: jax.Array, g: jax.Array, kh: int, kw: int, dilation: int, ph: int,
                  pw: int, channels_first: bool) -> tuple[list[jax.Array], tuple[int, ...]]:
    """Tap (i, j) of x times the output gradient g, in (i, j) order, and the axes whose
    sum is that tap's kernel gradient (the flat form where `_shift_sum` used it)."""
    if channels_first and _is_same_static(x, kh, kw, dilation, ph, pw):
        n, c, h, w = x.shape
        taps = _flat_taps(x, kh, kw, dilation, ph, pw)
        gf = g.reshape(n, c, h * w)
        masked = [_mask_columns(gf, h, w, j * dilation - pw) for j in range(kw)]
        # The reduce over (N, H W) vectorises only where XLA may reassociate float
        # sums, as the CPU train step allows (`train.train_compiler_options`).
        return [taps[i][j] * masked[j] for i in range(kh) for j in range(kw)], (0, 2)
    h, w = (g.shape[2], g.shape[3]) if channels_first else (g.shape[1], g.shape[2])
    xp = pad_spatial(x, ph, pw, channels_first)
    prods = [_tap(xp, i * dilation, j * dilation, h, w, channels_first) * g
             for i in range(kh) for j in range(kw)]
    return prods, ((0, 2, 3) if channels_first else (0, 1, 2))


shifted_depthwise_sum.defvjp(_shifted_depthwise_sum_fwd, _shifted_depthwise_sum_bwd)
