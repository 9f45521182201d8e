"""Training DRSformer as the release does, on any number of devices and hosts.

Data parallel: one `jax.jit`-compiled train step over a `Mesh` of every device
of every host, the batch sharded along 'data', parameters and optimizer state
replicated. AdamW with the release's schedule (constant, then cosine) and
global-norm clipping. Resumes exactly: the state, the data position (the input
pipeline is a pure function of (seed, step)) and the open logging window are
all in the checkpoint.

This module does not import TensorFlow: `create_train_state` and `train_step`
run where only JAX is installed. The loop is `train.loop.train_and_evaluate`.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from drsformer_jax.model.drsformer import (
    DRSformer,
    abstract_params,
    from_config,
    init_params,
)
from drsformer_jax.train.config_checks import TrainingError, check_batch_splits


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


# --- optimizer and state ---------------------------------------------------------------

def create_learning_rate_fn(config: Any) -> Callable[[jax.Array], jax.Array]:
    """The release's CosineAnnealingRestartCyclicLR, as a function of the update count.

    The release steps its scheduler before each update, so update n (0-based)
    uses last_epoch = n: lr = base while n <= constant_steps, then
    eta_min + (base - eta_min) / 2 * (1 + cos(pi * (n - constant) / cosine_steps)),
    and eta_min after the cosine ends. The schedule is fixed by these fields,
    not by num_train_steps, so a run extended later follows the same curve.
    """
    base, eta_min = float(config.learning_rate), float(config.min_learning_rate)
    constant, cosine = int(config.lr_constant_steps), int(config.lr_cosine_steps)

    def learning_rate(count: jax.Array) -> jax.Array:
        n = jnp.asarray(count, jnp.float32)
        t = jnp.clip((n - constant) / max(cosine, 1), 0.0, 1.0)
        annealed = eta_min + 0.5 * (base - eta_min) * (1.0 + jnp.cos(jnp.pi * t))
        return jnp.where(n <= constant, base, annealed)

    return learning_rate


def clip_grad_norm(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is < 1."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        coef = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree_util.tree_map(lambda g: g * coef.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def create_optimizer(config: Any, learning_rate_fn: Callable[[jax.Array], jax.Array] | None
                     = None) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on every parameter) with
    `learning_rate_fn` (default: `create_learning_rate_fn(config)`)."""
    schedule = learning_rate_fn or create_learning_rate_fn(config)
    return optax.chain(
        clip_grad_norm(float(config.grad_clip_norm)),
        optax.adamw(schedule, b1=float(config.adam_b1),
                    b2=float(config.adam_b2), eps=float(config.adam_eps),
                    weight_decay=float(config.weight_decay)))


def create_train_state(config: Any, model: DRSformer,
                       tx: optax.GradientTransformation) -> TrainState:
    """Fresh parameters (PyTorch's default init, sampled on the host) and optimizer state."""
    params = init_params(model, int(config.seed))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_train_state(model: DRSformer, tx: optax.GradientTransformation,
                         sharding: jax.sharding.Sharding | None = None) -> TrainState:
    """The train state's shapes and dtypes (with `sharding`), nothing sampled or allocated."""
    params = abstract_params(model)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                       opt_state=jax.eval_shape(tx.init, params))
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def place_replicated(tree: Any, sharding: NamedSharding) -> Any:
    """A pytree that every process holds identically, onto the replicated `sharding`.

    Each process copies its own host values to its local devices
    (`jax.make_array_from_process_local_data`). `jax.device_put` would instead
    all-gather every leaf to check that the processes agree (13 s for the full
    state on two CPU processes against 0.1 s for one); `check_same_on_every_process`
    checks one fingerprint instead.
    """
    host = jax.device_get(tree)
    check_same_on_every_process(host, "the starting state")
    return jax.make_array_from_process_local_data(sharding, host)


