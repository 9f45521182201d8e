"""Self-ensemble (8 flips / rotations) and tile blending: exact inverses, weights, seams."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drsformer_jax import inference, tile_seams
from drsformer_jax.inference import ensemble, tiling
from drsformer_jax.utils.images import write_image

RNG = np.random.default_rng(3)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 8, 16, 3), (3, 24, 8, 1)])
def test_inverse_transforms_are_exact_and_all_eight_differ(shape):
    x = jnp.asarray(RNG.random(shape, dtype=np.float32))
    versions = []
    for k in range(ensemble.ENSEMBLE_SIZE):
        y = ensemble.dihedral(x, k)
        # 90-degree turns swap H and W; the others keep them.
        assert y.shape[1:3] == ((shape[2], shape[1]) if k % 2 else shape[1:3])
        assert np.array_equal(np.asarray(ensemble.inverse_dihedral(y, k)), np.asarray(x))
        versions.append(np.asarray(y).ravel())
    # Eight distinct orientations of a generic image (a repeated one would halve a weight).
    assert len({v.tobytes() for v in versions}) == ensemble.ENSEMBLE_SIZE


def test_orientations_match_numpy():
    x = RNG.random((1, 8, 16, 3), dtype=np.float32)
    for k in range(8):
        want = np.rot90(x, k % 4, axes=(1, 2))
        want = want[:, :, ::-1] if k >= 4 else want
        np.testing.assert_array_equal(np.asarray(ensemble.dihedral(jnp.asarray(x), k)), want)
    with pytest.raises(ValueError, match="0..7"):
        ensemble.dihedral(jnp.asarray(x), 8)


@pytest.mark.parametrize("hw", [(16, 16), (8, 24)])
def test_equivariant_model_gives_the_plain_output(hw):
    """A per-pixel model commutes with every flip and rotation: the ensemble changes nothing."""
    def forward(variables, x):
        return variables["scale"] * x * x + 0.1
    variables = {"scale": jnp.float32(1.7)}
    x = jnp.asarray(RNG.random((2, *hw, 3), dtype=np.float32))
    plain = np.asarray(forward(variables, x))
    got = np.asarray(jax.jit(ensemble.self_ensemble(forward))(variables, x))
    np.testing.assert_allclose(got, plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("hw", [(16, 16), (8, 24)])
def test_non_equivariant_model_is_averaged_over_the_eight(hw):
    """A model that adds a left-to-right ramp: the ensemble is the mean of the eight
    turned-back outputs (NumPy reference), so the ramp cancels out; one model call per
    shape (one for a square, two for H != W)."""
    calls = []

    def forward(variables, x):
        calls.append(x.shape)
        ramp = jnp.linspace(0.0, 1.0, x.shape[2])[None, None, :, None]
        return x + variables * ramp
    x = RNG.random((2, *hw, 3), dtype=np.float32)
    got = np.asarray(jax.jit(ensemble.self_ensemble(forward))(jnp.float32(0.5), jnp.asarray(x)))
    want = np.zeros_like(x, np.float64)
    for k in range(8):
        t = np.rot90(x, k % 4, axes=(1, 2))
        t = t[:, :, ::-1] if k >= 4 else t
        out = t + 0.5 * np.linspace(0.0, 1.0, t.shape[2])[None, None, :, None]
        out = out[:, :, ::-1] if k >= 4 else out
        want += np.rot90(out, -(k % 4), axes=(1, 2))
    np.testing.assert_allclose(got, want / 8, rtol=0, atol=1e-6)
    assert np.abs(got - x - 0.25).max() < 1e-6  # ramps in all four directions: 0.5 / 2
    h, w = hw
    assert sorted(calls) == ([(16, h, w, 3)] if h == w else sorted([(8, h, w, 3), (8, w, h, 3)]))


# --- tile blending ---------------------------------------------------------------------------


@pytest.mark.parametrize("blend", tiling.TILE_BLENDS)
@pytest.mark.parametrize("size,tile,overlap", [
    (200, 64, 16), (64, 64, 16), (72, 64, 16), (40, 16, 24), (100, 32, 0), (48, 16, 8)])
def test_blend_weights_sum_to_one_everywhere(blend, size, tile, overlap):
    origins, weights = tiling.blend_weights(size, tile, overlap, blend)
    assert origins == tiling.tile_positions(size, tile, overlap)
    total = np.zeros(size)
    for o, w in zip(origins, weights, strict=True):
        total[o:o + tile] += w
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-12)
    assert (weights > 0).all()


def test_cosine_ramps_only_over_the_overlap():
    origins, weights = tiling.blend_weights(112, 64, 16, "cosine")  # tiles at 0, 48
    assert origins == [0, 48]
    assert np.all(weights[0][:48] == 1.0) and np.all(weights[1][16:] == 1.0)
    ramp = weights[1][:16]
    assert np.all(np.diff(ramp) > 0) and ramp[0] < 0.01 and ramp[-1] > 0.99
    _, box = tiling.blend_weights(112, 64, 16, "box")
    assert np.all(box[1][:16] == 0.5)
    with pytest.raises(ValueError, match="unknown tile blend"):
        tiling.blend_weights(112, 64, 16, "gauss")


def _disagreeing_tiles():
    """A model whose tiles disagree by a constant each: identity plus the call's offset."""
    offsets = iter(0.04 * np.sin(1.7 * np.arange(1, 1000)))

    def forward(tiles):
        return np.stack([t + next(offsets) for t in tiles])
    return forward


