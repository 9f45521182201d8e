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
import sys
from pathlib import Path
from typing import Any

from drsformer_jax.utils.files import atomic_path
from drsformer_jax.utils.lazy_tf import import_tf

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.path = Path(workdir) / METRICS_FILE
        self.enabled = enabled
        self._tf: Any = None
        self._tb: Any = None
        if enabled:
            try:
                self._tf = import_tf()
                self._tb = self._tf.summary.create_file_writer(
                    str(Path(workdir) / TENSORBOARD_DIR))
            except ImportError:  # no TensorFlow: JSON lines only
                self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drops the lines of steps after `step`: the run goes on from there and writes them
        again. A line that is not JSON (a writer killed mid-line) is dropped with a note."""
        if not self.enabled or not self.path.exists():
            return
        keep, broken = [], 0
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                broken += 1
                continue
            if int(record.get("step", 0)) <= step:
                keep.append(line)
        if broken:
            print(f"note: {self.path}: dropped {broken} incomplete line(s)", file=sys.stderr)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in keep))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _jsonable(v) for k, v in scalars.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._tb is not None:
            with self._tb.as_default(step=int(step)):
                for key, value in scalars.items():
                    self._tf.summary.scalar(key, float(value))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _jsonable(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
