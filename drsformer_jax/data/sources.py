"""The data sets as random-access (rainy, clean) pairs: folders, TFDS, synthetic.

`open_split(config, split)` gives a `PairSource` for the configured data set:
`FolderPairs` (the release's layout `<root>/{train,test}/<Dataset>/{input,target}`,
paired by `utils.files.pair_files`: file name, then file name without extension),
`TfdsPairs` (the same sets prepared as TFDS array_record shards by
`data.tfds_builders`) or the synthetic set (written once to a cache folder, then read
as a folder set). Pairs are in the natural
order of their file names, the order the TFDS builders write too.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ml_collections
import numpy as np

from drsformer_jax.data import synthetic
from drsformer_jax.utils import images
from drsformer_jax.utils.files import first_names, list_images, pair_files
from drsformer_jax.utils.lazy_tf import import_tf

DATASETS = ("synthetic", "Rain200L", "Rain200H", "DID-Data", "DDN-Data", "SPA-Data")
SOURCES = ("folder", "tfds", "synthetic")
SPLITS = ("train", "test")

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
    # --mode evaluate's scoring: "" = by data set name (evaluation.BENCHMARK_PROTOCOLS);
    # e.g. "niqe,brisque" for a custom set of real rainy photos (input/ only).
    cfg.benchmark_protocol = ""
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


class LoadedPairs(tuple):
    """Pairs already in memory: a tuple of (name, rainy, clean), and a PairSource."""

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self[index][1:]

    def load_named(self, index: int) -> tuple[str, np.ndarray, np.ndarray]:
        return self[index]


def eval_count(config: ml_collections.ConfigDict, available: int) -> int:
    """How many test images are evaluated: `dataset.eval_max_images` when > 0, else all."""
    limit = int(config.dataset.get("eval_max_images", 0) or 0)
    return available if limit <= 0 else min(limit, available)


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
    target_dir: Path | None  # None: a set of rainy images only (real rain, `find_inputs`)
    names: tuple[str, ...]  # input file names (plain strings: SPA-Data has 638k)
    target_names: tuple[str, ...]
    # find_pairs(strict=False): the names of the files that did not pair.
    unpaired_inputs: tuple[str, ...] = ()
    unpaired_targets: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.names)

    def input_path(self, index: int) -> Path:
        return self.input_dir / self.names[index]

    def target_path(self, index: int) -> Path:
        return self.target_dir / self.target_names[index]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        rainy = images.read_rgb8(self.input_path(index))
        if self.target_dir is None:
            return rainy, None
        clean = images.read_rgb8(self.target_path(index))
        if rainy.shape != clean.shape:
            raise DatasetError(
                f"{self.dataset} {self.split}: {self.input_path(index)} is {_hw(rainy)} but "
                f"{self.target_path(index)} is {_hw(clean)}; a pair must have one size")
        return rainy, clean

    def load_named(self, index: int) -> tuple[str, np.ndarray, np.ndarray]:
        return (self.names[index], *self.load(index))


def find_pairs(root: str | os.PathLike, dataset: str, split: str,
               strict: bool = True) -> FolderPairs:
    """Lists and pairs `<root>/<split>/<dataset>/{input,target}` by the one pairing rule,
    `utils.files.pair_files` (file name, then file name without extension).

    Raises one DatasetError naming every missing or empty folder, or two images of
    one folder with one name. `strict` (a data set to train or evaluate on): every
    image must pair, else a DatasetError with the first few names that do not and
    their counts. `strict=False` (a sample set that lacks a file): the pairs found,
    the others' names in `unpaired_inputs` / `unpaired_targets`; that DatasetError
    only when nothing pairs. Hidden files and files that are not images are ignored.
    """
    base = Path(root) / split / dataset
    folders = {"input": base / "input", "target": base / "target"}
    listed: dict[str, list[Path]] = {}
    problems = []
    for kind, folder in folders.items():
        if not folder.is_dir():
            problems.append(f"{folder} does not exist" if not folder.exists()
                            else f"{folder} is not a folder")
            continue
        files = list_images(folder)
        duplicates = _shared_stems(files)
        if duplicates:
            problems.append(f"{folder} has several images with one name: "
                            + first_names(duplicates))
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
    pairing = pair_files(listed["input"], listed["target"])
    only_input = sorted(pairing.unpaired_results, key=natural_key)
    only_target = sorted(pairing.unpaired_targets, key=natural_key)
    if (only_input or only_target) and (strict or not pairing.pairs):
        parts = []
        if only_input:
            parts.append(f"{len(only_input)} of {len(listed['input'])} images in "
                         f"{folders['input']} have no target: " + first_names(only_input))
        if only_target:
            parts.append(f"{len(only_target)} of {len(listed['target'])} images in "
                         f"{folders['target']} have no input: " + first_names(only_target))
        raise DatasetError(f"{dataset} {split} split: names do not pair (matched by file "
                           "name without extension): " + "; ".join(parts))
    pairs = sorted(pairing.pairs, key=lambda pair: natural_key(pair[0].name))
    return FolderPairs(
        dataset=dataset, split=split, input_dir=folders["input"], target_dir=folders["target"],
        names=tuple(i.name for i, _ in pairs), target_names=tuple(t.name for _, t in pairs),
        unpaired_inputs=tuple(only_input), unpaired_targets=tuple(only_target))


def find_inputs(root: str | os.PathLike, dataset: str, split: str) -> FolderPairs:
    """The rainy images of `<root>/<split>/<dataset>/input` alone (real rain: no targets)."""
    folder = Path(root) / split / dataset / "input"
    if not folder.is_dir():
        raise DatasetError(f"{dataset} {split} split: {folder} "
                           + ("does not exist" if not folder.exists() else "is not a folder"))
    names = sorted((p.name for p in list_images(folder)), key=natural_key)
    if not names:
        raise DatasetError(f"{dataset} {split} split: {folder} has no image files "
                           f"({', '.join(images.IMAGE_EXTENSIONS)})")
    return FolderPairs(dataset=dataset, split=split, input_dir=folder, target_dir=None,
                       names=tuple(names), target_names=())


def _shared_stems(files: list[Path]) -> list[str]:
    """'a.png / a.jpg' for each image whose name without extension an earlier one has."""
    first: dict[str, str] = {}
    duplicates = []
    for path in files:
        if path.stem in first:
            duplicates.append(f"{first[path.stem]} / {path.name}")
        first[path.stem] = path.name
    return duplicates


def _hw(arr: np.ndarray) -> str:
    return f"{arr.shape[1]}x{arr.shape[0]}"


# --------------------------------------------------------------------------
# TFDS and synthetic sources.


class TfdsPairs:
    """A split of a prepared TFDS set (`data.tfds_builders`), by index."""

    def __init__(self, dataset: str, split: str, data_dir: str | None):
        import_tf()  # hide accelerators before tensorflow_datasets starts TensorFlow
        # The TensorFlow boundary: tfds_builders imports tensorflow_datasets.
        from drsformer_jax.data import tfds_builders

        self.dataset, self.split = dataset, split
        self._source = tfds_builders.data_source(dataset, split, data_dir)

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


def open_split(config: ml_collections.ConfigDict, split: str,
               inputs_only: bool = False) -> PairSource:
    """The pairs of `split` ('train' or 'test') of the configured data set.

    `inputs_only`: a folder set may have no target/ folder (real rain); its
    pairs then have None for the clean image.
    """
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
    root = os.path.expanduser(str(ds.root))
    if inputs_only and not (Path(root) / split / name / "target").exists():
        return find_inputs(root, name, split)
    return find_pairs(root, name, split)




def load_checked(pairs: PairSource, index: int, named: bool = False) -> Any:
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