def test_cosine_leaves_a_smaller_seam_step_than_box():
    img = RNG.random((100, 130, 3), dtype=np.float32) * 0.5 + 0.25
    box = tiling.restore_tiled(_disagreeing_tiles(), img, 32, 8, 3, blend="box")
    cosine = tiling.restore_tiled(_disagreeing_tiles(), img, 32, 8, 3, blend="cosine")
    # The identity model's whole-image output is the image itself.
    box_step, cosine_step = (tiling.seam_step(r, img, 32, 8) for r in (box, cosine))
    assert box_step > 0.01  # box: a jump of the two tiles' offset difference at each border
    assert cosine_step < box_step / 10
    # Both are averages of the same tiles: equal where one tile covers a pixel alone.
    assert np.allclose(box[:24, :24], cosine[:24, :24], atol=1e-6)


def test_cosine_with_agreeing_tiles_is_the_whole_image():
    img = RNG.random((50, 70, 3), dtype=np.float32)
    got = tiling.restore_tiled(lambda t: t * 0.9 + 0.05, img, 16, 8, 4, blend="cosine")
    np.testing.assert_allclose(got, img * 0.9 + 0.05, rtol=0, atol=1e-6)
    assert tiling.seam_step(got, img * 0.9 + 0.05, 16, 8) < 1e-6


def test_tile_borders():
    assert tiling.tile_positions(112, 64, 16) == [0, 48]
    assert tiling.tile_borders(112, 64, 16) == [48, 64]
    assert tiling.tile_borders(64, 64, 16) == []


# --- through the Restorer ----------------------------------------------------------------------


class RampModel:
    """Stands in for DRSformer: adds a left-to-right ramp, so orientation matters."""

    dim = 8

    def for_platform(self, platform):
        return self

    def apply(self, variables, x):
        return x + variables["k"] * jnp.linspace(0.0, 1.0, x.shape[2])[None, None, :, None]


def test_restorer_ensemble_averages_the_eight_orientations():
    img = RNG.random((9, 20, 3), dtype=np.float32) * 0.5  # pads to 16 x 24: not square
    variables = {"k": jnp.float32(0.4)}
    plain, ens = (inference.Restorer(RampModel(), variables, ensemble=e, memory_limit=2 ** 50)
                  for e in (False, True))
    [got] = ens.restore([img], ens.plan(9, 20))
    [base] = plain.restore([img], plain.plan(9, 20))
    x = inference.pad_to_multiple(img)[None]
    want = np.zeros_like(x, np.float64)
    for k in range(8):
        t = np.rot90(x, k % 4, axes=(1, 2))
        t = t[:, :, ::-1] if k >= 4 else t
        out = t + 0.4 * np.linspace(0.0, 1.0, t.shape[2])[None, None, :, None]
        out = out[:, :, ::-1] if k >= 4 else out
        want += np.rot90(out, -(k % 4), axes=(1, 2))
    np.testing.assert_allclose(got, np.clip(want[0, :9, :20] / 8, 0, 1), rtol=0, atol=1e-6)
    assert np.abs(got - base).max() > 0.1  # the plain pass keeps its ramp


def test_ensemble_needs_eight_times_the_memory():
    one_pass = inference.estimate_memory(8, 64, 64, 1, "cpu")
    plans = [inference.Restorer(RampModel(), {"k": 0.0}, ensemble=e,
                                memory_limit=2 * one_pass).plan(64, 64) for e in (False, True)]
    assert plans[0].tile is None and plans[1].tile is not None
    with pytest.raises(ValueError, match="unknown tile blend"):
        inference.Restorer(RampModel(), {"k": 0.0}, tile_blend="gauss")


def test_tile_seams_cli(tmp_path, capsys):
    """A tiled result with a 30-level step at its tile border (tile 16, overlap 8 on 16 x 24:
    tiles at columns 0 and 8, borders 8 and 16) is reported; the whole result against itself
    has no step."""
    whole = (RNG.random((16, 24, 3)) * 100 + 50).astype(np.uint8)
    tiled = whole.copy()
    tiled[:, 16:] += 30
    for name, img in (("whole", whole), ("tiled", tiled)):
        write_image(tmp_path / name / "a.png", img)
    assert tile_seams.main(["--tiled", str(tmp_path / "tiled"), "--whole", str(tmp_path / "whole"),
                            "--tile", "16", "--tile-overlap", "8"]) == 0
    out = capsys.readouterr().out
    assert "largest seam step 30.000 (max 30.000) gray levels; other lines 0.000" in out
    assert tile_seams.main(["--tiled", str(tmp_path / "whole"), "--whole", str(tmp_path / "whole"),
                            "--tile", "16", "--tile-overlap", "8"]) == 0
    assert "PSNR inf dB, largest seam step 0.000" in capsys.readouterr().out
    assert tile_seams.main(["--tiled", str(tmp_path / "none"), "--whole", str(tmp_path / "whole"),
                            "--tile", "16"]) == 1
