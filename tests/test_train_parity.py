"""Training follows the release's math (tests/fixtures/train_parity.npz,
tools/make_train_fixture.py): the first L1 gradient and the losses of three
updates of clip_grad_norm_(0.01) + AdamW, against the release's autograd and
torch.optim.AdamW, in float32 and in float64 (JAX's x64 mode on in that test only).

The fixture keeps each tensor's gradient norm and 64 of its entries at fixed
positions (all entries of smaller tensors), in the release's order.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from drsformer_jax.checkpoints import conversion
from drsformer_jax.model.drsformer import from_config
from drsformer_jax.testing import odd_images, random_state_dict
from drsformer_jax.train import trainer

# What tools/make_train_fixture.py ran.
BATCH_SHAPE = (2, 32, 32)
BATCH_SEEDS = ((11, 12), (13, 14))
UPDATES = 3
GRAD_TOLERANCE = {"float32": 1e-5, "float64": 1e-10}
LOSS_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    with np.load(fixtures_dir / "train_parity.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """The computation dtype; float64 turns JAX's x64 mode on for the test, then back."""
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", request.param == "float64")
    yield request.param
    jax.config.update("jax_enable_x64", previous)


def batches(fixture, dtype):
    out = []
    for rainy_seed, clean_seed in BATCH_SEEDS:
        rainy = odd_images(*BATCH_SHAPE, seed=rainy_seed)
        clean = (np.float32(0.5) * (rainy + odd_images(*BATCH_SHAPE, seed=clean_seed)))
        out.append({"input": jnp.asarray(rainy, dtype), "target": jnp.asarray(clean, dtype)})
    sums = [[float(np.asarray(b[k], np.float64).sum()) for k in ("input", "target")]
            for b in out]
    np.testing.assert_array_equal(sums, fixture["batch_sums"])  # the release's batches
    return out


def setup(fixture, dtype, platform=None):
    names = [str(n) for n in fixture["names"]]
    shapes = [tuple(int(d) for d in s.split("x")) if s else () for s in fixture["shapes"]]
    sd = random_state_dict(zip(names, shapes, strict=True), int(fixture["seed"]))
    config, params = conversion.state_dict_to_flax(sd)
    assert config["use_mefc"] and config["dim"] == 8
    model = from_config(config, dtype=jnp.dtype(dtype), matmul_precision="highest")
    if platform is not None:
        model = model.for_platform(platform)
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype), params)
    return names, model, params


def relative_l2(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_first_gradient_matches_release_autograd(fixture, dtype):
    assert_first_gradient_matches(fixture, dtype)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_first_gradient_of_accelerator_formulations(fixture, platform, x64):
    """The formulation each accelerator compiles (`FORMULATIONS`), run here on CPU."""
    assert_first_gradient_matches(fixture, "float64", platform)


def assert_first_gradient_matches(fixture, dtype, platform=None):
    names, model, params = setup(fixture, dtype, platform)
    batch = batches(fixture, dtype)[0]
    loss, grads = jax.jit(jax.value_and_grad(trainer.l1_loss), static_argnums=2)(
        params, batch, model)
    assert loss.dtype == jnp.dtype(dtype)
    assert abs(float(loss) / fixture[f"{dtype}/losses"][0] - 1) <= LOSS_TOLERANCE
    sd = conversion.flax_to_state_dict(grads)
    assert list(sd) == names
    flat = [np.asarray(sd[n], np.float64).reshape(-1) for n in names]
    ends = np.cumsum(fixture["counts"])
    positions = np.split(fixture["positions"], ends[:-1])
    samples = np.concatenate([g[p] for g, p in zip(flat, positions, strict=True)])
    norms = np.array([np.linalg.norm(g) for g in flat])
    tol = GRAD_TOLERANCE[dtype]
    assert relative_l2(samples, fixture[f"{dtype}/grad_samples"].astype(np.float64)) <= tol
    assert relative_l2(norms, fixture[f"{dtype}/grad_tensor_norms"]) <= tol


def train_config():
    return ml_collections.ConfigDict(dict(
        grad_clip_norm=0.01, learning_rate=3e-4, min_learning_rate=1e-6,
        lr_constant_steps=92_000, lr_cosine_steps=208_000, adam_b1=0.9, adam_b2=0.999,
        adam_eps=1e-8, weight_decay=1e-4))


def test_three_updates_follow_release_adamw(fixture, dtype):
    _, model, params = setup(fixture, dtype)
    data = batches(fixture, dtype)
    config = train_config()
    tx = trainer.create_optimizer(config)
    lr_fn = trainer.create_learning_rate_fn(config)
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params))
    step = jax.jit(functools.partial(trainer.train_step, model=model, tx=tx))
    losses, norms = [], []
    for i in range(UPDATES):
        state, metrics = step(state, data[i % 2])
        losses.append(float(metrics["train_loss"]))
        norms.append(float(metrics["grad_norm"]))
        assert float(lr_fn(i)) == pytest.approx(3e-4, rel=1e-7)  # the release's constant phase
    # The loss after the last update: a step reports the loss before its own update.
    losses.append(float(step(state, data[1])[1]["train_loss"]))  # as the fixture tool
    want = fixture[f"{dtype}/losses"]
    np.testing.assert_allclose(losses, want, rtol=LOSS_TOLERANCE, atol=0)
    # Pre-clipping gradient norms (what clip_grad_norm_ returns); the last ones already
    # carry Adam's amplification of rounding (sign flips of near-zero gradients).
    np.testing.assert_allclose(norms, fixture[f"{dtype}/grad_norms"], rtol=1e-4, atol=0)
    # The updates did move the model, so the loss comparison has teeth.
    assert want[-1] < want[0] - 0.03
