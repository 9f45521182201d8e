"""Parity with the official release, through its own checkpoint format.

tests/fixtures/parity.npz holds the release's float32 and float64 outputs for
small configurations with deterministic weights (tools/make_parity_fixture.py);
here the same weights are regenerated, written as a release `.pth`, converted
with the CLI, loaded with `drsformer_jax.load` and run.

Float64 (JAX's x64 mode on, in those tests only) is the clean check: 1e-9.
Float32 is checked to 1e-5 where the fixture records no near-tie in top-k
attention (every row's k-th and (k+1)-th scores further apart than
`parity.NEAR_TIE` of the row's range); near a tie a float32 selection may flip
and move the output far beyond rounding.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import drsformer_jax
from drsformer_jax import convert, parity
from drsformer_jax.checkpoints import conversion, names
from drsformer_jax.checkpoints.torch_format import save_pth
from drsformer_jax.model.convolution import FORMULATIONS
from drsformer_jax.testing import random_state_dict

VARIANTS = ["mefc", "no_mefc", "biasfree_bias"]
# Fixture cases whose release run has a top-k near-tie (none with the fixture's seed).
NEAR_TIES: frozenset[str] = frozenset()


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    with np.load(fixtures_dir / "parity.npz") as f:
        return {k: f[k] for k in f.files}


def release_state_dict(fixture, variant):
    shapes = [tuple(int(d) for d in s.split("x")) if s else ()
              for s in fixture[f"{variant}/shapes"]]
    names = [str(n) for n in fixture[f"{variant}/names"]]
    return random_state_dict(zip(names, shapes, strict=True), int(fixture["seed"]))


def release_output64(fixture, variant):
    return (fixture[f"{variant}/output"].astype(np.float64)
            + fixture[f"{variant}/output64_minus_output"].astype(np.float64))


def assert_float32_parity(fixture, variant, out):
    """<= 1e-5 from the release's float32 output, unless the fixture records a near-tie."""
    gap = float(fixture[f"{variant}/topk_gap"].min())
    near_tie = gap < parity.NEAR_TIE
    assert near_tie == (variant in NEAR_TIES), (
        f"{variant}: smallest relative top-k gap {gap:.3g}; NEAR_TIES must list exactly the "
        f"cases below {parity.NEAR_TIE:g}")
    if not near_tie:
        assert np.abs(out - fixture[f"{variant}/output"]).max() <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_float64_matches_release_float64(fixture, variant, tmp_path, x64):
    sd = release_state_dict(fixture, variant)
    pth = tmp_path / "release.pth"
    save_pth(pth, sd, wrap_key="params")
    model, variables = drsformer_jax.load(pth, dtype=jnp.float64, precision="highest")
    out = jax.jit(model.apply)(variables, jnp.asarray(fixture["input"], jnp.float64))
    assert out.dtype == jnp.float64
    ref = release_output64(fixture, variant)
    assert np.abs(np.asarray(out) - ref).max() <= 1e-9
    # The float32 run is further away: the check tells float64 from float32.
    assert np.abs(ref - fixture[f"{variant}/output"]).max() > 1e-7


def platform_model(fixture, platform, dtype):
    """The "mefc" fixture model in the formulation "auto" gives `platform`, at highest
    matmul precision (as the parity CLI runs), and its parameters."""
    from drsformer_jax.model.drsformer import from_config

    config, params = conversion.state_dict_to_flax(release_state_dict(fixture, "mefc"))
    model = from_config(config, dtype=dtype, matmul_precision="highest")
    return model.for_platform(platform), {"params": params}


@pytest.mark.parametrize("platform", sorted(FORMULATIONS))
def test_float64_each_platform_formulation(fixture, platform, x64):
    model, variables = platform_model(fixture, platform, jnp.float64)
    assert (model.conv_impl, model.layout, model.recompute) == FORMULATIONS[platform]
    out = jax.jit(model.apply)(variables, jnp.asarray(fixture["input"], jnp.float64))
    assert np.abs(np.asarray(out) - release_output64(fixture, "mefc")).max() <= 1e-9


def test_fixture_records_float64_and_gaps(fixture):
    for variant in VARIANTS:
        assert fixture[f"{variant}/output64_minus_output"].dtype == np.float32
        gaps = fixture[f"{variant}/topk_gap"]
        assert gaps.shape == (4,) and gaps.dtype == np.float64 and np.all(gaps > 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_convert_cli_then_forward_matches_release(fixture, variant, tmp_path):
    sd = release_state_dict(fixture, variant)
    pth = tmp_path / "release.pth"
    save_pth(pth, sd, wrap_key="params")
    out_dir = tmp_path / "converted"
    assert convert.main(["--torch-checkpoint", str(pth), "--output", str(out_dir)]) == 0

    model, variables = drsformer_jax.load(out_dir, precision="highest")
    assert model.config() == json.loads(str(fixture[f"{variant}/config"]))
    out = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(fixture["input"])))
    ref = fixture[f"{variant}/output"]
    assert out.shape == ref.shape and out.dtype == np.float32
    assert_float32_parity(fixture, variant, out)
    # The check has teeth: the output is far from the input.
    assert np.abs(ref - fixture["input"]).mean() > 0.1


@pytest.mark.parametrize("platform", sorted(FORMULATIONS))
def test_each_platform_formulation_matches_release(fixture, platform):
    model, variables = platform_model(fixture, platform, jnp.float32)
    out = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(fixture["input"])))
    assert_float32_parity(fixture, "mefc", out)


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


# --- python -m drsformer_jax.parity, as far as it runs without PyTorch -----------------

@pytest.mark.parametrize("argv", [
    [],  # --torch-checkpoint and --reference-repo are required
    ["--torch-checkpoint", "a.pth"],
    ["--torch-checkpoint", "a.pth", "--reference-repo", "r", "--size", "64by96"],
    ["--torch-checkpoint", "a.pth", "--reference-repo", "r", "--size", "0x8"],
    ["--torch-checkpoint", "a.pth", "--reference-repo", "r", "--size", "8x8", "--image", "i"],
    ["--torch-checkpoint", "a.pth", "--reference-repo", "r", "--seed", "one"],
])
def test_parity_cli_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parity.main(argv)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.fixture
def small_pth(fixture, tmp_path):
    pth = tmp_path / "release.pth"
    save_pth(pth, release_state_dict(fixture, "no_mefc"), wrap_key="params")
    return pth


def test_parity_cli_missing_checkpoint(tmp_path, capsys):
    assert parity.main(["--torch-checkpoint", str(tmp_path / "none.pth"),
                        "--reference-repo", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no such checkpoint" in err and "\n" not in err


def test_parity_cli_missing_reference_repo(small_pth, tmp_path, capsys):
    assert parity.main(["--torch-checkpoint", str(small_pth),
                        "--reference-repo", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip()
    # The checkpoint has no MEFC tensors: the release's no-MEFC file is the one wanted.
    assert "DRSformer_arch_200L+SPA.py: not found" in err and "cschenxiang/DRSformer" in err
    assert "\n" not in err


def test_parity_cli_missing_torch(small_pth, tmp_path, capsys, monkeypatch):
    repo = tmp_path / "DRSformer"
    archs = repo / "basicsr" / "models" / "archs"
    archs.mkdir(parents=True)
    (archs / "DRSformer_arch_200L+SPA.py").write_text("raise AssertionError('not run')\n")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert parity.main(["--torch-checkpoint", str(small_pth),
                        "--reference-repo", str(repo)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: PyTorch is not installed: the parity check runs the release's "
                   "PyTorch code (pip install torch)")
