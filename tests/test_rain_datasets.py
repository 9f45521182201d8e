"""TFDS builders: a tiny release layout prepares as array_record and the 'tfds'
source gives exactly the batches and evaluation set of the 'folder' source."""

import itertools
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from drsformer_jax import rain_datasets as prepare_cli
from drsformer_jax.data import pipeline as ip
from drsformer_jax.data import sources
from drsformer_jax.data import tfds_builders as rain_datasets
from drsformer_jax.utils import images


def _image(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory) -> Path:
    """Rain200L laid out as the release has it, with a few awkward files."""
    root = tmp_path_factory.mktemp("manual")
    base = root / "train/Rain200L"
    for i, (h, w) in enumerate([(36, 40), (40, 34), (24, 50)]):
        images.write_image(base / "input" / f"{i + 1}.png", _image(i, h, w))
        images.write_image(base / "target" / f"{i + 1}.png", _image(10 + i, h, w))
    # A JPEG input (paired by stem with a PNG target) and a palette target:
    # both are stored as re-encoded RGB PNGs of what read_rgb8 gives.
    (base / "input/3.png").unlink()
    Image.fromarray(_image(2, 24, 50)).save(base / "input/3.jpg", quality=80)
    Image.fromarray(_image(12, 40, 34)).convert("P").save(base / "target/2.png")
    for i in (1, 2):
        images.write_image(root / f"test/Rain200L/input/{i}.png", _image(20 + i, 30, 30))
        images.write_image(root / f"test/Rain200L/target/{i}.png", _image(30 + i, 30, 30))
    return root


@pytest.fixture(scope="module")
def data_dir(manual_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tfds")
    args = ["--dataset", "Rain200L", "--manual-dir", str(manual_dir), "--data-dir", str(out)]
    assert prepare_cli.main(args) == 0
    return out


def config(manual_dir: Path, data_dir: Path, source: str) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict({"seed": 11, "global_batch_size": 4, "crop_size": 32})
    cfg.dataset = sources.default_dataset_config("Rain200L")
    cfg.dataset.update(root=str(manual_dir), source=source, tfds_data_dir=str(data_dir))
    return cfg


def test_prepares_array_record_shards_in_name_order(manual_dir, data_dir, capsys):
    folder = data_dir / "rain200l" / "1.0.0"
    assert list(folder.glob("rain200l-train.array_record-*"))
    assert list(folder.glob("rain200l-test.array_record-*"))
    source = rain_datasets.data_source("Rain200L", "train", data_dir)
    assert len(source) == 3
    pairs = sources.find_pairs(manual_dir, "Rain200L", "train")
    for i in range(3):
        example = source[i]
        assert example["name"].decode() == pairs.names[i]
        assert np.array_equal(example["input"], images.read_rgb8(pairs.input_path(i)))
        assert np.array_equal(example["target"], images.read_rgb8(pairs.target_path(i)))
    # A second run finds the prepared set and does nothing.
    assert prepare_cli.main(["--dataset", "Rain200L", "--manual-dir", str(manual_dir),
                               "--data-dir", str(data_dir)]) == 0
    assert "already prepared" in capsys.readouterr().out


def test_tfds_source_gives_the_folder_sources_batches(manual_dir, data_dir):
    runs = {}
    for source in ("folder", "tfds"):
        it = ip.create_train_iterator(config(manual_dir, data_dir, source), start_step=2)
        runs[source] = list(itertools.islice(it, 3))
        it.close()
    for a, b in zip(runs["folder"], runs["tfds"], strict=True):
        assert np.array_equal(a["input"], b["input"])
        assert np.array_equal(a["target"], b["target"])
    # The host split holds for the tfds source too.
    cfg = config(manual_dir, data_dir, "tfds")
    it = ip.create_train_iterator(cfg, start_step=2, process_index=1, process_count=2)
    assert np.array_equal(next(it)["input"], runs["folder"][0]["input"][2:])
    it.close()


def test_tfds_eval_set_matches_the_folder_eval_set(manual_dir, data_dir):
    ip.check_dataset(config(manual_dir, data_dir, "tfds"))
    folder = ip.load_eval_set(config(manual_dir, data_dir, "folder"))
    tfds_set = ip.load_eval_set(config(manual_dir, data_dir, "tfds"))
    assert [n for n, _, _ in tfds_set] == [n for n, _, _ in folder] == ["1.png", "2.png"]
    for (_, r1, c1), (_, r2, c2) in zip(folder, tfds_set, strict=True):
        assert np.array_equal(r1, r2) and np.array_equal(c1, c2)


def test_unprepared_set_says_how_to_prepare(tmp_path):
    with pytest.raises(sources.DatasetError, match="python -m drsformer_jax.rain_datasets"):
        rain_datasets.data_source("Rain200H", "train", tmp_path)


def test_bad_manual_layout_fails_before_writing(tmp_path):
    images.write_image(tmp_path / "manual/train/DID-Data/input/a.png", _image(0, 8, 8))
    images.write_image(tmp_path / "manual/train/DID-Data/target/b.png", _image(0, 8, 8))
    with pytest.raises(sources.DatasetError, match="do not pair"):
        rain_datasets.prepare("DID-Data", tmp_path / "manual", tmp_path / "out")
    assert not (tmp_path / "out" / "did_data").exists()


def test_every_release_set_has_a_builder():
    assert set(rain_datasets.BUILDERS) == set(sources.DATASETS) - {"synthetic"}
    assert rain_datasets.builder("SPA-Data").name == "spa_data"
    with pytest.raises(sources.DatasetError, match="no TFDS builder"):
        rain_datasets.builder("Rain100L")
