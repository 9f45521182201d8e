"""Convolutions of DRSformer, with HWIO kernels, in either activation layout.

Activations are NHWC, or NCHW ("channels first") when a module's
`channels_first` is set; kernels are always HWIO, as stored in checkpoints. The
model picks its layout with `resolve_layout` (see `DRSformer.layout`): NCHW on
CPU, where the depthwise convolutions below become stencils over contiguous
H x W planes (faster on XLA:CPU than over channel vectors, and the grouped
convolutions' channel pairs become whole planes), NHWC elsewhere.

Dense convolutions go through `Conv` (1x1 ones are matmuls). Depthwise and
grouped convolutions (every group reads a few consecutive input channels and
writes one output channel) go through the single function `grouped_conv`, which
has several formulations:

- "xla": one `lax.conv_general_dilated` with `feature_group_count`. Best on
  GPU/TPU, but XLA on CPU runs it through a very slow generic path.
- "shift": a sum of shifted multiply-adds, one per kernel tap and group member,
  fused by XLA into one loop over the output (`shifted_depthwise_sum`, with a
  hand-written VJP). Grouped convolutions first split the input into one
  contiguous array per group member. ~10x faster than "xla" on CPU. In NCHW
  with 'same' padding the taps are contiguous slices of flattened planes
  (`_flat_shift_sum`), which XLA:CPU vectorises whatever it fuses them with.

"auto" picks per platform (`FORMULATIONS`: NCHW stencils on CPU, NHWC stencils on
TPU, where XLA:TPU expands `feature_group_count` convolutions into lane-padded
copies, XLA's grouped convolutions on GPU), for the platform the program is
compiled for when the caller names it (`DRSformer.for_platform`), else for JAX's
default backend. All give the same numbers up to float rounding.

Matmuls and dense convolutions run at the layers' `precision` (JAX's names:
"default", "high", "highest"; None follows `jax.default_matmul_precision`). On
CPU every one of them is float32; on accelerators "default" is bfloat16 passes
(TPU) or TF32 (recent NVIDIA GPUs), and "highest" is true float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from drsformer_jax.model.initializers import torch_bias_init, torch_default_init

Dtype = Any
CONV_IMPLS = ("auto", "xla", "shift")
LAYOUTS = ("auto", "NHWC", "NCHW")
PRECISIONS = (None, "default", "high", "highest")


class Formulation(NamedTuple):
    conv_impl: str
    layout: str
    recompute: bool  # MSFN's branches and MEFC's steps recomputed in the backward pass


# What "auto" means per platform, chosen from the compiled programs' memory and
# traffic (docs/accelerators.md); other platforms: "gpu". Recomputing MSFN's branches
# and MEFC's steps saves accelerator memory; on CPU it would cost train-step time.
FORMULATIONS = {"cpu": Formulation("shift", "NCHW", False),
                "tpu": Formulation("shift", "NHWC", True),
                "gpu": Formulation("xla", "NHWC", True)}


def formulation(platform: str | None = None) -> Formulation:
    """The formulation of `platform` (default: JAX's default backend)."""
    platform = platform or jax.default_backend()
    return FORMULATIONS.get(platform, FORMULATIONS["gpu"])


def resolve_conv_impl(impl: str, platform: str | None = None) -> str:
    """Maps "auto" to the formulation of `platform` (default: JAX's default backend)."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    return formulation(platform).conv_impl if impl == "auto" else impl


def resolve_layout(layout: str, platform: str | None = None) -> str:
    """Maps "auto" to the activation layout of `platform` (default: JAX's default backend)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return formulation(platform).layout if layout == "auto" else layout


def resolve_recompute(recompute: bool | str, platform: str | None = None) -> bool:
    """Maps "auto" to whether `platform` recomputes MSFN's branches and MEFC's steps."""
    if recompute not in ("auto", True, False):
        raise ValueError(f"recompute must be 'auto', True or False, got {recompute!r}")
    return formulation(platform).recompute if recompute == "auto" else bool(recompute)


def check_precision(precision: str | None) -> str | None:
    if precision not in PRECISIONS:
        raise ValueError(f"matmul precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def channel_axis(channels_first: bool) -> int:
    return 1 if channels_first else -1


def _dimension_numbers(channels_first: bool) -> tuple[str, str, str]:
    return ("NCHW", "HWIO", "NCHW") if channels_first else ("NHWC", "HWIO", "NHWC")


def pointwise(x: jax.Array, kernel: jax.Array, channels_first: bool = False,
              precision: str | None = None) -> jax.Array:
    """1x1 convolution: a matmul over channels with a (C_in, C_out) kernel, or with an
    (N, C_in, C_out) kernel of each example's own.

    Channels first, each image is kernel^T (C_out x C_in) times its (C_in x H*W)
    plane matrix: one GEMM per image with no transposes (a plain einsum would
    make XLA:CPU transpose the activations twice).
    """
    per_example = kernel.ndim == 3
    if not channels_first:
        return jnp.einsum("nhwc,ncd->nhwd" if per_example else "nhwc,cd->nhwd", x, kernel,
                          precision=precision)
    n, c, h, w = x.shape
    kt = (jnp.swapaxes(kernel, 1, 2) if per_example
          else jnp.broadcast_to(kernel.T, (n, kernel.shape[1], c)))
    y = lax.dot_general(kt, x.reshape(n, c, h * w), (((2,), (1,)), ((0,), (0,))),
                        precision=precision)
    return y.reshape(n, kernel.shape[-1], h, w)


def grouped_conv(x: jax.Array, kernel: jax.Array, *, dilation: int = 1,
                 impl: str = "auto", channels_first: bool = False,
                 padding: int | None = None, precision: str | None = None) -> jax.Array:
    """Grouped convolution with zero padding and stride 1 ('same' by default).

    Args:
      x: (N, H, W, G * m) input, or (N, G * m, H, W) with `channels_first`.
      kernel: (kh, kw, m, G): output channel g reads input channels g*m .. g*m+m-1,
        PyTorch's `groups=G` layout for weight (G, m, kh, kw) transposed to HWIO.
        m = 1 is a depthwise convolution.
      dilation: kernel dilation.
      impl: "auto", "xla" or "shift" (see module docstring).
      channels_first: NCHW activations.
      padding: zeros added to each side of H and W (negative crops); default
        dilation * (k - 1) // 2, the 'same' padding.
      precision: of the "xla" convolution (the "shift" sums are exact products).
    """
    kh, kw, m, groups = kernel.shape
    cax = channel_axis(channels_first)
    if x.shape[cax] != groups * m:
        raise ValueError(f"grouped_conv: input has {x.shape[cax]} channels, kernel "
                         f"{tuple(kernel.shape)} expects {groups * m}")
    if padding is None:
        ph, pw = dilation * (kh - 1) // 2, dilation * (kw - 1) // 2
    else:
        ph = pw = padding
    if resolve_conv_impl(impl) == "xla":
        if min(ph, pw) < 0:
            x = _pad(x, min(ph, 0), min(pw, 0), channels_first)
            ph, pw = max(ph, 0), max(pw, 0)
        return lax.conv_general_dilated(
            x, kernel, window_strides=(1, 1), padding=((ph, ph), (pw, pw)),
            rhs_dilation=(dilation, dilation),
            dimension_numbers=_dimension_numbers(channels_first), feature_group_count=groups,
            precision=precision)
    if m == 1:
        return shifted_depthwise_sum((x,), (kernel[:, :, 0, :],), dilation, ph, pw,
                                     channels_first)
    # Member r of group g is input channel g*m + r. Split the input once into m
    # arrays (member r of every group), so that the taps are contiguous multiply-adds
    # over whole channel vectors or planes; summing interleaved channel pairs after a
    # depthwise conv instead is ~8x slower on XLA:CPU.
    members = tuple(lax.slice_in_dim(x, r, None, m, axis=cax % x.ndim) for r in range(m))
    if not channels_first:
        # Channels last, XLA would otherwise re-derive the strided channel slices in
        # every tap (strided vector loads); channels first they are whole planes.
        members = lax.optimization_barrier(members)
    return shifted_depthwise_sum(members, tuple(kernel[:, :, r, :] for r in range(m)),
                                 dilation, ph, pw, channels_first)


def _pad(x: jax.Array, ph: int, pw: int, channels_first: bool) -> jax.Array:
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
    backward pass) into the pad, and that fused loop runs at scalar speed (8 % of the
    forward, 5 % of the train step).
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
    1x1 conv (MEFC, MSFN, TKSA) ran 4-5x slower than the two apart.
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
    padded = [_pad(x, ph, pw, channels_first) for x in xs]
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
    # Written out because autodiff of the pads and slices is 1.4x slower on CPU:
    # each input gradient is the same shifted sum with the flipped kernel, each
    # kernel gradient a sum over (N, H, W) per tap. The per-tap sums are ONE variadic
    # reduce (k*k accumulators, one pass over g): as k*k separate `jnp.sum`s, XLA:CPU's
    # YNNPACK reduce fusion takes them and materialises every shifted tap of x as its
    # own full-size buffer, all alive at once, which made the full model's gradient
    # grow by gigabytes per block (> 23 GB at 2 x 64 x 64; 1.4 GB of buffers now).
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
        # The reduce over (N, H W) vectorises where XLA may reassociate float sums, as
        # the CPU train step allows (`train.train_compiler_options`): one 5x5 kernel
        # gradient at 2 x 254 x 128 x 128 takes 20 ms then, 60 ms without.
        return [taps[i][j] * masked[j] for i in range(kh) for j in range(kw)], (0, 2)
    h, w = (g.shape[2], g.shape[3]) if channels_first else (g.shape[1], g.shape[2])
    xp = _pad(x, ph, pw, channels_first)
    prods = [_tap(xp, i * dilation, j * dilation, h, w, channels_first) * g
             for i in range(kh) for j in range(kw)]
    return prods, ((0, 2, 3) if channels_first else (0, 1, 2))


shifted_depthwise_sum.defvjp(_shifted_depthwise_sum_fwd, _shifted_depthwise_sum_bwd)


def _keyword(default: Any) -> Any:
    return dataclasses.field(default=default, kw_only=True)


class Layer(nn.Module):
    """What every layer of the network is told, as keyword-only fields.

    `channels_first`: NCHW activations (else NHWC); `conv_impl`: the formulation
    of depthwise / grouped convolutions (see `grouped_conv`); `dtype`: the
    computation dtype; `param_dtype`: the parameters'; `precision`: of matmuls and
    convolutions (see the module docstring). `options()` passes them on.
    """

    channels_first: bool = _keyword(False)
    conv_impl: str = _keyword("auto")
    dtype: Dtype = _keyword(jnp.float32)
    param_dtype: Dtype = _keyword(jnp.float32)
    precision: str | None = _keyword(None)

    def options(self) -> dict[str, Any]:
        return dict(channels_first=self.channels_first, conv_impl=self.conv_impl,
                    dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)


def conv_kernel(module: nn.Module, kernel_size: int, inputs: int, features: int,
                dtype: Dtype) -> jax.Array:
    """The (k, k, inputs, features) HWIO kernel parameter "kernel" of `module`, with
    PyTorch's default initialisation: the one declaration of every convolution's kernel."""
    return module.param("kernel", torch_default_init,
                        (kernel_size, kernel_size, inputs, features), dtype)


class ConvKernel(Layer):
    """The kernel of a bias-free `Conv` (or of a depthwise `GroupedConv` with
    `inputs_per_group=1`), declared as those declare it but returned, not applied:
    for callers that fold it into a following linear map (MEFC does).

    Called with the number of input channels (1 for a depthwise kernel); returns the
    kernel in the computation dtype or float32, whichever is wider (folding is done
    in at least float32).
    """

    features: int
    kernel_size: int = 1

    @nn.compact
    def __call__(self, inputs: int) -> jax.Array:
        kernel = conv_kernel(self, self.kernel_size, inputs, self.features, self.param_dtype)
        return kernel.astype(jnp.promote_types(self.dtype, jnp.float32))


class Conv(Layer):
    """Dense 2-D convolution, stride 1, 'same' zero padding, HWIO kernel."""

    features: int
    kernel_size: int = 1
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, cin = self.kernel_size, x.shape[channel_axis(self.channels_first)]
        kernel = conv_kernel(self, k, cin, self.features, self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if k == 1:
            # A 1x1 convolution is a matmul over channels; XLA tiles dots better.
            y = pointwise(x, kernel[0, 0], self.channels_first, self.precision)
        else:
            p = (k - 1) // 2
            y = lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)),
                                         dimension_numbers=_dimension_numbers(self.channels_first),
                                         precision=self.precision)
        if self.use_bias:
            bias = self.param("bias", torch_bias_init(cin * k * k), (self.features,),
                              self.param_dtype)
            y = y + _per_channel(bias.astype(self.dtype), self.channels_first)
        return y


class GroupedConv(Layer):
    """Depthwise (inputs_per_group=1) or grouped conv; see `grouped_conv`."""

    features: int
    kernel_size: int
    inputs_per_group: int = 1
    dilation: int = 1
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, m = self.kernel_size, self.inputs_per_group
        kernel = conv_kernel(self, k, m, self.features, self.param_dtype)
        y = grouped_conv(x.astype(self.dtype), kernel.astype(self.dtype),
                         dilation=self.dilation, impl=self.conv_impl,
                         channels_first=self.channels_first, precision=self.precision)
        if self.use_bias:
            bias = self.param("bias", torch_bias_init(m * k * k), (self.features,),
                              self.param_dtype)
            y = y + _per_channel(bias.astype(self.dtype), self.channels_first)
        return y


DepthwiseConv = functools.partial(GroupedConv, inputs_per_group=1)
