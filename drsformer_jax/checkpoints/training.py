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
from orbax.checkpoint import checkpoint_managers as cm

from drsformer_jax.checkpoints.export import CheckpointError
from drsformer_jax.model.drsformer import abstract_params, from_config

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


def _note_fallback(step_dir: Path, error: BaseException, next_dir: Path) -> None:
    print(f"note: {step_dir}: cannot restore ({_reason(error)}); it is left as it is, "
          f"using {next_dir} instead", file=sys.stderr)


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
            f"{path}: not a checkpoint (expected an export directory with config.json and "
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
    item = {"params": jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        abstract_params(from_config(config)))}
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            step_dir.absolute() / "state",
            args=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True))
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"{step_dir}: cannot restore the checkpoint ({_reason(e)})") from e
    return config, jax.tree_util.tree_map(jax.numpy.asarray, restored["params"])


def load_params(path: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    """(model config, params) from a training workdir or checkpoint step directory.

    A damaged step is skipped with a note for the next one (`candidate_step_dirs`).
    """
    candidates = candidate_step_dirs(Path(path))
    first_error = None
    for i, step_dir in enumerate(candidates):
        try:
            return _restore_params(step_dir)
        except CheckpointError as e:
            first_error = first_error or e
            if i + 1 < len(candidates):
                _note_fallback(step_dir, e, candidates[i + 1])
    raise first_error


def restore_latest_intact(manager: Any, abstract_state: Any,
                          ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, trainer JSON) of the newest checkpoint that restores; None if none.

    Damaged newer checkpoints are moved aside to WORKDIR/damaged_checkpoints/ (by
    process 0), never deleted, so that training can save those steps again.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    damaged = []
    for i, step in enumerate(steps):
        try:
            state, trainer = restore(manager, step, abstract_state)
        except Exception as e:  # orbax raises many types for a damaged directory
            damaged.append(step)
            step_dir = Path(manager.directory) / str(step)
            next_dir = (Path(manager.directory) / str(steps[i + 1]) if i + 1 < len(steps)
                        else Path("a fresh start"))
            _note_fallback(step_dir, e, next_dir)
            continue
        _quarantine(manager, damaged)
        return step, state, trainer
    _quarantine(manager, damaged)
    return None


def _quarantine(manager: Any, steps: list[int]) -> None:
    if not steps or jax.process_index() != 0:
        return
    root = Path(manager.directory)
    aside = root.parent / "damaged_checkpoints"
    aside.mkdir(exist_ok=True)
    for step in steps:
        target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(root / str(step), target)
        print(f"note: moved the damaged checkpoint {root / str(step)} to {target}",
              file=sys.stderr)
    manager.reload()
