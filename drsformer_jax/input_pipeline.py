"""Training and evaluation input: paired deraining images through tf.data.

Sources (`config.dataset.source`):

* ``folder``: the release's layout, ``<root>/{train,test}/<Dataset>/{input,target}``,
  rainy and clean images paired by file name without extension.
* ``tfds``: the same sets prepared once as TFDS array_record shards
  (`drsformer_jax.rain_datasets`), read by random access from ``tfds_data_dir``.
* ``synthetic``: `drsformer_jax.synthetic`, written once to a cache folder
  ``<root>/synthetic/<key>/`` (``<key>`` names every parameter) and then read as
  a folder set, so it needs no download and goes through the folder code path.

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

TensorFlow is imported on first use only, with GPUs and TPUs hidden from it, so
that it never takes accelerator memory; nothing else in the package imports
this module, so the model and the train step never need TensorFlow.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import threading
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ml_collections
import numpy as np

from drsformer_jax import images, synthetic

DATASETS = ("synthetic", "Rain200L", "Rain200H", "DID-Data", "DDN-Data", "SPA-Data")
SOURCES = ("folder", "tfds", "synthetic")
SPLITS = ("train", "test")

# Stream tags, so that the permutation and augmentation generators of one seed
# never share a key.
_PERMUTATION_TAG = 0x5045524D
_AUGMENT_TAG = 0x41554730
_MAX_LISTED = 5  # offenders named in an error message


class DatasetError(ValueError):
    """A data set that is missing, empty, unreadable or whose files do not pair."""


# --------------------------------------------------------------------------
# Config.


def default_dataset_config(name: str) -> ml_collections.ConfigDict:
    """The `config.dataset` sub-dict for data set `name`, with defaults."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {DATASETS}")
    cfg = ml_collections.ConfigDict()
    cfg.name = name
    cfg.source = "synthetic" if name == "synthetic" else "folder"
    cfg.root = "data"  # root of <root>/{train,test}/<name>/{input,target}
    cfg.tfds_data_dir = ""  # "" = TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
    cfg.eval_max_images = 0  # 0 = the whole test split
    cfg.synthetic = ml_collections.ConfigDict({
        "num_train": 256, "num_test": 16, "height": 192, "width": 192,
        "regime": "heavy", "seed": 0,
    })
    return cfg


# --------------------------------------------------------------------------
# Paired folders.


class PairSource(Protocol):
    """Random access to the (rainy, clean) pairs of one split, in a fixed order."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]: ...

    def load_named(self, index: int) -> tuple[str, np.ndarray, np.ndarray]: ...


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders '2.png' before '10.png'."""
    parts = re.split(r"(\d+)", name)
    return (*((int(p) if i % 2 else p) for i, p in enumerate(parts)), name)


@dataclass(frozen=True)
class FolderPairs:
    """The pairs of `<root>/<split>/<dataset>/{input,target}`, natural-sorted by name."""

    dataset: str
    split: str
    input_dir: Path
    target_dir: Path
    names: tuple[str, ...]  # input file names (plain strings: SPA-Data has 638k)
    target_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)

    def input_path(self, index: int) -> Path:
        return self.input_dir / self.names[index]

    def target_path(self, index: int) -> Path:
        return self.target_dir / self.target_names[index]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rainy = images.read_rgb8(self.input_path(index))
        clean = images.read_rgb8(self.target_path(index))
        if rainy.shape != clean.shape:
            raise DatasetError(
                f"{self.dataset} {self.split}: {self.input_path(index)} is {_hw(rainy)} but "
                f"{self.target_path(index)} is {_hw(clean)}; a pair must have one size")
        return rainy, clean

    def load_named(self, index: int) -> tuple[str, np.ndarray, np.ndarray]:
        return (self.names[index], *self.load(index))


def find_pairs(root: str | os.PathLike, dataset: str, split: str) -> FolderPairs:
    """Lists and pairs `<root>/<split>/<dataset>/{input,target}`.

    Raises one DatasetError naming every missing or empty folder, or the first
    few names that do not pair (matched by file name without extension) with
    their counts. Hidden files and files that are not images are ignored.
    """
    base = Path(root) / split / dataset
    folders = {"input": base / "input", "target": base / "target"}
    listed: dict[str, dict[str, Path]] = {}
    problems = []
    for kind, folder in folders.items():
        if not folder.is_dir():
            problems.append(f"{folder} does not exist" if not folder.exists()
                            else f"{folder} is not a folder")
            continue
        files, duplicates = _list_images(folder)
        if duplicates:
            problems.append(f"{folder} has several images with one name: "
                            + _first_few(duplicates))
        if not files:
            problems.append(f"{folder} has no image files "
                            f"({', '.join(images.IMAGE_EXTENSIONS)})")
        listed[kind] = files
    if problems:
        raise DatasetError(
            f"{dataset} {split} split: " + "; ".join(problems)
            + f". Expected the release's layout {Path(root)}/{{train,test}}/{dataset}/"
            "{input,target} with rainy images in input/ and clean ones of the same "
            "file name in target/ (see data/README.md).")
    inputs, targets = listed["input"], listed["target"]
    only_input = sorted(set(inputs) - set(targets), key=natural_key)
    only_target = sorted(set(targets) - set(inputs), key=natural_key)
    if only_input or only_target:
        parts = []
        if only_input:
            parts.append(f"{len(only_input)} of {len(inputs)} images in {folders['input']} "
                         "have no target: " + _first_few([inputs[s] for s in only_input]))
        if only_target:
            parts.append(f"{len(only_target)} of {len(targets)} images in "
                         f"{folders['target']} have no input: "
                         + _first_few([targets[s] for s in only_target]))
        raise DatasetError(f"{dataset} {split} split: names do not pair (matched by file "
                           "name without extension): " + "; ".join(parts))
    stems = sorted(inputs, key=lambda s: natural_key(inputs[s]))
    return FolderPairs(
        dataset=dataset, split=split, input_dir=folders["input"], target_dir=folders["target"],
        names=tuple(inputs[s] for s in stems), target_names=tuple(targets[s] for s in stems))


