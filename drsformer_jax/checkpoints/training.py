"""Training checkpoints: orbax CheckpointManager under `WORKDIR/checkpoints`.

Each step directory holds three items:
  state/         the train state pytree {step, params, opt_state}
  trainer/       JSON: host-side bookkeeping (the open logging window, last eval)
  model_config/  JSON: the model's architecture fields, so `drsformer_jax.load`
                 can rebuild the model from the checkpoint alone.
The latest `keep` checkpoints and the best by evaluation PSNR are kept. orbax
writes each step to a temporary directory and renames it when complete, so a
kill at any moment leaves the previous checkpoints loadable.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as cm

from drsformer_jax.checkpoints.weights_dir import CheckpointError
from drsformer_jax.utils.files import FolderInUseError, FolderLock

CHECKPOINT_DIR = "checkpoints"
ITEMS = ("state", "trainer", "model_config")


def _metric_psnr(metrics: Any) -> float:
    return float(metrics["psnr"])


def open_manager(workdir: str | os.PathLike, keep: int = 3, *, read_only: bool = False,
                 async_save: bool = True) -> Any:
    policy = cm.AnyPreservationPolicy([
        cm.LatestN(n=max(keep, 1)),
        cm.BestN(get_metric_fn=_metric_psnr, reverse=False, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINT_DIR, options=options,
                                 item_names=ITEMS)


def save(manager: Any, step: int, state: Any, trainer: dict[str, Any],
         model_config: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), trainer=ocp.args.JsonSave(trainer),
        model_config=ocp.args.JsonSave(model_config)), metrics=metrics, force=True)


def restore(manager: Any, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores the train state (to `abstract_state`'s shapes and shardings) and trainer JSON."""
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), trainer=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["trainer"] or {})


def best_step(manager: Any) -> int | None:
    """The kept step with the highest evaluation PSNR, or None if none has metrics."""
    scored = []
    for step in manager.all_steps():
        metrics = manager.metrics(step)
        if metrics and "psnr" in metrics:
            scored.append((float(metrics["psnr"]), step))
    return max(scored)[1] if scored else None


def read_model_config(step_dir: Path) -> dict[str, Any]:
    """The architecture fields recorded in a checkpoint step directory."""
    try:
        return dict(ocp.JsonCheckpointHandler().restore(step_dir.absolute() / "model_config"))
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"{step_dir}: cannot read the model config ({_reason(e)})") from e


def _reason(error: BaseException) -> str:
    """The first line of an orbax / tensorstore error, which can run to 100 lines."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else type(error).__name__
    return first if len(first) <= 200 else first[:197] + "..."


DAMAGED_DIR = "damaged_checkpoints"
_ABANDONED_READ = "Event loop is closed"
_quiet_hook_installed = False


def _silence_abandoned_reads() -> None:
    """Drops the 'RuntimeError: Event loop is closed' of reads a failed restore left behind.

    When one array of a checkpoint cannot be read, orbax's restore raises at once and
    closes its event loop while TensorStore still reads the other arrays; each of those
    reads then reports to the closed loop through `sys.unraisablehook`, a traceback
    apiece. Only that error is dropped; everything else goes to the previous hook.
    """
    global _quiet_hook_installed
    if _quiet_hook_installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == _ABANDONED_READ:
            return
        previous(unraisable)

    sys.unraisablehook = hook
    _quiet_hook_installed = True


def _note_damaged(step_dir: Path, error: BaseException, fate: str, then: str) -> None:
    """The one note about a damaged checkpoint: why, where it went, what is used instead."""
    print(f"note: {step_dir}: cannot restore ({_reason(error)}); {fate}; {then}",
          file=sys.stderr)


def _set_aside(step_dir: Path) -> Path:
    """Moves a damaged step directory to WORKDIR/damaged_checkpoints/ (never deletes it)."""
    aside = step_dir.parent.parent / DAMAGED_DIR
    aside.mkdir(exist_ok=True)
    target = aside / f"{step_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(step_dir, target)
    return target


def _set_aside_and_say(step_dir: Path) -> str:
    """`_set_aside`, as the note's words: where it went, or why it stayed."""
    try:
        return f"moved it to {_set_aside(step_dir)}"
    except OSError as e:
        return f"left it in place (cannot move it: {e.strerror or e})"


def _set_aside_unless_in_use(step_dir: Path) -> str:
    """Moves a damaged step of a training workdir aside unless a training holds the workdir
    (its checkpoint manager owns the steps); says what happened."""
    workdir = step_dir.parent.parent
    if step_dir.parent.name != CHECKPOINT_DIR:
        return "left it in place (not in a training workdir)"
    try:
        lock = FolderLock(workdir).acquire()
    except FolderInUseError as e:
        return f"left it in place ({e})"
    except OSError as e:
        return f"left it in place (cannot write to {workdir}: {e.strerror or e})"
    try:
        return _set_aside_and_say(step_dir)
    finally:
        lock.release()


