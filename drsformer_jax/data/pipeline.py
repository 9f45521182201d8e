"""Training and evaluation input: paired deraining images through tf.data.

The pairs come from `data.sources` (`config.dataset.source`: ``folder``,
``tfds`` or ``synthetic``); this module samples, crops and batches them.

Determinism contract. Example order is the natural sort of the file names (the
order the TFDS builders write, too). The global batch at step ``s`` is a pure
function of (seed, s, data set): row ``r`` is global example ``n = s * B + r``,
which is position ``n % N`` of the permutation of epoch ``n // N`` (a NumPy
permutation keyed on (seed, epoch)); its crop and dihedral transform are drawn
from a generator keyed on (seed, s, r). Host ``p`` of ``P`` computes only rows
``[p * B / P, (p + 1) * B / P)``. Nothing depends on the number of hosts or
devices, on thread timing, or on past steps, so a run resumed at step ``s``
sees exactly the batches of the uninterrupted run.

Images smaller than the crop are padded at the bottom / right by mirroring with
the edge pixel repeated (OpenCV's BORDER_REFLECT), as the release does.

TensorFlow is imported on first use only (`utils.lazy_tf`), with GPUs and TPUs
hidden from it, so that it never takes accelerator memory.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ml_collections
import numpy as np

from drsformer_jax.data.sources import (
    SPLITS,
    DatasetError,
    LoadedPairs,
    eval_count,
    load_checked,
    open_split,
)
from drsformer_jax.utils import images
from drsformer_jax.utils.lazy_tf import import_tf

# Stream tags, so that the permutation and augmentation generators of one seed
# never share a key.
_PERMUTATION_TAG = 0x5045524D
_AUGMENT_TAG = 0x41554730


# --------------------------------------------------------------------------
# Deterministic sampling and augmentation (NumPy; shared by every source).


def dihedral(x: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 dihedral transforms of an HxWxC image (k in 0..7).

    k % 4 quarter turns counter-clockwise, then a left-right flip when k >= 4.
    """
    y = np.rot90(x, k % 4, axes=(0, 1))
    return y[:, ::-1] if k >= 4 else y


