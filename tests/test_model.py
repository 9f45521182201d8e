"""Semantics of the DRSformer building blocks (small shapes, no fixtures)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drsformer_jax.compile_report import residual_leaves
from drsformer_jax.model.attention import TopKSparseAttention, topk_masks, topk_sizes
from drsformer_jax.model.convolution import grouped_conv, pointwise
from drsformer_jax.model.drsformer import (
    DRSformer,
    count_params,
    init_params,
    pixel_shuffle,
    pixel_unshuffle,
)
from drsformer_jax.model.feedforward import MixedScaleFeedForward, hidden_features
from drsformer_jax.model.initializers import initial_value
from drsformer_jax.model.mefc import avg_pool_3x3, fold_expert_kernels
from drsformer_jax.model.normalization import LayerNorm

TINY = dict(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 2, 2))


def test_pixel_unshuffle_matches_pytorch_channel_order():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 4, 3)).astype(np.float32)
    y = np.asarray(pixel_unshuffle(jnp.asarray(x)))
    assert y.shape == (2, 3, 2, 12)
    for c in range(3):
        for dy in range(2):
            for dx in range(2):
                # PyTorch: output channel c*4 + dy*2 + dx holds input channel c at (dy, dx).
                np.testing.assert_array_equal(y[..., c * 4 + dy * 2 + dx], x[:, dy::2, dx::2, c])


def test_pixel_shuffle_inverts_unshuffle():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, 10, 5)), jnp.float32)
    np.testing.assert_array_equal(pixel_shuffle(pixel_unshuffle(x)), x)
    z = jnp.asarray(np.random.default_rng(2).normal(size=(1, 3, 4, 20)), jnp.float32)
    np.testing.assert_array_equal(pixel_unshuffle(pixel_shuffle(z)), z)


@pytest.mark.parametrize("c,expected", [(48, (24, 32, 36, 38)), (96, (48, 64, 72, 76))])
def test_topk_sizes_are_the_releases(c, expected):
    assert topk_sizes(c) == expected


@pytest.mark.parametrize("c", [48, 96])
def test_topk_masks_keep_exactly_k_largest_per_row(c):
    scores = jnp.asarray(np.random.default_rng(c).normal(size=(2, 3, c, c)), jnp.float32)
    ks = topk_sizes(c)
    masks = topk_masks(scores, ks)
    s = np.asarray(scores)
    for k, mask in zip(ks, masks, strict=True):
        mask = np.asarray(mask)
        assert (mask.sum(-1) == k).all()
        kept_min = np.where(mask, s, np.inf).min(-1)
        dropped_max = np.where(mask, -np.inf, s).max(-1)
        assert (kept_min > dropped_max).all()


def test_topk_masks_keep_exactly_k_even_with_ties():
    scores = jnp.zeros((1, 1, 10, 10), jnp.float32)  # every score ties
    for k, mask in zip((5, 6, 7, 8), topk_masks(scores, (5, 6, 7, 8)), strict=True):
        assert (np.asarray(mask).sum(-1) == k).all()


def test_attention_mixing_is_linear_in_the_four_maps():
    # Setting attn2..4 to zero must give exactly the top-c/2 attention of attn1.
    model = TopKSparseAttention(dim=8, num_heads=2)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 4, 4, 8)), jnp.float32)
    params = init_params_for(model, x)
    only1 = {**params, "attn2": jnp.zeros(1), "attn3": jnp.zeros(1), "attn4": jnp.zeros(1)}
    only1["attn1"] = jnp.ones(1)
    y1 = model.apply({"params": only1}, x)
    all4 = {**params, **{f"attn{i}": jnp.full((1,), 0.25) for i in range(1, 5)}}
    y4 = model.apply({"params": all4}, x)
    assert not np.allclose(y1, y4)  # the four sparsity levels really differ


def init_params_for(module, x):
    return jax.tree_util.tree_map(np.asarray, module.init(jax.random.PRNGKey(0), x)["params"])


@pytest.mark.parametrize("channels_first", [False, True])
def test_folded_expert_kernels_equal_the_unfolded_step(x64, channels_first):
    # fuse(concat_j w_j * (z_j K_j)) with K_j = None for the average pool: the release's
    # order of operations, against the one matmul with the folded per-image kernel.
    rng = np.random.default_rng(21)
    n, c, e, hw = 2, 4, 3, (5, 6)
    shape = (n, c) + hw if channels_first else (n,) + hw + (c,)
    # Both images see the same z_j: they differ only through their router weights.
    zs = [jnp.broadcast_to(jnp.asarray(rng.normal(size=(1,) + shape[1:])), shape)
          for _ in range(e)]
    ks = (jnp.asarray(rng.normal(size=(c, c))), None, jnp.asarray(rng.normal(size=(c, c))))
    fuse = jnp.asarray(rng.normal(size=(e * c, c)))
    w = jnp.asarray(rng.uniform(size=(n, e)))
    cax = 1 if channels_first else -1
    bshape = (n, 1, 1, 1)
    outs = [z if k is None else pointwise(z, k, channels_first)
            for z, k in zip(zs, ks, strict=True)]
    want = pointwise(jnp.concatenate([o * w[:, j].reshape(bshape) for j, o in enumerate(outs)],
                                     axis=cax), fuse, channels_first)
    got = pointwise(jnp.concatenate(zs, axis=cax),
                    fold_expert_kernels(fuse, ks, w, jnp.float64), channels_first)
    assert got.shape == want.shape and got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)
    assert not np.allclose(got[0], got[1])  # each image's own kernel


def test_avg_pool_expert_excludes_padding_at_borders():
    x = jnp.ones((1, 5, 6, 2), jnp.float32)
    y = np.asarray(avg_pool_3x3(x))
    np.testing.assert_allclose(y, 1.0, rtol=0, atol=1e-6)  # zero padding would pull borders down
    ramp = jnp.arange(30, dtype=jnp.float32).reshape(1, 5, 6, 1)
    y = np.asarray(avg_pool_3x3(ramp))[0, :, :, 0]
    r = np.asarray(ramp)[0, :, :, 0]
    assert y[0, 0] == pytest.approx(r[:2, :2].mean())  # corner: 4 values
    assert y[0, 3] == pytest.approx(r[:2, 2:5].mean())  # edge: 6 values
    assert y[2, 2] == pytest.approx(r[1:4, 1:4].mean())


def test_grouped_conv_reads_consecutive_channel_pairs():
    # Group g reads channels 2g and 2g+1: with h odd, group (h-1)/2 straddles a3/a5.
    rng = np.random.default_rng(4)
    h = 5
    x = rng.normal(size=(1, 6, 7, 2 * h)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 2, h)).astype(np.float32)
    for impl in ("xla", "shift"):
        y = np.asarray(grouped_conv(jnp.asarray(x), jnp.asarray(kernel), impl=impl))
        for g in range(h):
            pair = x[..., 2 * g: 2 * g + 2]
            ref = reference_conv(pair, kernel[:, :, :, g: g + 1])
            np.testing.assert_allclose(y[..., g], ref[..., 0], atol=1e-5)


def reference_conv(x, kernel, dilation=1):
    """Dense NHWC conv with 'same' zero padding, written out with loops."""
    kh, kw, cin, cout = kernel.shape
    ph, pw = dilation * (kh - 1) // 2, dilation * (kw - 1) // 2
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    out = np.zeros(x.shape[:3] + (cout,), np.float64)
    for i in range(kh):
        for j in range(kw):
            tap = xp[:, i * dilation: i * dilation + x.shape[1],
                     j * dilation: j * dilation + x.shape[2]]
            out += tap @ kernel[i, j]
    return out


@pytest.mark.parametrize("impl", ["xla", "shift"])
@pytest.mark.parametrize("k,dilation", [(1, 1), (3, 1), (5, 1), (7, 2)])
def test_depthwise_conv_formulations_agree_with_reference(impl, k, dilation):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(2, 9, 8, 4)).astype(np.float32)
    kernel = rng.normal(size=(k, k, 1, 4)).astype(np.float32)
    y = np.asarray(grouped_conv(jnp.asarray(x), jnp.asarray(kernel), dilation=dilation, impl=impl))
    for c in range(4):
        ref = reference_conv(x[..., c: c + 1], kernel[:, :, :, c: c + 1], dilation)
        np.testing.assert_allclose(y[..., c], ref[..., 0], atol=1e-4)


@pytest.mark.parametrize("k,dilation,members,height,width,padding,channels_first", [
    (3, 1, 1, 9, 11, None, True), (5, 1, 2, 6, 7, None, True), (7, 2, 1, 9, 8, None, True),
    (5, 1, 1, 3, 1, None, True), (7, 2, 2, 2, 4, None, True), (3, 1, 2, 6, 7, None, False),
    (5, 2, 1, 9, 8, None, False), (3, 1, 2, 7, 6, 0, True), (5, 1, 1, 7, 6, -1, False)])
def test_cpu_stencils_equal_lax_conv(k, dilation, members, height, width, padding,
                                     channels_first, x64):
    # The CPU stencil engine (model/cpu_stencils.py, conv_impl="shift") is performance
    # only: its values and its hand-written gradients equal the plain lax.conv
    # formulation (conv_impl="xla"), in both layouts. NCHW 'same' convolutions take the
    # flattened-plane form (taps as flat slices, wrapped columns masked), with its own
    # kernel-gradient taps; the fourth and fifth cases have the padding wider than the
    # image (extra padded rows); the last two are not 'same' (0 pads, -1 crops).
    rng = np.random.default_rng(k + members + width)
    shape = (2, 3 * members, height, width) if channels_first else (2, height, width,
                                                                    3 * members)
    x = jnp.asarray(rng.normal(size=shape))
    kernel = jnp.asarray(rng.normal(size=(k, k, members, 3)))

    def conv(impl):
        return lambda x, kern: grouped_conv(x, kern, dilation=dilation, impl=impl,
                                            channels_first=channels_first, padding=padding)

    def loss(impl):
        return lambda x, kern: jnp.sum(jnp.sin(conv(impl)(x, kern)))

    y = conv("shift")(x, kernel)
    np.testing.assert_allclose(y, conv("xla")(x, kernel), atol=1e-12)
    if padding is None:  # and against convolutions written out with loops
        nhwc = np.transpose(np.asarray(x), (0, 2, 3, 1)) if channels_first else np.asarray(x)
        for g in range(3):
            ref = reference_conv(nhwc[..., g * members: (g + 1) * members],
                                 np.asarray(kernel)[:, :, :, g: g + 1], dilation)
            got = np.asarray(y)[:, g] if channels_first else np.asarray(y)[..., g]
            np.testing.assert_allclose(got, ref[..., 0], atol=1e-12)
    got = jax.grad(loss("shift"), argnums=(0, 1))(x, kernel)
    want = jax.grad(loss("xla"), argnums=(0, 1))(x, kernel)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_channels_first_layernorm_matches_channels_last():
    rng = np.random.default_rng(8)
    x = rng.normal(3.0, 2.0, size=(2, 5, 6, 8)).astype(np.float32)
    params = {"params": {"scale": jnp.asarray(rng.normal(size=8), jnp.float32),
                         "bias": jnp.asarray(rng.normal(size=8), jnp.float32)}}
    last = LayerNorm("WithBias").apply(params, jnp.asarray(x))
    first = LayerNorm("WithBias", channels_first=True).apply(
        params, jnp.asarray(np.transpose(x, (0, 3, 1, 2))))
    np.testing.assert_allclose(np.transpose(np.asarray(first), (0, 2, 3, 1)), last, atol=2e-6)


def test_msfn_hidden_width_and_straddling_group():
    assert [hidden_features(c, 2.66) for c in (48, 96, 192, 384)] == [127, 255, 510, 1021]
    # The straddling group couples the 3x3 and 5x5 branches: perturbing the 5x5
    # branch's first channel changes x1's middle channel when h is odd.
    model = MixedScaleFeedForward(dim=4, ffn_expansion_factor=1.25)  # h = 5
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 4, 4, 4)), jnp.float32)
    params = init_params_for(model, x)
    k = np.asarray(params["dwconv3x3_1"]["kernel"]).copy()
    k[:, :, 1, 2] = 0.0  # group 2's second input is channel 5 = a5's first channel
    changed = {**params, "dwconv3x3_1": {"kernel": jnp.asarray(k)}}
    assert not np.allclose(model.apply({"params": params}, x), model.apply({"params": changed}, x))


def test_layernorm_variants():
    x = jnp.asarray(np.random.default_rng(6).normal(3.0, 2.0, size=(2, 3, 3, 8)), jnp.float32)
    with_bias = LayerNorm("WithBias").apply({"params": {"scale": jnp.ones(8),
                                                        "bias": jnp.zeros(8)}}, x)
    np.testing.assert_allclose(np.asarray(with_bias).mean(-1), 0.0, atol=1e-5)
    bias_free = np.asarray(LayerNorm("BiasFree").apply({"params": {"scale": jnp.ones(8)}}, x))
    xn = np.asarray(x)
    ref = xn / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)  # the mean is not subtracted
    np.testing.assert_allclose(bias_free, ref, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    model = DRSformer(**TINY)
    return model, {"params": init_params(model, 0)}


def test_global_residual(tiny):
    model, variables = tiny
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    params["output"]["kernel"] = np.zeros_like(params["output"]["kernel"])
    x = jnp.asarray(np.random.default_rng(7).uniform(size=(1, 16, 24, 3)), jnp.float32)
    np.testing.assert_array_equal(jax.jit(model.apply)({"params": params}, x), x)


@pytest.mark.parametrize("shape", [(1, 12, 16, 3), (1, 16, 20, 3)])
def test_sizes_not_multiple_of_8_are_rejected_with_the_shape(tiny, shape):
    model, variables = tiny
    with pytest.raises(ValueError, match=r"multiples of 8.*" + str(shape).replace("(", r"\(")
                       .replace(")", r"\)")):
        model.apply(variables, jnp.zeros(shape))


def test_default_parameter_counts():
    for use_mefc, expected in ((True, 33_655_424), (False, 32_610_304)):
        model = DRSformer(use_mefc=use_mefc)
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
        assert count_params(shapes["params"]) == expected


def test_host_init_follows_the_modules_initializers(tiny):
    # init_params samples on the host by rule; the modules declare the same rules.
    model, variables = tiny
    # Flax runs the forward pass op by op to create the parameters: XLA's convolutions
    # (the same parameters as the CPU formulation) are far fewer ops than its stencils.
    flax_init = model.clone(conv_impl="xla", layout="NHWC").init(
        jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)))["params"]
    host = jax.tree_util.tree_leaves_with_path(variables["params"])
    ref = dict(jax.tree_util.tree_leaves_with_path(flax_init))
    assert len(host) == len(ref)
    checked = 0
    for path, value in host:
        want = np.asarray(ref[path])
        value = np.asarray(value)
        assert value.shape == want.shape
        if np.all(want == want.flat[0]):  # constant initialisers must agree exactly
            np.testing.assert_array_equal(value, want)
        elif want.size >= 100:  # uniform: same bound (max of >= 100 draws is > 0.8 bound)
            checked += 1
            assert np.abs(value).max() <= np.abs(want).max() * 1.25
            assert np.abs(want).max() <= np.abs(value).max() * 1.25
    assert checked > 50


def test_initial_value_rejects_unknown_parameters():
    with pytest.raises(ValueError, match="no initialisation rule"):
        initial_value(("x", "mystery"), {("x", "mystery"): (3,)}, np.random.default_rng(0))


def test_computation_dtype_bfloat16_keeps_float32_params_and_output(tiny):
    model, variables = tiny
    model = model.clone(conv_impl="xla", layout="NHWC")  # compiles faster than the stencils
    x = jnp.asarray(np.random.default_rng(8).uniform(size=(1, 16, 16, 3)), jnp.float32)
    y32 = jax.jit(model.apply)(variables, x)
    y16 = jax.jit(model.clone(dtype=jnp.bfloat16).apply)(variables, x)
    assert y16.dtype == jnp.float32
    assert float(jnp.abs(y16 - y32).max()) < 0.1


def test_layouts_agree_and_keep_nhwc_interface(tiny):
    model, variables = tiny
    x = jnp.asarray(np.random.default_rng(9).uniform(size=(2, 16, 24, 3)), jnp.float32)
    nhwc = jax.jit(model.clone(layout="NHWC").apply)(variables, x)
    nchw = jax.jit(model.clone(layout="NCHW").apply)(variables, x)
    assert nhwc.shape == nchw.shape == x.shape
    np.testing.assert_allclose(nchw, nhwc, atol=1e-5)
    with pytest.raises(ValueError, match="layout"):
        model.clone(layout="NWHC").apply(variables, x)


@pytest.mark.parametrize(("layout", "mode"), [("NHWC", True), ("NCHW", "blocks")])
def test_remat_keeps_outputs_and_gradients(tiny, layout, mode):
    model, variables = tiny
    x = jnp.asarray(np.random.default_rng(10).uniform(size=(1, 16, 16, 3)), jnp.float32)

    def loss(params, m):
        return jnp.mean(jnp.abs(m.apply({"params": params}, x) - 0.5))

    # XLA's convolutions: remat does not depend on the formulation, and they compile faster.
    plain = model.clone(layout=layout, conv_impl="xla")
    remat = plain.clone(remat=mode)
    l0, g0 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(variables["params"], plain)
    l1, g1 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(variables["params"], remat)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    flat0 = jax.tree_util.tree_leaves_with_path(g0)
    flat1 = dict(jax.tree_util.tree_leaves_with_path(g1))
    assert len(flat0) == len(flat1) > 50
    for path, g in flat0:
        np.testing.assert_allclose(flat1[path], g, rtol=1e-4, atol=1e-6, err_msg=str(path))


@pytest.mark.parametrize("recompute", [True, False])
def test_recomputed_block_keeps_only_computation_dtype_activations(recompute):
    """What the backward pass of one block keeps (the leaves of `jax.vjp`'s pullback, what
    compile_report's residual programs return): with `recompute`, in bfloat16, the
    activations are the inputs of the LayerNorms and of their 1x1 products, qkv and q, k,
    v, TKSA's output and MSFN's [x1, x2]; no float32 copies."""

    c, side = 8, 16
    model = DRSformer(dim=c, dtype=jnp.bfloat16, recompute=recompute, conv_impl="shift",
                      layout="NHWC")
    block = model.block(c, 2)
    x = jax.ShapeDtypeStruct((1, side, side, c), jnp.bfloat16)
    params = jax.eval_shape(block.init, jax.random.PRNGKey(0), x)["params"]
    pixels = side * side
    kept = [r for r in jax.eval_shape(functools.partial(residual_leaves, block), params, x)
            if r.ndim >= 3 and r.shape[0] == 1 and pixels in (r.shape[1], r.shape[1] * r.shape[2])]
    channels = sum(r.size // pixels for r in kept)
    if recompute:
        assert {r.dtype for r in kept} == {jnp.dtype(jnp.bfloat16)}
        assert channels == 5 * c + 3 * c + 3 * c + 2 * hidden_features(c, 2.66)
    else:  # the check has teeth: without recompute, float32 statistics and more
        assert jnp.dtype(jnp.float32) in {r.dtype for r in kept}
        assert channels > 3 * (11 * c + 2 * hidden_features(c, 2.66))


def _jaxpr_dtypes(jaxpr) -> dict[str, set]:
    """Primitive name -> dtypes of its floating outputs, over a jaxpr and its sub-jaxprs."""
    found: dict[str, set] = {}

    def walk(j):
        for eqn in j.eqns:
            for v in eqn.outvars:
                dt = getattr(v.aval, "dtype", None)
                if dt is not None and jnp.issubdtype(dt, jnp.floating):
                    found.setdefault(eqn.primitive.name, set()).add(jnp.dtype(dt))
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else (p,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("use_mefc", [True, False])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_float64_computes_every_op_in_float64(tiny, x64, use_mefc, layout):
    model, variables = tiny  # float32 parameters: cast once, then float64 throughout
    model = model.clone(dtype=jnp.float64, use_mefc=use_mefc, layout=layout)
    if not use_mefc:
        variables = {"params": {k: v for k, v in variables["params"].items()
                                if k not in ("encoder_level0", "refinement")}}
    x = jnp.asarray(np.random.default_rng(11).uniform(size=(1, 16, 16, 3)), jnp.float64)
    dtypes = _jaxpr_dtypes(jax.make_jaxpr(model.apply)(variables, x))
    lower = {name: d for name, d in dtypes.items() if d - {jnp.dtype(jnp.float64)}}
    # Even the casts of the float32 parameters output float64: nothing runs below it.
    assert not lower
    for prim in ("exp", "rsqrt", "dot_general"):
        assert dtypes[prim] == {jnp.dtype(jnp.float64)}
    y = jax.jit(model.apply)(variables, x)
    assert y.dtype == jnp.float64
    y32 = jax.jit(model.clone(dtype=jnp.float32).apply)(variables, x.astype(jnp.float32))
    assert float(jnp.abs(y - y32).max()) < 1e-4


def test_float32_stays_float32_with_x64_on(tiny, x64):
    model, variables = tiny
    x = jnp.asarray(np.random.default_rng(12).uniform(size=(1, 16, 16, 3)), jnp.float32)
    dtypes = _jaxpr_dtypes(jax.make_jaxpr(model.apply)(variables, x))
    assert set().union(*dtypes.values()) == {jnp.dtype(jnp.float32)}


def test_bfloat16_keeps_norms_softmax_and_router_in_float32(tiny):
    model, variables = tiny
    x = jnp.asarray(np.random.default_rng(13).uniform(size=(1, 16, 16, 3)), jnp.float32)
    dtypes = _jaxpr_dtypes(jax.make_jaxpr(model.clone(dtype=jnp.bfloat16).apply)(variables, x))
    f32, bf16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
    assert dtypes["exp"] == {f32}  # softmax of attention and of the MEFC router
    assert dtypes["rsqrt"] == {f32}  # LayerNorm and q/k L2 normalisation
    assert bf16 in dtypes["conv_general_dilated"] | dtypes["dot_general"]


def test_l2_normalize_is_torch_normalize():
    from drsformer_jax.model.attention import l2_normalize

    x = np.random.default_rng(14).normal(size=(3, 5, 7))
    x[1] = 0.0  # a zero row stays zero (norm clamped to eps 1e-12, as F.normalize does)
    got = np.asarray(l2_normalize(jnp.asarray(x, jnp.float32), axis=-1))
    want = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.all(got[1] == 0)
