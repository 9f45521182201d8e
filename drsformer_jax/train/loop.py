"""The training loop: `train_and_evaluate(config, workdir)`.

`train_and_evaluate` reads top to bottom: `TrainingRun.setup` (model, schedule,
optimizer, mesh, compiled step, checkpoint manager, metric writer),
`restore_or_init` (resume from the latest checkpoint, else a fresh state), `run`
(the step loop; after each update `_step_boundary` logs, evaluates and saves as
the config asks), `shutdown`. SIGTERM asks for a checkpoint at the next step
boundary and an exit with status 143; on several hosts they agree on the step
through orbax's preemption sync point.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from drsformer_jax.checkpoints import training as checkpoints
from drsformer_jax.checkpoints.loading import load_params
from drsformer_jax.data import pipeline
from drsformer_jax.evaluation.evaluator import evaluate_during_training
from drsformer_jax.inference import Restorer
from drsformer_jax.inference.cache import default_cache_dir, using_compilation_cache
from drsformer_jax.model.drsformer import count_params, model_config
from drsformer_jax.train.config_checks import (
    TrainingError,
    architecture_mismatch,
    validate_config,
)
from drsformer_jax.train.metric_writer import MetricWriter
from drsformer_jax.train.trainer import (
    TrainState,
    abstract_train_state,
    create_learning_rate_fn,
    create_model,
    create_optimizer,
    create_train_state,
    make_train_step,
    place_replicated,
)
from drsformer_jax.utils.files import FolderInUseError, FolderLock, ensure_writable_dir
from drsformer_jax.utils.images import write_image

PREEMPTED_EXIT = 143  # 128 + SIGTERM


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

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.requested = False
        self._previous: Any = None

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
        # Hosts must agree on the step: orbax asks JAX's coordination service.
        return self.requested or (jax.process_count() > 1
                                  and self.manager.reached_preemption(step))

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _Throughput:
    """Steps and seconds since the last log line; evaluation time is left out."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def add_step(self) -> None:
        self.steps += 1

    def exclude_since(self, moment: float) -> None:
        """The time from `moment` to now (an evaluation) does not count."""
        self.start += time.perf_counter() - moment

    def steps_per_second(self) -> float:
        return self.steps / max(time.perf_counter() - self.start, 1e-9)


