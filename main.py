"""Trains (or evaluates) DRSformer.

    python main.py --config configs/rain200h.py --workdir DIR [--config.FIELD=VALUE ...]
    python main.py --config configs/rain200h.py --workdir DIR --mode evaluate \
        [--checkpoint PATH] [--output DIR] [--ensemble] [--tile_blend box|cosine]

Starting again in the same workdir resumes from its latest checkpoint. On a
TPU pod slice or several GPU hosts, run the same command on every host with
--distributed (see README.md). --mode evaluate derains the config's test split
with the workdir's best checkpoint (or --checkpoint) and scores it under the
data set's benchmark protocol (drsformer_jax/evaluation/evaluator.py), on one process.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from drsformer_jax.evaluation.evaluator import EvaluationError, evaluate_checkpoint  # noqa: E402
from drsformer_jax.train import TrainingError, train_and_evaluate  # noqa: E402

FLAGS = flags.FLAGS


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() first (multi-host TPU pods, GPU clusters).")
flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                    "--distributed: host:port of process 0 (default $JAX_COORDINATOR_ADDRESS; "
                    "unset: detected on TPU pods, SLURM, Open MPI).")
flags.DEFINE_integer("num_processes", _env_int("JAX_NUM_PROCESSES"),
                     "--distributed: number of processes (default $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", _env_int("JAX_PROCESS_ID"),
                     "--distributed: this process's index (default $JAX_PROCESS_ID).")
flags.DEFINE_enum("mode", "train", ["train", "evaluate"],
                  "train, or evaluate a checkpoint on the config's test split.")
flags.DEFINE_string("checkpoint", None, "evaluate: weights dir (convert), workdir or checkpoint "
                    "step dir to evaluate (default: the workdir's best checkpoint by PSNR).")
flags.DEFINE_string("output", None, "evaluate: folder for the derained PNGs and score.json "
                    "(default: WORKDIR/eval/<dataset>).")
flags.DEFINE_bool("ensemble", False, "evaluate: x8 self-ensemble (8 flips / rotations "
                  "averaged; 8x the time; not the paper's protocol).")
flags.DEFINE_enum("tile_blend", "box", ["box", "cosine"], "evaluate: how the tiles of an "
                  "image too large for memory are combined: box (the release's average) or "
                  "cosine (smooth ramps, no seams).")
flags.DEFINE_alias("tile-blend", "tile_blend")
flags.mark_flags_as_required(["config", "workdir"])


def use_cpu_devices(config) -> None:
    """config.cpu_devices > 0: that many JAX CPU devices. Must run before JAX starts."""
    count = int(config.get("cpu_devices", 0) or 0)
    if count > 0:
        jax.config.update("jax_num_cpu_devices", count)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    use_cpu_devices(FLAGS.config)
    logging.set_verbosity(logging.ERROR)  # orbax logs saves and read-only notes
    if FLAGS.mode == "evaluate":
        try:
            evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.output,
                                ensemble=FLAGS.ensemble, tile_blend=FLAGS.tile_blend)
        except (EvaluationError, ValueError) as e:  # Dataset/CheckpointError too
            raise SystemExit(f"error: {e}") from None
        return
    if FLAGS.checkpoint is not None or FLAGS.output is not None or FLAGS.ensemble \
            or FLAGS.tile_blend != "box":
        raise app.UsageError("--checkpoint, --output, --ensemble and --tile_blend are for "
                             "--mode evaluate")
    if FLAGS.distributed:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id)

    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (TrainingError, ValueError) as e:  # DatasetError is a ValueError
        raise SystemExit(f"error: {e}") from None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one error line for a config override that cannot apply."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        raise SystemExit(f"error: {e}") from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # from config_flags
        bad = [a for a in argv[1:] if a.startswith("--config.")]
        raise SystemExit(f"error: cannot apply {' '.join(bad) or 'the --config flags'}: "
                         f"{str(e).strip(chr(34) + chr(39))} (no such config field, or a "
                         "value of the wrong type)") from None


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
