"""Training DRSformer as the release does, on any number of devices and hosts.

Data parallel: one `jax.jit`-compiled train step over a `Mesh` of every device
of every host, the batch sharded along 'data', parameters and optimizer state
replicated. AdamW with the release's schedule (constant, then cosine) and
global-norm clipping. Resumes exactly: the state, the data position (the input
pipeline is a pure function of (seed, step)) and the open logging window are
all in the checkpoint.

This module does not import TensorFlow: `train_step`, `eval_step` and
`create_train_state` run where only JAX is installed; `train_and_evaluate`
imports the tf.data input pipeline when called.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from drsformer_jax import metrics as metrics_lib
from drsformer_jax.initializers import init_params
from drsformer_jax.models import ARCH_FIELDS, DRSformer, model_config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a bad configuration)."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


# --- model and optimizer ---------------------------------------------------------------

def create_model(config: Any, **overrides: Any) -> DRSformer:
    """The DRSformer the config describes (its model fields are top-level config fields)."""
    fields = {name: config[name] for name in ARCH_FIELDS if name in config}
    for key in ("num_blocks", "heads"):
        if key in fields:
            fields[key] = tuple(int(v) for v in fields[key])
    dtype = str(config.get("dtype", "float32"))
    if dtype not in DTYPES:
        raise TrainingError(f"config.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    kwargs = dict(fields, dtype=DTYPES[dtype], remat=bool(config.get("remat", False)),
                  conv_impl=str(config.get("conv_impl", "auto")),
                  layout=str(config.get("layout", "auto")))
    kwargs.update(overrides)
    return DRSformer(**kwargs)


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


def create_optimizer(config: Any) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on every parameter)."""
    return optax.chain(
        clip_grad_norm(float(config.grad_clip_norm)),
        optax.adamw(create_learning_rate_fn(config), b1=float(config.adam_b1),
                    b2=float(config.adam_b2), eps=float(config.adam_eps),
                    weight_decay=float(config.weight_decay)))


def create_train_state(config: Any, model: DRSformer,
                       tx: optax.GradientTransformation) -> TrainState:
    """Fresh parameters (PyTorch's default init, sampled on the host) and optimizer state."""
    params = init_params(model, int(config.seed))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


# --- steps ------------------------------------------------------------------------------

def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def leaf_size(config: Any, local_batch: int) -> int:
    """Examples per gradient leaf: `config.grad_leaf_size`, or the whole local batch if 0."""
    size = int(config.get("grad_leaf_size", 0)) or local_batch
    if local_batch % size:
        raise TrainingError(f"grad_leaf_size {size} must divide the per-device batch "
                            f"{local_batch}")
    return size


def pairwise_sum_over_leaves(value_fn: Callable[[Any], Any], leaves: Any) -> Any:
    """sum_i value_fn(leaves[i]), added in balanced-binary-tree order.

    The leaves are visited one at a time (a scan) and combined like a binary
    counter, so only log2(n) partial sums are alive. For a power-of-two count
    the association is ((l0 + l1) + (l2 + l3)) + ..., the same tree that
    `butterfly_sum` continues across devices.
    """
    n = jax.tree_util.tree_leaves(leaves)[0].shape[0]
    levels = max(n - 1, 0).bit_length()
    # Every leaf goes through the one scan body, so every leaf's value is computed
    # by the same compiled code whatever the number of leaves per device.
    zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(
        value_fn, jax.tree_util.tree_map(lambda x: x[0], leaves)))

    def add(a: Any, b: Any) -> Any:
        return jax.tree_util.tree_map(jnp.add, a, b)

    def select(pred: jax.Array, a: Any, b: Any) -> Any:
        return jax.tree_util.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)

    def body(carry: tuple[Any, Any], xs: tuple[jax.Array, Any]) -> tuple[tuple[Any, Any], None]:
        stack, _ = carry
        i, leaf = xs
        value, active, new_stack = value_fn(leaf), jnp.bool_(True), []
        for level in range(levels):
            bit = (i >> level) & 1
            # A right child merges with the left subtree waiting at this level;
            # a left child waits there (and stops the carry).
            merge = active & (bit == 1)
            new_stack.append(select(active & (bit == 0), value, stack[level]))
            value = select(merge, add(stack[level], value), value)
            active = merge
        return (tuple(new_stack), value), None

    (_, total), _ = jax.lax.scan(body, (tuple([zeros] * levels), zeros),
                                 (jnp.arange(n), leaves))
    return total


