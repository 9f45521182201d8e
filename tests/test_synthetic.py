"""The synthetic rain set: determinism, realistic degradation, folder output."""

import subprocess
import sys

import numpy as np
import pytest

from drsformer_jax.data import synthetic
from drsformer_jax.evaluation import metrics
from drsformer_jax.utils import images


def test_make_pair_is_deterministic_and_keyed_on_every_argument():
    rainy, clean = synthetic.make_pair(7, "train", 3, 64, 80, "heavy")
    again = synthetic.make_pair(7, "train", 3, 64, 80, "heavy")
    assert rainy.tobytes() == again[0].tobytes() and clean.tobytes() == again[1].tobytes()
    assert rainy.shape == clean.shape == (64, 80, 3)
    assert rainy.dtype == clean.dtype == np.uint8
    for other in [(8, "train", 3), (7, "test", 3), (7, "train", 4)]:
        assert not np.array_equal(synthetic.make_pair(*other, 64, 80, "heavy")[1], clean)


def test_light_and_heavy_share_backgrounds_like_rain200l_and_h():
    light_rainy, light_clean = synthetic.make_pair(0, "train", 5, 96, 96, "light")
    heavy_rainy, heavy_clean = synthetic.make_pair(0, "train", 5, 96, 96, "heavy")
    assert np.array_equal(light_clean, heavy_clean)
    assert not np.array_equal(light_rainy, heavy_rainy)


def test_input_psnr_is_in_the_range_of_rain200l_and_rain200h():
    # Y-channel PSNR as the benchmarks score it (Rain200L inputs ~ 27-30 dB, Rain200H ~ 14).
    def mean_psnr(regime):
        return np.mean([metrics.psnr(*synthetic.make_pair(0, "train", i, 128, 128, regime))
                        for i in range(24)])

    light, heavy = mean_psnr("light"), mean_psnr("heavy")
    assert 26.0 < light < 33.0, light
    assert 13.0 < heavy < 18.0, heavy


def test_light_rain_only_brightens_sparse_thin_streaks():
    rainy, clean = synthetic.make_pair(1, "train", 0, 128, 128, "light")
    assert np.all(rainy >= clean)  # screen blending never darkens
    changed = np.any(rainy.astype(int) - clean > 8, axis=2).mean()
    assert 0.005 < changed < 0.3, changed


def test_heavy_rain_covers_most_of_the_image_and_adds_haze():
    rainy, clean = synthetic.make_pair(1, "train", 0, 128, 128, "heavy")
    changed = np.any(np.abs(rainy.astype(int) - clean) > 8, axis=2).mean()
    assert changed > 0.5, changed
    assert rainy.mean() > clean.mean() + 20  # whitish streaks and haze


def test_clean_images_have_edges_textures_and_smooth_regions():
    clean = synthetic.make_clean_image(np.random.default_rng(3), 128, 128)
    gray = clean.astype(float).mean(axis=2)
    grad = np.hypot(np.diff(gray, axis=0)[:, :-1], np.diff(gray, axis=1)[:-1])
    assert (grad > 30).mean() > 0.01  # edges
    assert (grad < 6).mean() > 0.4  # smooth regions (film grain aside)
    assert len(np.unique(clean.reshape(-1, 3), axis=0)) > 2000  # gradients and detail


def test_unknown_regime_or_split_is_rejected():
    with pytest.raises(ValueError, match="regime"):
        synthetic.make_pair(0, "train", 0, 32, 32, "drizzle")
    with pytest.raises(ValueError, match="split"):
        synthetic.make_pair(0, "val", 0, 32, 32, "light")


def test_write_dataset_uses_the_release_layout(tmp_path):
    root = synthetic.write_dataset(tmp_path, "synthetic", 3, 2, (40, 48), "light", seed=5)
    for split, n in (("train", 3), ("test", 2)):
        for kind in ("input", "target"):
            names = sorted(p.name for p in (root / split / "synthetic" / kind).iterdir())
            assert names == [synthetic.example_name(i) for i in range(n)]
    rainy, clean = synthetic.make_pair(5, "test", 1, 40, 48, "light")
    assert np.array_equal(images.read_rgb8(root / "test/synthetic/input/00001.png"), rainy)
    assert np.array_equal(images.read_rgb8(root / "test/synthetic/target/00001.png"), clean)


def test_ensure_dataset_writes_once_per_parameter_set(tmp_path):
    first = synthetic.ensure_dataset(tmp_path, "synthetic", 2, 1, 32, "heavy", 0,
                                     progress=False)
    stamp = (first / "train/synthetic/input/00000.png").stat().st_mtime_ns
    assert synthetic.ensure_dataset(tmp_path, "synthetic", 2, 1, 32, "heavy", 0,
                                    progress=False) == first
    assert (first / "train/synthetic/input/00000.png").stat().st_mtime_ns == stamp
    other = synthetic.ensure_dataset(tmp_path, "synthetic", 2, 1, 32, "heavy", 1,
                                     progress=False)
    assert other != first and (other / "COMPLETE.json").exists()


def test_the_library_imports_without_tensorflow():
    """The TensorFlow boundary (package docstring): importing is not using tf.data."""
    modules = ["drsformer_jax.data.synthetic", "drsformer_jax.data.pipeline",
               "drsformer_jax.model", "drsformer_jax.checkpoints.loading",
               "drsformer_jax.inference", "drsformer_jax.evaluation.evaluator",
               "drsformer_jax.train", "drsformer_jax.derain", "drsformer_jax.score",
               "drsformer_jax.convert", "drsformer_jax.benchmark"]
    code = (f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
            "sys.exit('tensorflow' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
