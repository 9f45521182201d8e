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

import os
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


def find_step_dir(path: Path) -> Path:
    """A training workdir -> its best (else latest) step directory; a step dir -> itself."""
    if all((path / item).is_dir() for item in ("state", "model_config")):
        return path
    root = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
    steps = sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()
                   and (p / "state").is_dir()) if root.is_dir() else []
    if not steps:
        raise CheckpointError(
            f"{path}: not a checkpoint (expected an export directory with config.json and "
            f"params/, a training workdir with {CHECKPOINT_DIR}/, or a checkpoint step "
            "directory)")
    manager = open_manager(root.parent, read_only=True) if root.name == CHECKPOINT_DIR else None
    step = (best_step(manager) if manager else None) or steps[-1]
    return root / str(step)


def load_params(path: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    """(model config, params) from a training workdir or checkpoint step directory."""
    step_dir = find_step_dir(Path(path))
    try:
        config = ocp.JsonCheckpointHandler().restore(step_dir.absolute() / "model_config")
        restored = ocp.PyTreeCheckpointer().restore(
            step_dir.absolute() / "state",
            args=ocp.args.PyTreeRestore(item={"params": abstract_params(from_config(config))},
                                        partial_restore=True))
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"{step_dir}: cannot restore the checkpoint ({e})") from e
    return dict(config), jax.tree_util.tree_map(jax.numpy.asarray, restored["params"])