def butterfly_sum(x: Any, axis_name: str, axis_size: int) -> Any:
    """All-reduce sum over `axis_name` whose bits do not depend on the device count.

    Recursive doubling: at distance k each device adds its partner's (index XOR k)
    partial, so with a power-of-two number of devices the sum continues the
    balanced tree of `pairwise_sum_over_leaves` (IEEE addition is commutative,
    so both partners get the same bits). Other sizes fall back to psum.
    """
    if not _is_power_of_two(axis_size):
        return jax.lax.psum(x, axis_name)
    k = 1
    while k < axis_size:
        perm = [(i, i ^ k) for i in range(axis_size)]
        x = jax.tree_util.tree_map(lambda a, p=perm: a + jax.lax.ppermute(a, axis_name, p), x)
        k *= 2
    return x


def loss_and_grads(params: Any, batch: dict[str, jax.Array], *, model: DRSformer,
                   mesh: Mesh, leaf: int) -> tuple[jax.Array, Any]:
    """Mean L1 loss over the global batch and its gradient, reproducible across devices.

    Each device splits its rows into leaves of `leaf` examples, takes each
    leaf's loss sum and gradient, and adds them in a fixed tree order that
    `butterfly_sum` completes across devices. With power-of-two leaf and device
    counts, training is bitwise the same on 1 device or on 8: data parallelism
    changes only the speed. (Training is chaotic enough that the rounding of an
    ordinary all-reduce grows to 1e-3 relative differences within ten steps.)
    """
    n_dev = mesh.shape["data"]

    def leaf_loss(p: Any, examples: dict[str, jax.Array]) -> jax.Array:
        restored = model.apply({"params": p}, examples["input"])
        err = jnp.abs(restored - examples["target"].astype(jnp.float32))
        return jnp.sum(jnp.mean(err, axis=(1, 2, 3)))

    def per_device(p: Any, local: dict[str, jax.Array]) -> tuple[jax.Array, Any]:
        b = local["input"].shape[0]
        leaves = jax.tree_util.tree_map(lambda x: x.reshape(b // leaf, leaf, *x.shape[1:]),
                                        local)
        total = pairwise_sum_over_leaves(lambda ex: jax.value_and_grad(leaf_loss)(p, ex),
                                         leaves)
        return butterfly_sum(total, "data", n_dev)

    total_loss, total_grads = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P(), P()),
        check_vma=False)(params, batch)
    n = batch["input"].shape[0]
    return total_loss / n, jax.tree_util.tree_map(lambda g: g / n, total_grads)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: DRSformer,
               tx: optax.GradientTransformation,
               learning_rate_fn: Callable[[jax.Array], jax.Array], mesh: Mesh,
               leaf: int) -> tuple[TrainState, dict]:
    """One AdamW update on the L1 loss of model(rainy) against clean."""
    loss, grads = loss_and_grads(state.params, batch, model=model, mesh=mesh, leaf=leaf)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Whether the new parameters are finite: checked before they are checkpointed.
    finite = jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(params)])
    metrics = {"train_loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": learning_rate_fn(state.step), "params_finite": jnp.all(finite)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, images: jax.Array, *, model: DRSformer) -> jax.Array:
    """Restored images, clamped to [0, 1] (inputs padded to multiples of 8 already)."""
    return jnp.clip(model.apply({"params": params}, images), 0.0, 1.0)


# --- evaluation --------------------------------------------------------------------------

def evaluate(restore_fn: Callable[[jax.Array], jax.Array],
             eval_set: list[tuple[str, np.ndarray, np.ndarray]], protocol: str,
             process_index: int = 0, process_count: int = 1,
             on_image: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
             ) -> dict[str, float]:
    """PSNR / SSIM (Y channel, `protocol`) of the restored test images, and of the inputs.

    Whole images, reflect-padded to a multiple of 8 and cropped back, rounded to
    8 bits as saved results would be. Each process scores every
    `process_count`-th image; the sums are combined across processes.
    `on_image(index, rainy, restored, clean)` sees each image this process restores.
    """
    from drsformer_jax.images import from_float, to_float
    from drsformer_jax.inference import restore_image

    sums = np.zeros(5, np.float64)  # psnr, ssim, input psnr, input ssim, count
    for index in range(process_index, len(eval_set), process_count):
        _, rainy, clean = eval_set[index]
        restored = from_float(restore_image(restore_fn, to_float(rainy)))
        if on_image is not None:
            on_image(index, rainy, restored, clean)
        out = metrics_lib.evaluate(restored, clean, protocol)
        inp = metrics_lib.evaluate(rainy, clean, protocol)
        sums += [out["psnr"], out["ssim"], inp["psnr"], inp["ssim"], 1.0]
    if process_count > 1:
        from jax.experimental import multihost_utils

        # Sent as raw bits: JAX (without x64) would round float64 to float32.
        bits = multihost_utils.process_allgather(sums.view(np.uint32))
        sums = np.asarray(bits).view(np.float64).reshape(process_count, -1).sum(axis=0)
    n = max(float(sums[4]), 1.0)
    return {"psnr": float(sums[0]) / n, "ssim": float(sums[1]) / n,
            "input_psnr": float(sums[2]) / n, "input_ssim": float(sums[3]) / n}


