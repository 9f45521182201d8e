"""Inference: padding and tiles, memory planning, the compilation cache, the Restorer, jobs.

`tiling.pad_to_multiple` is the project's one padding helper; `Restorer` is the
one path from images to restored images (derain, `--mode evaluate` and
training's evaluation).
"""

from drsformer_jax.inference.cache import CACHE_ENV, default_cache_dir, enable_compilation_cache
from drsformer_jax.inference.ensemble import ENSEMBLE_SIZE, self_ensemble
from drsformer_jax.inference.jobs import Job, restore_jobs
from drsformer_jax.inference.memory import (
    BYTES_PER_PIXEL_PER_DIM,
    MEMORY_FRACTION,
    available_memory,
    estimate_memory,
    is_out_of_memory,
)
from drsformer_jax.inference.restorer import Plan, Restorer, make_restorer
from drsformer_jax.inference.tiling import (
    DEFAULT_TILE_OVERLAP,
    TILE_BLENDS,
    blend_weights,
    bucket_side,
    bucket_size,
    pad_to_multiple,
    padded_size,
    restore_tiled,
    seam_step,
    tile_positions,
    tile_stride,
)

__all__ = ["BYTES_PER_PIXEL_PER_DIM", "CACHE_ENV", "DEFAULT_TILE_OVERLAP", "ENSEMBLE_SIZE",
           "MEMORY_FRACTION", "TILE_BLENDS", "Job", "Plan", "Restorer", "available_memory",
           "blend_weights", "bucket_side", "bucket_size",
           "default_cache_dir", "enable_compilation_cache", "estimate_memory",
           "is_out_of_memory", "make_restorer", "pad_to_multiple", "padded_size",
           "restore_jobs", "restore_tiled", "seam_step", "self_ensemble", "tile_positions",
           "tile_stride"]
