"""TFDS builders for the release's deraining sets (manual download).

Rain200L, Rain200H, DID-Data, DDN-Data and SPA-Data, read from the release's
layout ``<manual_dir>/{train,test}/<Dataset>/{input,target}`` (see data/README.md)
and written once as array_record shards, which `tfds.data_sources` (and
`data_source` here) read by random access: the input pipeline's ``tfds`` source
indexes them exactly as it indexes the folders, so both give the same batches.

Examples are written in the natural order of their file names
(`disable_shuffling`), so that index i is the same pair in both sources.
8-bit RGB PNG files are stored byte for byte; any other file is decoded with
`drsformer_jax.images.read_rgb8` and stored as an 8-bit RGB PNG, so every
decoder (PIL or OpenCV) reads back the pixels that the folder source sees.

Prepare (progress is printed):

    python -m drsformer_jax.rain_datasets --dataset Rain200H --manual-dir data \\
        --data-dir ~/tensorflow_datasets

Importing this module imports TensorFlow (with accelerators hidden from it).
"""

from __future__ import annotations

import io
import os
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from drsformer_jax.data.sources import DatasetError, find_pairs
from drsformer_jax.utils import images
from drsformer_jax.utils.lazy_tf import import_tf

import_tf()  # hide GPUs / TPUs before tensorflow_datasets starts TensorFlow
import tensorflow_datasets as tfds  # noqa: E402


