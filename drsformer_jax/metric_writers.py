"""Where training scalars go: `WORKDIR/metrics.jsonl` and TensorBoard event files.

`metrics.jsonl` has one JSON object per line, each with "step" and that step's
scalars. TensorBoard events are written with `tf.summary` (TensorFlow comes with
the input pipeline); without TensorFlow the JSON lines are still written.
Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.path = Path(workdir) / METRICS_FILE
        self.enabled = enabled
        self._tb: Any = None
        if enabled:
            try:
                from drsformer_jax.input_pipeline import import_tf

                tf = import_tf()
                self._tb = tf.summary.create_file_writer(str(Path(workdir) / TENSORBOARD_DIR))
            except ImportError:  # no TensorFlow: JSON lines only
                self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drops lines of steps after `step` (a resumed run will write them again)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _jsonable(v) for k, v in scalars.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._tb is not None:
            import tensorflow as tf

            with self._tb.as_default(step=int(step)):
                for key, value in scalars.items():
                    tf.summary.scalar(key, float(value))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _jsonable(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of `WORKDIR/metrics.jsonl`, in order."""
    path = Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