@dataclass(frozen=True)
class TrainSampler:
    """Which example each (step, row) reads, and how it is cropped and turned."""

    seed: int
    global_batch_size: int
    num_examples: int
    crop_size: int

    def example_index(self, step: int, row: int) -> int:
        n = step * self.global_batch_size + row
        epoch, position = divmod(n, self.num_examples)
        return int(self._permutation(epoch)[position])

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a few epochs' permutations, on purpose
    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([_PERMUTATION_TAG, _u64(self.seed), epoch])
        return rng.permutation(self.num_examples)

    def crop_and_transform(self, step: int, row: int, rainy: np.ndarray,
                           clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One aligned random crop of both images, then one dihedral transform."""
        c = self.crop_size
        h, w = rainy.shape[:2]
        if h < c or w < c:
            pad = ((0, max(c - h, 0)), (0, max(c - w, 0)), (0, 0))
            rainy, clean = np.pad(rainy, pad, "symmetric"), np.pad(clean, pad, "symmetric")
            h, w = rainy.shape[:2]
        rng = np.random.default_rng([_AUGMENT_TAG, _u64(self.seed), step, row])
        top = int(rng.integers(0, h - c + 1))
        left = int(rng.integers(0, w - c + 1))
        k = int(rng.integers(0, 8))
        window = np.s_[top:top + c, left:left + c]
        return (np.ascontiguousarray(dihedral(rainy[window], k)),
                np.ascontiguousarray(dihedral(clean[window], k)))


def _u64(x: int) -> int:
    return int(x) % (1 << 64)  # SeedSequence wants non-negative integers


# --------------------------------------------------------------------------
# Public API.


def check_dataset(config: ml_collections.ConfigDict) -> None:
    """Validates the configured data set early: layout, pairing, first pairs.

    Raises DatasetError with one clear message. For the synthetic source this
    writes the cached set if it is not there yet.
    """
    batch, crop = int(config.global_batch_size), int(config.crop_size)
    if batch <= 0 or crop <= 0:
        raise DatasetError(f"global_batch_size ({batch}) and crop_size ({crop}) must be > 0")
    for split in SPLITS:
        pairs = open_split(config, split)
        if len(pairs) == 0:
            raise DatasetError(f"{config.dataset.name} {split} split has no examples")
        load_checked(pairs, 0)


def create_train_iterator(config: ml_collections.ConfigDict, *, start_step: int,
                          process_index: int = 0,
                          process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Training batches for steps start_step, start_step + 1, ... (endless).

    Yields {"input": rainy, "target": clean}, float32 [B/P, crop, crop, 3] in
    [0, 1]: rows [p * B / P, (p + 1) * B / P) of the global batch of each step
    (B = config.global_batch_size, p / P = process_index / process_count). See
    the module docstring for the determinism contract.
    """
    batch, crop = int(config.global_batch_size), int(config.crop_size)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if batch <= 0 or batch % process_count:
        raise ValueError(f"global_batch_size {batch} must be a positive multiple of the "
                         f"number of processes ({process_count})")
    if crop <= 0:
        raise ValueError(f"crop_size must be > 0, got {crop}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    pairs = open_split(config, "train")
    if len(pairs) == 0:
        raise DatasetError(f"{config.dataset.name} train split has no examples")
    sampler = TrainSampler(seed=int(config.seed), global_batch_size=batch,
                           num_examples=len(pairs), crop_size=crop)
    local = batch // process_count
    first_row = process_index * local
    errors: list[BaseException] = []  # the first Python error, to re-raise as itself
    lock = threading.Lock()

    def example(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        step, i = divmod(int(k), local)
        row = first_row + i
        try:
            rainy, clean = load_checked(pairs, sampler.example_index(step, row))
            return sampler.crop_and_transform(step, row, rainy, clean)
        except Exception as e:
            with lock:
                errors.append(e)
            raise

    tf = import_tf()
    # Element k of this host's stream is row k % local of step k // local.
    ds = tf.data.Dataset.counter(start=start_step * local)
    ds = ds.map(lambda k: tf.numpy_function(example, [k], (tf.uint8, tf.uint8),
                                            stateful=False),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.map(lambda a, b: (tf.ensure_shape(a, (crop, crop, 3)),
                              tf.ensure_shape(b, (crop, crop, 3))))
    ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    batches = _batches(ds, errors)
    _LIVE_ITERATORS.add(batches)
    return batches


# A tf.data iterator whose Python map functions are still in flight deadlocks the
# interpreter if it is first destroyed during shutdown; close live ones before.
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    for it in list(_LIVE_ITERATORS):
        with contextlib.suppress(Exception):
            it.close()


def _batches(ds: Any, errors: list[BaseException]) -> Iterator[dict[str, np.ndarray]]:
    tf = import_tf()
    it = ds.as_numpy_iterator()
    while True:
        try:
            rainy, clean = next(it)
        except tf.errors.OpError as e:
            if errors:
                raise errors[0] from None
            raise DatasetError(f"input pipeline failed: {e.message}") from None
        # Same conversion as images.to_float, done here on the whole batch.
        yield {"input": images.to_float(rainy), "target": images.to_float(clean)}


def load_eval_set(config: ml_collections.ConfigDict) -> LoadedPairs:
    """The test split as (name, rainy uint8 HxWx3, clean uint8 HxWx3), in name order.

    Whole images; the first `config.dataset.eval_max_images` only when that is > 0.
    """
    pairs = open_split(config, "test")
    n = eval_count(config, len(pairs))
    # Reading is I/O and PNG decoding, which release the GIL: threads suffice.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return LoadedPairs(pool.map(lambda i: load_checked(pairs, i, named=True), range(n)))
