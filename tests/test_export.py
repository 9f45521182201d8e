"""Export for serving: StableHLO and SavedModel outputs equal the in-process model."""

import functools
import subprocess
import sys

import jax
import numpy as np
import pytest

import drsformer_jax
from drsformer_jax import derain, export
from drsformer_jax.checkpoints.weights_dir import save_weights_dir
from drsformer_jax.inference import pad_to_multiple
from drsformer_jax.model import DRSformer, init_params
from drsformer_jax.utils.images import read_image, write_image

TINY = dict(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 1, 1), use_mefc=True)


@pytest.fixture(scope="module")
def exported_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    model = DRSformer(**TINY)
    save_weights_dir(base / "ckpt", model.config(), init_params(model, 3))
    assert export.main(["--checkpoint", str(base / "ckpt"), "--output", str(base / "out"),
                        "--platforms", "cpu,cuda"]) == 0
    return base


@functools.cache  # one jitted model for the module's tests: each size compiles once
def _loaded(ckpt):
    model, variables = drsformer_jax.load(ckpt)
    return jax.jit(model.apply), variables


def _reference(ckpt, images):
    """The in-process model on the release's test.py procedure."""
    apply, variables = _loaded(ckpt)
    h, w = images.shape[1:3]
    return np.clip(np.asarray(apply(variables, pad_to_multiple(images))), 0, 1)[:, :h, :w]


def test_export_dir_holds_program_loader_saved_model_and_readme(exported_dir):
    out = exported_dir / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.txt", "drsformer_exported.py", "model.stablehlo", "saved_model"]
    readme = (out / "README.txt").read_text()
    assert "serving_default" in readme and "python -m drsformer_jax.export" in readme
    assert export.main(["--checkpoint", str(exported_dir / "ckpt"),
                        "--output", str(out)]) == 1  # exists: refused without --overwrite


def test_stablehlo_matches_at_two_sizes_from_one_export(exported_dir):
    derain_fn = drsformer_jax.load_exported(exported_dir / "out")
    rng = np.random.default_rng(0)
    for shape in [(1, 16, 24, 3), (2, 21, 13, 3)]:  # the second is padded to 24x16
        x = rng.uniform(size=shape).astype(np.float32)
        assert np.abs(derain_fn(x) - _reference(exported_dir / "ckpt", x)).max() <= 1e-5


def test_loader_runs_with_jax_alone(exported_dir):
    """The copied loader imports neither Flax nor the package."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import numpy as np; "
            "from drsformer_exported import load_exported; "
            "y = load_exported(sys.argv[1])(np.full((9, 10, 3), 0.5, np.float32)); "
            "assert y.shape == (9, 10, 3); "
            "sys.exit(any(m.split('.')[0] in ('flax', 'drsformer_jax') for m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(exported_dir / "out")],
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]


def test_saved_model_matches_and_derains_uint8_as_derain(exported_dir, tmp_path):
    from drsformer_jax.utils.lazy_tf import import_tf

    tf = import_tf()
    loaded = tf.saved_model.load(str(exported_dir / "out" / "saved_model"))
    rng = np.random.default_rng(1)
    for shape in [(1, 16, 24, 3), (1, 24, 40, 3)]:
        x = rng.uniform(size=shape).astype(np.float32)
        y = loaded.signatures["derain_float"](images=tf.constant(x))["derained"].numpy()
        assert np.abs(y - _reference(exported_dir / "ckpt", x)).max() <= 1e-5
    odd = rng.integers(0, 256, (13, 19, 3), dtype=np.uint8)
    write_image(tmp_path / "in" / "odd.png", odd)
    assert derain.main(["--checkpoint", str(exported_dir / "ckpt"), "--input",
                        str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                        "--cache-dir", "none"]) == 0
    want = read_image(tmp_path / "out" / "odd.png").astype(int)
    got = loaded.signatures["serving_default"](images=tf.constant(odd[None]))["derained"]
    assert got.dtype == tf.uint8 and got.shape == (1, 13, 19, 3)
    assert np.abs(got.numpy()[0].astype(int) - want).max() <= 1