def _list_images(folder: Path) -> tuple[dict[str, str], list[str]]:
    """{stem: file name} of the images in `folder`, and the names that clash."""
    files: dict[str, str] = {}
    duplicates = []
    for entry in os.scandir(folder):
        name = entry.name
        if name.startswith(".") or not images.is_image_file(name) or not entry.is_file():
            continue
        stem = os.path.splitext(name)[0]
        if stem in files:
            duplicates.append(f"{files[stem]} / {name}")
        files[stem] = name
    return files, duplicates


def _first_few(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED
                    else "")


def _hw(arr: np.ndarray) -> str:
    return f"{arr.shape[1]}x{arr.shape[0]}"


# --------------------------------------------------------------------------
# TFDS and synthetic sources.


class TfdsPairs:
    """A split of a prepared TFDS set (`drsformer_jax.rain_datasets`), by index."""

    def __init__(self, dataset: str, split: str, data_dir: str | None):
        import_tf()  # hide accelerators before tensorflow_datasets starts TensorFlow
        from drsformer_jax import rain_datasets

        self.dataset, self.split = dataset, split
        self._source = rain_datasets.data_source(dataset, split, data_dir)

    def __len__(self) -> int:
        return len(self._source)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.load_named(index)[1:]

    def load_named(self, index: int) -> tuple[str, np.ndarray, np.ndarray]:
        example = self._source[index]
        name = example["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        return name, np.asarray(example["input"]), np.asarray(example["target"])


def synthetic_root(dataset_config: ml_collections.ConfigDict) -> Path:
    """Writes the synthetic set once (if needed); returns its folder-layout root."""
    s = dataset_config.synthetic
    cache = Path(os.path.expanduser(str(dataset_config.root))) / "synthetic"
    return synthetic.ensure_dataset(
        cache, "synthetic", int(s.num_train), int(s.num_test), (int(s.height), int(s.width)),
        str(s.regime), int(s.seed))


def open_split(config: ml_collections.ConfigDict, split: str) -> PairSource:
    """The pairs of `split` ('train' or 'test') of the configured data set."""
    ds = config.dataset
    # Any folder name works with the folder source (a custom set laid out like
    # the release's); the TFDS builders know the release's five sets only.
    name, source = str(ds.name), str(ds.get("source", "folder"))
    if source not in SOURCES:
        raise DatasetError(f"unknown data source {source!r}; expected one of {SOURCES}")
    if source == "synthetic" and name != "synthetic":
        raise DatasetError(f"source 'synthetic' makes the data set 'synthetic', not {name!r}; "
                           "use source 'folder' or 'tfds' for the downloaded sets")
    if source == "tfds" and name == "synthetic":
        raise DatasetError("the synthetic set has no TFDS builder; use source 'synthetic'")
    if source == "synthetic":
        return find_pairs(synthetic_root(ds), "synthetic", split)
    if source == "tfds":
        data_dir = str(ds.get("tfds_data_dir", ""))
        return TfdsPairs(name, split, os.path.expanduser(data_dir) if data_dir else None)
    return find_pairs(os.path.expanduser(str(ds.root)), name, split)


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
        _load_checked(pairs, 0)


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
            rainy, clean = _load_checked(pairs, sampler.example_index(step, row))
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


def load_eval_set(config: ml_collections.ConfigDict) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The test split as (name, rainy uint8 HxWx3, clean uint8 HxWx3), in name order.

    Whole images; the first `config.dataset.eval_max_images` only when that is > 0.
    """
    pairs = open_split(config, "test")
    limit = int(config.dataset.get("eval_max_images", 0) or 0)
    n = len(pairs) if limit <= 0 else min(limit, len(pairs))
    # Reading is I/O and PNG decoding, which release the GIL: threads suffice.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda i: _load_checked(pairs, i, named=True), range(n)))


def _load_checked(pairs: PairSource, index: int, named: bool = False) -> Any:
    try:
        out = pairs.load_named(index) if named else pairs.load(index)
    except images.ImageReadError as e:
        raise DatasetError(str(e)) from e
    rainy, clean = out[-2], out[-1]
    if rainy.shape != clean.shape or rainy.ndim != 3 or rainy.shape[2] != 3:
        raise DatasetError(f"example {index} of {getattr(pairs, 'dataset', '?')} "
                           f"{getattr(pairs, 'split', '?')}: input {rainy.shape} and target "
                           f"{clean.shape} must both be HxWx3 of one size")
    return out


@functools.cache
def import_tf() -> Any:
    """TensorFlow, imported on first use with GPUs and TPUs hidden from it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TF only reads and augments images here; its oneDNN kernels would only add a banner.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf

    for kind in ("GPU", "TPU"):
        # RuntimeError / ValueError: TF was already started elsewhere, or no such type.
        with contextlib.suppress(RuntimeError, ValueError):
            tf.config.set_visible_devices([], kind)
    return tf
