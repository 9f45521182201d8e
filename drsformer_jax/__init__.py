"""DRSformer (CVPR 2023) image deraining in JAX / Flax.

    model, variables = drsformer_jax.load("converted/")   # or a workdir, or a .pth
    restored = model.apply(variables, rainy)   # NHWC float32 in [0, 1]

Subpackages, by concern:
  model/        the network (U-Net, TKSA, MSFN, MEFC, layers, PyTorch-style init)
  data/         pair sources, the tf.data training pipeline, TFDS builders, synthetic rain
  checkpoints/  weights directories (convert), training checkpoints, release .pth, `load`
  train/        train state, optimizer and step; the training loop; metric logging
  evaluation/   PSNR / SSIM protocols, score files, the one evaluator
  inference/    padding and tiles, memory planning, the compilation cache, the Restorer
  utils/        the one image reader / writer, file helpers
The command-line tools are the top-level modules (`python -m drsformer_jax.<tool>`):
derain, score, reproduce, tile_seams, convert, export, rain_datasets, parity, benchmark,
compile_report; `release` holds the authors' recipe and loads their PyTorch class.

The TensorFlow boundary: `model`, `checkpoints`, `inference`, `evaluation` and
the train step import without TensorFlow. TensorFlow is imported in one place,
`utils.lazy_tf.import_tf()`, called only when the tf.data pipeline
(`data.pipeline`), a TFDS source (`data.sources.TfdsPairs`, which imports
`data.tfds_builders` inside its constructor), TensorBoard logging
(`train.metric_writer`) or the SavedModel export (`inference.serving`, which
imports jax2tf inside `export_saved_model`) is used. Those, and PyTorch in
`benchmark --compare-torch` and `release` (the release's model, for `parity`), are the
only function-level imports.

Submodules are imported lazily here so that `import drsformer_jax` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "DRSformer": ("drsformer_jax.model.drsformer", "DRSformer"),
    "load": ("drsformer_jax.checkpoints.loading", "load"),
    "load_exported": ("drsformer_jax.exported", "load_exported"),
}

__all__ = ["DRSformer", "load", "load_exported", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'drsformer_jax' has no attribute {name!r}")