def write_before_after(path: Path, rainy: np.ndarray, restored: np.ndarray,
                       clean: np.ndarray) -> None:
    """rainy | restored | clean, side by side, as one PNG."""
    from drsformer_jax.images import write_image

    gap = np.full((rainy.shape[0], 4, 3), 255, np.uint8)
    write_image(path, np.concatenate([rainy, gap, restored, gap, clean], axis=1))


# --- the training loop ---------------------------------------------------------------------

class _Window:
    """Running sums of the per-step scalars since the last log line (checkpointed)."""

    def __init__(self, state: dict[str, Any] | None = None):
        state = state or {}
        self.sums: dict[str, float] = dict(state.get("sums", {}))
        self.count = int(state.get("count", 0))

    def add(self, values: dict[str, np.ndarray]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def reset(self) -> None:
        self.sums, self.count = {}, 0

    def to_json(self) -> dict[str, Any]:
        return {"sums": self.sums, "count": self.count}


class _Preemption:
    """Turns SIGTERM into a request to save and stop at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _Preemption:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            # Hosts must agree on the step: the coordination service tells all of them.
            try:
                return self.requested or multihost_utils.reached_preemption_sync_point(step)
            except Exception:  # no preemption service (not started by jax.distributed)
                return self.requested
        return self.requested

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
    """Trains (or resumes) in `workdir`; returns the last evaluation's metrics."""
    from drsformer_jax import input_pipeline, train_checkpoints
    from drsformer_jax.metric_writers import MetricWriter

    workdir_path = Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    num_steps = int(config.num_train_steps)
    global_batch = int(config.global_batch_size)
    n_devices, n_procs = jax.device_count(), jax.process_count()
    if global_batch % n_devices:
        raise TrainingError(f"global_batch_size {global_batch} must be a multiple of the "
                            f"number of devices ({n_devices})")
    input_pipeline.check_dataset(config)

    model = create_model(config)
    arch = model_config(model)
    tx = create_optimizer(config)
    learning_rate_fn = create_learning_rate_fn(config)

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))

    manager = train_checkpoints.open_manager(workdir_path, keep=int(config.keep_checkpoints))
    abstract_state = jax.eval_shape(lambda: create_train_state(config, model, tx))
    abstract_state = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_state)
    writer = MetricWriter(workdir_path, enabled=jax.process_index() == 0)
    latest = manager.latest_step()
    if latest is not None:
        state, trainer = train_checkpoints.restore(manager, latest, abstract_state)
        window = _Window(trainer.get("window"))
        last_eval = trainer.get("last_eval") or {}
        writer.truncate_after(latest)
        _log(f"resumed from {workdir_path / train_checkpoints.CHECKPOINT_DIR / str(latest)}")
    else:
        state = jax.device_put(create_train_state(config, model, tx), replicated)
        window, last_eval = _Window(), {}
        if jax.process_index() == 0:
            (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=2))
    start_step = int(jax.device_get(state.step))
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(state.params))
    _log(f"DRSformer {arch}: {n_params:,} parameters; {n_devices} device(s) on {n_procs} "
         f"host(s); global batch {global_batch}, crops {config.crop_size}; "
         f"steps {start_step} -> {num_steps}")

    leaf = leaf_size(config, global_batch // n_devices)
    if not (_is_power_of_two(n_devices) and _is_power_of_two(global_batch // leaf)):
        _log(f"note: {n_devices} devices and {global_batch // leaf} gradient leaves are not "
             "both powers of two; results will differ slightly between device counts")
    step_fn = jax.jit(
        functools.partial(train_step, model=model, tx=tx, learning_rate_fn=learning_rate_fn,
                          mesh=mesh, leaf=leaf),
        in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated),
        donate_argnums=0)
    local_device = jax.local_devices()[0]
    eval_fn = jax.jit(functools.partial(eval_step, model=model))
    eval_set = input_pipeline.load_eval_set(config)

    def run_eval(step: int) -> dict[str, float]:
        params = jax.tree_util.tree_map(
            lambda x: jax.device_put(x.addressable_data(0), local_device), state.params)
        t0 = time.perf_counter()

        def before_after(index: int, rainy: np.ndarray, restored: np.ndarray,
                         clean: np.ndarray) -> None:
            if index == 0:  # the first test image, restored by process 0
                write_before_after(workdir_path / "before_after.png", rainy, restored, clean)

        result = evaluate(lambda x: eval_fn(params, x), eval_set, str(config.eval_protocol),
                          jax.process_index(), n_procs, on_image=before_after)
        _log(f"step {step}: eval PSNR {result['psnr']:.2f} dB (input {result['input_psnr']:.2f}"
             f" dB), SSIM {result['ssim']:.4f} (input {result['input_ssim']:.4f}) on "
             f"{len(eval_set)} images in {time.perf_counter() - t0:.1f}s")
        return result

    def save(step: int, eval_metrics: dict[str, float] | None) -> None:
        trainer = {"window": window.to_json(), "last_eval": last_eval}
        train_checkpoints.save(manager, step, state, trainer, arch,
                               {"psnr": eval_metrics["psnr"]} if eval_metrics else None)

    pending: list[tuple[int, dict[str, jax.Array]]] = []

    def drain(step: int) -> None:
        """Moves the per-step scalars to the host window; stops on a non-finite loss."""
        for s, values in jax.device_get(pending):
            params_finite = bool(values.pop("params_finite", True))
            if not (np.isfinite(values["train_loss"]) and params_finite):
                what = (f"train_loss became {values['train_loss']}"
                        if not np.isfinite(values["train_loss"])
                        else "the parameters became non-finite")
                manager.wait_until_finished()  # an async save may still be in flight
                kept = manager.latest_step()
                raise TrainingError(
                    f"{what} at step {s}; stopping. The last good checkpoint is step {kept} "
                    f"in {workdir_path / 'checkpoints'}" if kept is not None
                    else f"{what} at step {s}; stopping (no checkpoint saved yet)")
            window.add(values)
        pending.clear()
        del step

    if start_step >= num_steps:
        _log(f"nothing to do: the workdir is at step {start_step} >= num_train_steps")
        manager.close()
        return last_eval

    batches = input_pipeline.create_train_iterator(
        config, start_step=start_step, process_index=jax.process_index(),
        process_count=n_procs)
    log_every, eval_every = int(config.log_every_steps), int(config.eval_every_steps)
    ckpt_every = int(config.checkpoint_every_steps)
    t_window, steps_in_window = time.perf_counter(), 0
    step = start_step
    try:
        with _Preemption() as preemption:
            while step < num_steps:
                local = next(batches)
                batch = {k: jax.make_array_from_process_local_data(batch_sharding, v)
                         for k, v in local.items()}
                state, step_metrics = step_fn(state, batch)
                step += 1
                steps_in_window += 1
                pending.append((step, step_metrics))

                last = step == num_steps
                stop = preemption.should_stop(step)
                if step % log_every == 0 or last:
                    drain(step)
                    elapsed = time.perf_counter() - t_window
                    rate = steps_in_window / max(elapsed, 1e-9)
                    scalars = window.means()
                    scalars["learning_rate"] = float(learning_rate_fn(step - 1))
                    scalars.update(steps_per_sec=rate, images_per_sec=rate * global_batch)
                    writer.write(step, scalars)
                    _log(f"step {step}/{num_steps}: loss {scalars['train_loss']:.5f}, lr "
                         f"{scalars['learning_rate']:.3g}, grad norm {scalars['grad_norm']:.4f}, "
                         f"{rate:.2f} steps/s, {rate * global_batch:.1f} images/s, ETA "
                         f"{_format_eta((num_steps - step) / rate if rate > 0 else math.inf)}")
                    window.reset()
                    t_window, steps_in_window = time.perf_counter(), 0
                eval_metrics = None
                if step % eval_every == 0 or last:
                    drain(step)
                    eval_metrics = run_eval(step)
                    last_eval = dict(eval_metrics, step=step)
                    writer.write(step, eval_metrics)
                    t_window = time.perf_counter()  # keep evaluation out of steps/s
                if step % ckpt_every == 0 or eval_metrics is not None or last or stop:
                    drain(step)
                    save(step, eval_metrics)
                if stop and not last:
                    manager.wait_until_finished()
                    _log(f"SIGTERM: saved a checkpoint at step {step}; exiting. Run the same "
                         "command again to resume.")
                    sys.exit(143)
    finally:
        # On every way out (errors included) a pending async save completes and no
        # orbax thread outlives the interpreter.
        manager.wait_until_finished()
        manager.close()
        writer.close()
    if jax.process_index() == 0:
        (workdir_path / "last_eval.json").write_text(json.dumps(last_eval, indent=2) + "\n")
    return last_eval
