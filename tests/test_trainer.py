"""The trainer's parts, in process: the release's schedule, torch's gradient clipping, one
train step on a tiny model, and the CPU compiler options of the train step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from drsformer_jax.model.drsformer import init_params
from drsformer_jax.train import trainer as train


def release_lr(iteration: int) -> float:
    """The release's CosineAnnealingRestartCyclicLR (periods [92000, 208000], eta_mins
    [3e-4, 1e-6], restart weights 1) at 1-based training iteration `iteration`: its
    scheduler is stepped before every update except the first, so last_epoch = iteration - 1."""
    last_epoch = iteration - 1
    cumulative = [92000, 300000]
    idx = next(i for i, c in enumerate(cumulative) if last_epoch <= c)
    restart = 0 if idx == 0 else cumulative[idx - 1]
    period = [92000, 208000][idx]
    eta_min = [3e-4, 1e-6][idx]
    return eta_min + 0.5 * (3e-4 - eta_min) * (1 + math.cos(math.pi * (last_epoch - restart)
                                                             / period))


@pytest.mark.parametrize("iteration", [1, 2, 50_000, 92_000, 92_001, 92_002, 150_000,
                                       196_000, 299_999, 300_000])
def test_schedule_matches_the_release(iteration):
    lr_fn = train.create_learning_rate_fn(default.get_config())
    # Update number `iteration` is optax count iteration - 1.
    assert float(lr_fn(iteration - 1)) == pytest.approx(release_lr(iteration), rel=1e-5)


def test_schedule_does_not_depend_on_num_train_steps():
    a, b = default.get_config(), default.get_config()
    b.num_train_steps = 1000
    fa, fb = train.create_learning_rate_fn(a), train.create_learning_rate_fn(b)
    for n in (0, 500, 92_001, 200_000, 400_000):
        assert float(fa(n)) == float(fb(n))
    assert float(fa(400_000)) == pytest.approx(1e-6)


def test_clip_grad_norm_is_torchs():
    grads = {"a": jnp.full((10,), 0.3), "b": jnp.full((5, 2), -0.4)}
    norm = float(np.sqrt(10 * 0.09 + 10 * 0.16))
    clipped, _ = train.clip_grad_norm(0.01).update(grads, None)
    coef = 0.01 / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_
    np.testing.assert_allclose(clipped["a"], 0.3 * coef, rtol=1e-6)
    small, _ = train.clip_grad_norm(100.0).update(grads, None)
    np.testing.assert_array_equal(small["b"], grads["b"])  # below the limit: unchanged


def test_train_step_reduces_l1_loss():
    config = default.get_config("synthetic")
    config.dim, config.num_blocks, config.heads = 8, (1, 1, 1, 1), (1, 1, 1, 1)
    config.use_mefc, config.learning_rate, config.seed = False, 2e-3, 0
    model = train.create_model(config)
    tx = train.create_optimizer(config)
    state = train.create_train_state(config, model, tx)
    rng = np.random.default_rng(0)
    clean = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
    batch = {"input": jnp.asarray(np.clip(clean + 0.3, 0, 1)), "target": jnp.asarray(clean)}
    step = jax.jit(lambda s, b: train.train_step(s, b, model=model, tx=tx))
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["train_loss"]))
    assert int(state.step) == 8
    assert losses[-1] < 0.7 * losses[0], losses


def test_cpu_train_compiler_options_change_gradients_only_by_rounding(x64, users_cpu):
    """The train step's fast-math options on CPU: float64 gradients (TKSA's -inf masks,
    the depthwise kernel-gradient reduces) agree with the default compilation."""
    assert train.train_compiler_options("gpu") is None
    options = train.train_compiler_options("cpu")
    assert options["xla_cpu_enable_fast_math"] and options["xla_cpu_fast_math_honor_infs"]
    config = default.get_config("synthetic")
    config.dim, config.num_blocks, config.heads = 8, (1, 1, 1, 1), (1, 1, 2, 2)
    config.use_mefc, config.dtype = False, "float64"
    model = train.create_model(config)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), init_params(model, 0))
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 16, 16, 3)))
    grad = jax.value_and_grad(lambda p: jnp.mean(jnp.abs(model.apply({"params": p}, x) - x)))
    (loss, g), (loss_fast, g_fast) = jax.jit(grad, compiler_options=users_cpu)(params), jax.jit(
        grad, compiler_options=dict(options, **users_cpu))(params)
    assert loss.dtype == jnp.float64
    np.testing.assert_allclose(loss_fast, loss, rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_fast),
                    strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12 * float(jnp.max(jnp.abs(a))))