def candidate_step_dirs(path: Path) -> list[Path]:
    """The step directories a path stands for, in the order to try them.

    A step directory: itself. A training workdir (or its checkpoints/ folder):
    its best step by PSNR, then the others from the newest, so that a damaged
    checkpoint falls back to the next intact one.
    """
    if all((path / item).is_dir() for item in ("state", "model_config")):
        return [path]
    root = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
    steps = sorted((int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()
                    and (p / "state").is_dir()), reverse=True) if root.is_dir() else []
    if not steps:
        raise CheckpointError(
            f"{path}: not a checkpoint (expected a weights directory with config.json and "
            f"params/, a training workdir with {CHECKPOINT_DIR}/, or a checkpoint step "
            "directory)")
    best = None
    if root.name == CHECKPOINT_DIR:
        with contextlib.suppress(Exception):  # unreadable metrics: newest first
            best = best_step(open_manager(root.parent, read_only=True))
    order = ([best] if best is not None else []) + [s for s in steps if s != best]
    return [root / str(s) for s in order]


def find_step_dir(path: Path) -> Path:
    """A training workdir -> its best (else latest) step directory; a step dir -> itself."""
    return candidate_step_dirs(path)[0]


def _restore_params(step_dir: Path) -> tuple[dict[str, Any], Any]:
    config = read_model_config(step_dir)
    # Onto one device: with the sharding given, orbax neither guesses it from the
    # checkpoint (a warning) nor needs the training mesh.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    state_dir = step_dir.absolute() / "state"
    try:
        # Shapes from the checkpoint's own metadata: tracing the model for them takes
        # seconds for the full model (the caller checks them against its model).
        handler = ocp.PyTreeCheckpointHandler()
        try:
            saved = handler.metadata(state_dir).tree["params"]
        finally:
            handler.close()
        item = {"params": jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), saved)}
        restored = ocp.PyTreeCheckpointer().restore(
            state_dir, args=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True))
    except Exception as e:  # orbax raises many types for a damaged directory
        _silence_abandoned_reads()
        raise CheckpointError(f"{step_dir}: cannot restore the checkpoint ({_reason(e)})") from e
    return config, jax.tree_util.tree_map(jax.numpy.asarray, restored["params"])


def load_params(path: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    """(model config, params) from a training workdir or checkpoint step directory.

    A damaged step of a workdir is skipped for the next one (`candidate_step_dirs`),
    with one note, and moved to WORKDIR/damaged_checkpoints/ (by process 0, unless a
    training holds the workdir).
    """
    candidates = candidate_step_dirs(Path(path))
    damaged: list[tuple[Path, CheckpointError]] = []
    for step_dir in candidates:
        try:
            result = _restore_params(step_dir)
        except CheckpointError as e:
            damaged.append((step_dir, e))
            continue
        _report_damaged(damaged, f"using {step_dir} instead")
        return result
    raise damaged[0][1]  # none restores: more likely this environment than damage; none moved


def _report_damaged(damaged: list[tuple[Path, CheckpointError]], then: str) -> None:
    if jax.process_index() != 0:  # process 0 moves them and speaks for every process
        return
    for step_dir, error in damaged:
        _note_damaged(step_dir, error.__cause__ or error, _set_aside_unless_in_use(step_dir),
                      then)


def restore_latest_intact(manager: Any, abstract_state: Any,
                          ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, trainer JSON) of the newest checkpoint that restores; None if none.

    Damaged newer checkpoints are moved aside to WORKDIR/damaged_checkpoints/ (by
    process 0, with one note each), never deleted, so that training can save those
    steps again.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    damaged: list[tuple[int, BaseException]] = []
    for step in steps:
        try:
            state, trainer = restore(manager, step, abstract_state)
        except Exception as e:  # orbax raises many types for a damaged directory
            _silence_abandoned_reads()
            damaged.append((step, e))
            continue
        _quarantine(manager, damaged, f"resuming from {Path(manager.directory) / str(step)}")
        return step, state, trainer
    _quarantine(manager, damaged, "starting afresh")
    return None


def _quarantine(manager: Any, damaged: list[tuple[int, BaseException]], then: str) -> None:
    if not damaged:
        return
    root = Path(manager.directory)
    if jax.process_index() == 0:
        for step, error in damaged:
            _note_damaged(root / str(step), error, _set_aside_and_say(root / str(step)), then)
    if jax.process_count() > 1:  # every process's manager sees the move
        multihost_utils.sync_global_devices("drsformer_jax: damaged checkpoints set aside")
    manager.reload()