class _RainPairs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Paired rainy / clean images of one release data set."""

    RELEASE_FOLDER: ClassVar[str]  # <Dataset> in the release's layout
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # TFDS looks for a checksums file next to the code; a manual-download set
        # has none, and the lookup needs the `importlib_resources` backport.
        return None

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    @classmethod
    def _manual_instructions(cls) -> str:
        return (f"Download {cls.RELEASE_FOLDER} from the links in the DRSformer release's "
                "README (https://github.com/cschenxiang/DRSformer) and lay it out as "
                f"<manual_dir>/train/{cls.RELEASE_FOLDER}/{{input,target}}/ and "
                f"<manual_dir>/test/{cls.RELEASE_FOLDER}/{{input,target}}/ (rainy images in "
                "input/, clean ones of the same file name in target/).")

    def _info(self) -> tfds.core.DatasetInfo:
        image = tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format="png")
        return self.dataset_info_from_configs(
            description=f"{self.RELEASE_FOLDER}: paired rainy (input) and clean (target) "
                        "images, as distributed with DRSformer (CVPR 2023).",
            features=tfds.features.FeaturesDict(
                {"name": tfds.features.Text(), "input": image, "target": image}),
            supervised_keys=("input", "target"),
            homepage="https://github.com/cschenxiang/DRSformer",
            disable_shuffling=True,  # index i = i-th file name, as in the folder source
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = Path(os.fspath(dl_manager.manual_dir))
        # Pair both splits up front, so that a bad layout fails before any writing.
        pairs = {split: find_pairs(root, self.RELEASE_FOLDER, split) for split in ("train",
                                                                                  "test")}
        for split, p in pairs.items():
            print(f"{self.RELEASE_FOLDER} {split}: {len(p)} pairs in "
                  f"{root / split / self.RELEASE_FOLDER}", flush=True)
        return {split: self._generate_examples(p) for split, p in pairs.items()}

    def _generate_examples(self, pairs: Any) -> Iterator[tuple[int, dict[str, Any]]]:
        start = time.monotonic()
        for i in range(len(pairs)):
            rainy, r_size = _stored_png(pairs.input_path(i))
            clean, c_size = _stored_png(pairs.target_path(i))
            if r_size != c_size:
                raise DatasetError(f"{pairs.input_path(i)} is {r_size[0]}x{r_size[1]} but "
                                   f"{pairs.target_path(i)} is {c_size[0]}x{c_size[1]}; a pair "
                                   "must have one size")
            yield i, {"name": pairs.names[i], "input": rainy, "target": clean}
            if (i + 1) % 5000 == 0:
                rate = (i + 1) / (time.monotonic() - start)
                print(f"  {pairs.split}: {i + 1}/{len(pairs)} pairs ({rate:.0f}/s)",
                      flush=True)


def _stored_png(path: Path) -> tuple[bytes, tuple[int, int]]:
    """The PNG bytes to store for `path`, and its (width, height).

    An 8-bit RGB PNG without EXIF is kept as it is (fast, and lossless by
    construction); anything else is decoded the way the folder source decodes
    it and re-encoded as an 8-bit RGB PNG.
    """


    data = path.read_bytes()
    if images.png_header(data) == (8, 2):  # 8-bit, colour type 2 (RGB)
        with Image.open(io.BytesIO(data)) as im:
            if im.mode == "RGB" and "exif" not in im.info:
                return data, im.size
    try:
        arr = images.read_rgb8(path)
    except images.ImageReadError as e:
        raise DatasetError(str(e)) from e
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue(), (arr.shape[1], arr.shape[0])


def _builder_class(release_folder: str, tfds_name: str, doc: str) -> type[_RainPairs]:
    namespace = {"__doc__": doc, "__module__": __name__, "name": tfds_name,
                 "RELEASE_FOLDER": release_folder}
    # Run as `python -m`, this file is __main__ and main() uses the classes of the
    # imported module instead; registering these too would clash with them.
    cls = types.new_class(tfds_name, (_RainPairs,),
                          {"skip_registration": __name__ == "__main__"},
                          lambda ns: ns.update(namespace))
    cls.MANUAL_DOWNLOAD_INSTRUCTIONS = cls._manual_instructions()
    return cls


# Release folder name -> TFDS builder (TFDS names: rain200l, rain200h, did_data, ...).
BUILDERS: dict[str, type[_RainPairs]] = {
    folder: _builder_class(folder, tfds_name, doc) for folder, tfds_name, doc in (
        ("Rain200L", "rain200l", "Rain200L: 1,800 training and 200 test pairs, light rain."),
        ("Rain200H", "rain200h", "Rain200H: 1,800 training and 200 test pairs, heavy rain."),
        ("DID-Data", "did_data", "DID-Data (DID-MDN): 12,000 training and 1,200 test pairs."),
        ("DDN-Data", "ddn_data", "DDN-Data: 12,600 training and 1,400 test pairs."),
        ("SPA-Data", "spa_data", "SPA-Data: 638,492 training and 1,000 test pairs (real rain)."),
    )
}


def builder(dataset: str, data_dir: str | os.PathLike | None = None) -> _RainPairs:
    """The TFDS builder of release data set `dataset` (e.g. 'Rain200H')."""
    try:
        cls = BUILDERS[dataset]
    except KeyError:
        raise DatasetError(f"no TFDS builder for {dataset!r}; TFDS sets: "
                           f"{', '.join(BUILDERS)}") from None
    return cls(data_dir=os.fspath(data_dir) if data_dir else None)


def data_source(dataset: str, split: str, data_dir: str | os.PathLike | None = None) -> Any:
    """Random-access source of a prepared split; DatasetError if not prepared."""
    b = builder(dataset, data_dir)
    if not b.is_prepared():
        raise DatasetError(
            f"{dataset} is not prepared as TFDS in {b.data_dir}. Prepare it once with: "
            f"python -m drsformer_jax.rain_datasets --dataset {dataset} --manual-dir <root> "
            f"--data-dir {data_dir or '~/tensorflow_datasets'}  (see data/README.md)")
    if split not in b.info.splits:
        raise DatasetError(f"{dataset} in {b.data_dir} has no split {split!r}")
    return b.as_data_source(split=split)


def prepare(dataset: str, manual_dir: str | os.PathLike,
            data_dir: str | os.PathLike | None = None) -> Path:
    """Prepares `dataset` from the release layout under `manual_dir`; returns its folder."""
    b = builder(dataset, data_dir)
    if b.is_prepared():
        print(f"{dataset}: already prepared in {b.data_dir}", flush=True)
        return Path(b.data_dir)
    for split in ("train", "test"):  # a bad layout fails here, with a clear message
        find_pairs(manual_dir, dataset, split)
    start = time.monotonic()
    print(f"{dataset}: preparing from {manual_dir} into {b.data_dir}", flush=True)
    b.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    splits = ", ".join(f"{k}: {v.num_examples}" for k, v in b.info.splits.items())
    print(f"{dataset}: done in {time.monotonic() - start:.0f} s ({splits}) -> {b.data_dir}",
          flush=True)
    return Path(b.data_dir)