def check_same_on_every_process(host_tree: Any, what: str) -> None:
    """TrainingError unless every process holds the same values (one CRC32 each, gathered
    once), e.g. an init_from file that differs between hosts."""
    if jax.process_count() == 1:
        return
    crc = 0
    for leaf in jax.tree_util.tree_leaves(host_tree):
        crc = zlib.crc32(np.ascontiguousarray(leaf).reshape(-1).view(np.uint8), crc)
    # uint32: JAX without x64 would truncate an int64
    crcs = np.asarray(multihost_utils.process_allgather(np.asarray([crc], np.uint32)))
    differ = sorted({int(i) for i in np.flatnonzero(crcs.reshape(-1) != crc)})
    if differ:
        raise TrainingError(f"{what} differs between processes (process {jax.process_index()} "
                            f"vs {', '.join(map(str, differ))}): give every host the same "
                            "config, seed and init_from files")


# --- steps ------------------------------------------------------------------------------

def l1_loss(params: Any, batch: dict[str, jax.Array], model: DRSformer) -> jax.Array:
    """The release's loss: mean |model(rainy) - clean| over every value of the batch."""
    restored = model.apply({"params": params}, batch["input"])
    return jnp.mean(jnp.abs(restored - batch["target"].astype(jnp.float32)))


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: DRSformer,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """One AdamW update on the L1 loss of model(rainy) against clean.

    Jitted with the batch sharded over the devices (`make_train_step`), each
    device runs its shard in one forward / backward and XLA sums the gradients
    with one all-reduce.
    """
    loss, grads = jax.value_and_grad(l1_loss)(state.params, batch, model)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Whether the new parameters are finite: checked before they are checkpointed.
    finite = jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(params)])
    # The learning rate is the schedule's at the step: the loop computes it on the host.
    metrics = {"train_loss": loss, "grad_norm": optax.tree.norm(grads),
               "params_finite": jnp.all(finite)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def create_model(config: Any) -> DRSformer:
    """The DRSformer a training config describes (its model fields are top-level)."""
    try:
        return from_config(config, strict=False)
    except ValueError as e:
        raise TrainingError(f"config: {e}") from None


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """The jitted train step over a mesh, and the shardings its arguments must have."""

    fn: Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict]]
    state_sharding: NamedSharding
    batch_sharding: NamedSharding


def mesh_platform(mesh: Mesh | AbstractMesh) -> str:
    """The platform of a mesh's devices ("cpu", "cuda", "tpu"); an `AbstractMesh` (to
    lower for a platform this host does not have) says it with its abstract device."""
    if isinstance(mesh, AbstractMesh):
        if mesh.abstract_device is None:
            raise ValueError("an AbstractMesh needs an abstract_device naming its platform")
        return mesh.abstract_device.platform
    return mesh.devices.flat[0].platform


def make_train_step(config: Any, model: DRSformer, tx: optax.GradientTransformation,
                    mesh: Mesh | AbstractMesh) -> CompiledStep:
    """`train_step` jitted over `mesh` as training runs it (the benchmark and the
    deviceless compile report build it here too).

    The batch is sharded along 'data', the state replicated and donated. The model's
    "auto" formulation is the one of the mesh's platform.
    """
    check_batch_splits(config, mesh.shape["data"])
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    platform = mesh_platform(mesh)
    step = functools.partial(train_step, model=model.for_platform(platform), tx=tx)
    fn = jax.jit(step, in_shardings=(replicated, batch_sharding),
                 out_shardings=(replicated, replicated), donate_argnums=0,
                 compiler_options=train_compiler_options(platform))
    return CompiledStep(fn, replicated, batch_sharding)


def train_compiler_options(platform: str) -> dict[str, bool] | None:
    """XLA options of the train step: on CPU, float sums may be reassociated.

    The depthwise kernel gradients (one variadic reduce per convolution, a quarter of
    the CPU train step) run as scalar loops unless XLA:CPU may reorder their float
    additions; with fast math it vectorises them, and the whole step runs faster.
    Infinities and NaNs stay honoured (TKSA masks scores with -inf), so the results
    only change by rounding: float64 gradients of a small model agreed to 3e-14
    (tests/test_trainer.py holds them to 1e-9).
    Inference keeps the default (no gain measured on the forward pass).
    """
    if platform != "cpu":
        return None
    return {"xla_cpu_enable_fast_math": True, "xla_cpu_fast_math_honor_infs": True,
            "xla_cpu_fast_math_honor_nans": True}