def _print(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def write_before_after(path: Path, rainy: np.ndarray, restored: np.ndarray,
                       clean: np.ndarray) -> None:
    """rainy | restored | clean, side by side, as one PNG."""
    gap = np.full((rainy.shape[0], 4, 3), 255, np.uint8)
    write_image(path, np.concatenate([rainy, gap, restored, gap, clean], axis=1))


class TrainingRun:
    """One training run in a workdir; `train_and_evaluate` calls its steps in order."""

    def __init__(self, config: Any, workdir: str) -> None:
        self.config, self.workdir = config, Path(workdir)
        self.num_steps = int(config.num_train_steps)
        self.global_batch = int(config.global_batch_size)
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.window, self.last_eval = _Window(), {}
        self.throughput = _Throughput()
        self.lock: FolderLock | None = None
        self.started_from = ""

    def setup(self) -> None:
        """Checks the config and the workdir, then builds everything the loop uses."""
        config = self.config
        validate_config(config)
        self.model = create_model(config)
        self.arch = model_config(self.model)
        try:
            ensure_writable_dir(self.workdir)
        except OSError as e:
            raise TrainingError(f"--workdir {self.workdir}: cannot write there "
                                f"({e.strerror or e})") from None
        if jax.process_index() == 0 and "://" not in str(self.workdir):
            try:  # one training per workdir (a crashed one releases it)
                self.lock = FolderLock(self.workdir).acquire()
            except FolderInUseError as e:
                raise TrainingError(f"{e}; wait for it to finish or choose another "
                                    "--workdir") from None
        pipeline.check_dataset(config)
        self.learning_rate_fn = create_learning_rate_fn(config)
        self.tx = create_optimizer(config, self.learning_rate_fn)
        mesh = Mesh(np.asarray(jax.devices()), ("data",))
        self.step_fn = make_train_step(config, self.model, self.tx, mesh)
        self.manager = checkpoints.open_manager(self.workdir, keep=int(config.keep_checkpoints))
        self.writer = MetricWriter(self.workdir, enabled=jax.process_index() == 0)
        self.eval_set = pipeline.load_eval_set(config)
        self.restorer: Restorer | None = None  # built at the first evaluation

    def restore_or_init(self) -> TrainState:
        """The latest intact checkpoint of the workdir, else a fresh (or init_from) state."""
        sharding = self.step_fn.state_sharding
        self._check_architecture()
        restored = None
        if self.manager.all_steps():  # tracing the model for the abstract state takes seconds
            restored = checkpoints.restore_latest_intact(
                self.manager, abstract_train_state(self.model, self.tx, sharding))
        if restored is None:
            # From each host's own copy: no per-leaf cross-host comparison (device_put's).
            state = place_replicated(self._initial_state(), sharding)
            self.writer.truncate_after(0)  # lines of an earlier run that saved nothing
            if jax.process_index() == 0:
                info = json.loads(self.config.to_json_best_effort())
                info["started_from"] = self.started_from
                (self.workdir / "config.json").write_text(json.dumps(info, indent=2) + "\n")
            return state
        if self.config.get("init_from"):
            _print(f"note: {self.workdir} has checkpoints: resuming from them; "
                   f"init_from={self.config.init_from} was not used")
        latest, state, trainer = restored
        self.window = _Window(trainer.get("window"))
        self.last_eval = trainer.get("last_eval") or {}
        self.writer.truncate_after(latest)
        _print(f"resumed from {self.workdir / checkpoints.CHECKPOINT_DIR / str(latest)}")
        return state

    def _check_architecture(self) -> None:
        """A workdir's checkpoints must be of this config's model (before orbax tries)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:  # the newest readable record; a damaged one is left to the restore
                recorded = checkpoints.read_model_config(Path(self.manager.directory) / str(step))
                break
            except ValueError:
                continue
        else:
            return
        mismatch = architecture_mismatch(recorded, self.model)
        if mismatch:
            raise TrainingError(f"{self.workdir} was trained with {mismatch}, or use another "
                                "--workdir")

    def _initial_state(self) -> TrainState:
        """Fresh parameters, or those of `config.init_from` (fine-tuning), at step 0."""
        source = str(self.config.get("init_from", "") or "")
        if not source:
            self.started_from = f"random initialisation (seed {int(self.config.seed)})"
            return create_train_state(self.config, self.model, self.tx)
        try:
            recorded, params = load_params(source)
        except ValueError as e:  # CheckpointError, ConversionError
            raise TrainingError(f"init_from: {e}") from None
        mismatch = architecture_mismatch(recorded, self.model)
        if mismatch:
            raise TrainingError(f"init_from={source} has {mismatch}")
        self.started_from = str(Path(source).absolute())
        _print(f"starting from the parameters of {source}")
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(params))

    def _drain(self) -> None:
        """Moves the per-step scalars to the host window; stops on a non-finite loss."""
        for s, values in jax.device_get(self.pending):
            params_finite = bool(values.pop("params_finite", True))
            if not (np.isfinite(values["train_loss"]) and params_finite):
                what = (f"train_loss became {values['train_loss']}"
                        if not np.isfinite(values["train_loss"])
                        else "the parameters became non-finite")
                self.manager.wait_until_finished()  # an async save may still be in flight
                kept = self.manager.latest_step()
                raise TrainingError(
                    f"{what} at step {s}; stopping. The last good checkpoint is step {kept} "
                    f"in {self.workdir / checkpoints.CHECKPOINT_DIR}" if kept is not None
                    else f"{what} at step {s}; stopping (no checkpoint saved yet)")
            self.window.add(values)
        self.pending.clear()

    def _log(self, step: int) -> None:
        rate = self.throughput.steps_per_second()
        scalars = self.window.means()
        scalars["learning_rate"] = float(self.learning_rate_fn(step - 1))
        scalars.update(steps_per_sec=rate, images_per_sec=rate * self.global_batch)
        self.writer.write(step, scalars)
        eta = _format_eta((self.num_steps - step) / rate if rate > 0 else math.inf)
        _print(f"step {step}/{self.num_steps}: loss {scalars['train_loss']:.5f}, lr "
               f"{scalars['learning_rate']:.3g}, grad norm {scalars['grad_norm']:.4f}, "
               f"{rate:.2f} steps/s, {rate * self.global_batch:.1f} images/s, ETA {eta}")
        self.window.reset()
        self.throughput.restart()

    def _evaluate(self, step: int, state: TrainState) -> dict[str, float]:
        # This process's copy of the replicated parameters, on one local device.
        params = jax.tree_util.tree_map(lambda x: x.addressable_data(0), state.params)
        if self.restorer is None:
            self.restorer = Restorer(self.model, {"params": params})
        else:
            self.restorer.set_variables({"params": params})
        start = time.perf_counter()

        def before_after(index: int, rainy: np.ndarray, restored: np.ndarray,
                         clean: np.ndarray) -> None:
            if index == 0:  # the first test image, restored by process 0
                write_before_after(self.workdir / "before_after.png", rainy, restored, clean)

        # The forward programs go to the persistent cache, as derain's do: a resumed or
        # second run evaluates without compiling them again.
        with using_compilation_cache(jax.config.jax_compilation_cache_dir or default_cache_dir()):
            result = evaluate_during_training(self.restorer, self.eval_set,
                                              str(self.config.eval_protocol), before_after)
        _print(f"step {step}: eval PSNR {result['psnr']:.2f} dB (input {result['input_psnr']:.2f}"
               f" dB), SSIM {result['ssim']:.4f} (input {result['input_ssim']:.4f}) on "
               f"{len(self.eval_set)} images in {time.perf_counter() - start:.1f}s")
        self.last_eval = dict(result, step=step)
        self.writer.write(step, result)
        return result

    def _save(self, step: int, state: TrainState, eval_metrics: dict[str, float] | None) -> None:
        trainer = {"window": self.window.to_json(), "last_eval": self.last_eval}
        checkpoints.save(self.manager, step, state, trainer, self.arch,
                         {"psnr": eval_metrics["psnr"]} if eval_metrics else None)

    def _step_boundary(self, step: int, state: TrainState, stop: bool) -> None:
        """What happens after update `step`: logging, evaluation, checkpointing."""
        config, last = self.config, step == self.num_steps
        log = step % int(config.log_every_steps) == 0 or last
        evaluate = step % int(config.eval_every_steps) == 0 or last
        save = step % int(config.checkpoint_every_steps) == 0 or evaluate or last or stop
        if not (log or evaluate or save):
            return
        self._drain()  # the steps' scalars, checked finite before anything is saved
        if log:
            self._log(step)
        eval_metrics = None
        if evaluate:
            started = time.perf_counter()
            eval_metrics = self._evaluate(step, state)
            self.throughput.exclude_since(started)
        if save:
            self._save(step, state, eval_metrics)

    def run(self, state: TrainState) -> dict[str, float]:
        """Updates `state` up to num_train_steps; returns the last evaluation's metrics."""
        step = int(jax.device_get(state.step))
        _print(f"DRSformer {self.arch}: {count_params(state.params):,} parameters; "
               f"{jax.device_count()} device(s) on {jax.process_count()} host(s); global batch "
               f"{self.global_batch}, crops {self.config.crop_size}; steps {step} -> "
               f"{self.num_steps}")
        if step >= self.num_steps:
            _print(f"nothing to do: the workdir is at step {step} >= num_train_steps")
            return self.last_eval
        if step == 0 and self.config.get("init_from"):
            self._evaluate(0, state)  # the starting point: the source model's own score
        batches = pipeline.create_train_iterator(
            self.config, start_step=step, process_index=jax.process_index(),
            process_count=jax.process_count())
        sharding = self.step_fn.batch_sharding
        self.throughput.restart()
        with _Preemption(self.manager) as preemption:
            while step < self.num_steps:
                batch = {k: jax.make_array_from_process_local_data(sharding, v)
                         for k, v in next(batches).items()}
                state, step_metrics = self.step_fn.fn(state, batch)
                step += 1
                self.throughput.add_step()
                self.pending.append((step, step_metrics))
                stop = preemption.should_stop(step)
                self._step_boundary(step, state, stop)
                if stop and step < self.num_steps:
                    self.manager.wait_until_finished()
                    _print(f"SIGTERM: saved a checkpoint at step {step}; exiting. Run the "
                           "same command again to resume.")
                    sys.exit(PREEMPTED_EXIT)
        if jax.process_index() == 0:
            (self.workdir / "last_eval.json").write_text(
                json.dumps(self.last_eval, indent=2) + "\n")
        return self.last_eval

    def shutdown(self) -> None:
        """Waits for a pending save, closes the manager and writer, frees the workdir."""
        # On every way out (errors included) a pending async save completes and no
        # orbax thread outlives the interpreter.
        if hasattr(self, "manager"):
            self.manager.wait_until_finished()
            self.manager.close()
            self.writer.close()
        if self.lock is not None:
            self.lock.release()


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
    """Trains (or resumes) in `workdir`; returns the last evaluation's metrics."""
    training = TrainingRun(config, workdir)
    try:
        training.setup()
        state = training.restore_or_init()
        return training.run(state)
    finally:
        training.shutdown()
