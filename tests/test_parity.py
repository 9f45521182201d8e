"""Parity with the official release, through its own checkpoint format.

tests/fixtures/parity.npz holds the release's outputs for small configurations
with deterministic weights (tools/make_parity_fixture.py); here the same weights
are regenerated, written as a release `.pth`, converted with the CLI, loaded
with `drsformer_jax.load` and run.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import drsformer_jax
from drsformer_jax import convert
from drsformer_jax.checkpoints import conversion, names
from drsformer_jax.checkpoints.torch_format import save_pth
from drsformer_jax.testing import random_state_dict

VARIANTS = ["mefc", "no_mefc", "biasfree_bias"]


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    with np.load(fixtures_dir / "parity.npz") as f:
        return {k: f[k] for k in f.files}


def release_state_dict(fixture, variant):
    shapes = [tuple(int(d) for d in s.split("x")) if s else ()
              for s in fixture[f"{variant}/shapes"]]
    names = [str(n) for n in fixture[f"{variant}/names"]]
    return random_state_dict(zip(names, shapes, strict=True), int(fixture["seed"]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_convert_cli_then_forward_matches_release(fixture, variant, tmp_path):
    sd = release_state_dict(fixture, variant)
    pth = tmp_path / "release.pth"
    save_pth(pth, sd, wrap_key="params")
    out_dir = tmp_path / "converted"
    assert convert.main(["--torch-checkpoint", str(pth), "--output", str(out_dir)]) == 0

    model, variables = drsformer_jax.load(out_dir)
    assert model.config() == json.loads(str(fixture[f"{variant}/config"]))
    out = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(fixture["input"])))
    ref = fixture[f"{variant}/output"]
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-5
    # The check has teeth: the output is far from the input.
    assert np.abs(ref - fixture["input"]).mean() > 0.1


@pytest.mark.parametrize("impl", ["xla", "shift"])
def test_both_conv_formulations_match_release(fixture, impl):
    sd = release_state_dict(fixture, "mefc")
    config, params = conversion.state_dict_to_flax(sd)
    from drsformer_jax.model.drsformer import from_config

    model = from_config(config, conv_impl=impl)
    out = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(fixture["input"])))
    assert np.abs(out - fixture["mefc/output"]).max() <= 1e-5


def test_fixture_names_are_in_release_order(fixture):
    for variant in VARIANTS:
        listed = [str(n) for n in fixture[f"{variant}/names"]]
        assert sorted(listed, key=names.torch_sort_key) == listed


def test_round_trip_torch_flax_torch_is_bit_identical(fixture, tmp_path):
    from drsformer_jax.checkpoints.torch_format import load_pth

    sd = release_state_dict(fixture, "mefc")
    save_pth(tmp_path / "a.pth", sd)
    assert convert.main(["--torch-checkpoint", str(tmp_path / "a.pth"),
                         "--output", str(tmp_path / "flax")]) == 0
    assert convert.main(["--to-torch", "--checkpoint", str(tmp_path / "flax"),
                         "--output", str(tmp_path / "b.pth")]) == 0
    back = load_pth(tmp_path / "b.pth")
    assert list(back) == ["params"]
    assert list(back["params"]) == list(sd)  # same names, same (release) order
    for name, value in sd.items():
        got = back["params"][name]
        assert got.dtype == value.dtype and got.shape == value.shape, name
        assert got.tobytes() == value.tobytes(), name
