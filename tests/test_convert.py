"""Name mapping against the official tensor tables, the converter's errors, the .pth reader."""

import json

import numpy as np
import pytest
from flax import traverse_util

from drsformer_jax import convert
from drsformer_jax.checkpoints.conversion import ConversionError, infer_config, state_dict_to_flax
from drsformer_jax.checkpoints.names import (
    flax_to_torch,
    to_flax_array,
    torch_sort_key,
    torch_to_flax,
)
from drsformer_jax.checkpoints.torch_format import TorchCheckpointError, load_pth, save_pth
from drsformer_jax.testing import random_state_dict


def read_table(path):
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()
            if line and not line.startswith("#")]
    assert rows[0] == ["key", "shape"]
    return [(k, tuple(int(d) for d in s.split("x"))) for k, s in rows[1:]]


@pytest.fixture(scope="module", params=["mefc", "no-mefc"])
def official(request, fixtures_dir):
    return request.param, read_table(fixtures_dir / f"official-state-dict-{request.param}.tsv")


def expected_flax_shapes(config):
    import jax
    import jax.numpy as jnp

    from drsformer_jax.model.drsformer import from_config

    model = from_config(config)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes["params"]).items()}


def test_default_model_maps_one_to_one_onto_official_table(official):
    variant, table = official
    assert len(table) == (924 if variant == "mefc" else 730)
    config = {"use_mefc": variant == "mefc"}
    flax_shapes = expected_flax_shapes(config)
    mapped = {}
    for name, shape in table:
        path = torch_to_flax(name)
        assert path is not None, name
        assert path not in mapped, f"{name} and {mapped.get(path)} map to the same parameter"
        mapped[path] = name
        assert flax_to_torch(path) == name
        assert to_flax_array(np.zeros(shape, np.int8)).shape == flax_shapes[path], name
    assert set(mapped) == set(flax_shapes)


def test_release_order_is_reproduced(official):
    _, table = official
    names = [n for n, _ in table]
    assert sorted(names, key=torch_sort_key) == names


def test_infer_config_of_official_tables(official):
    variant, table = official
    sd = {name: np.zeros(shape, np.int8) for name, shape in table}
    assert infer_config(sd) == {
        "inp_channels": 3, "out_channels": 3, "dim": 48, "num_blocks": [4, 6, 6, 8],
        "heads": [1, 2, 4, 8], "ffn_expansion_factor": 2.66, "bias": False,
        "layernorm_type": "WithBias", "use_mefc": variant == "mefc"}


@pytest.fixture(scope="module")
def small_sd(fixtures_dir):
    with np.load(fixtures_dir / "parity.npz") as f:
        names = [str(n) for n in f["no_mefc/names"]]
        shapes = [tuple(int(d) for d in s.split("x")) for s in f["no_mefc/shapes"]]
    return random_state_dict(zip(names, shapes, strict=True), 1)


def test_missing_unexpected_and_misshaped_are_all_listed(small_sd, tmp_path):
    sd = dict(small_sd)
    del sd["latent.1.attn.qkv.weight"]
    sd["latent.1.attn.extra.weight"] = np.zeros((3, 3), np.float32)
    sd["encoder_level2.0.ffn.project_in.weight"] = np.zeros((5, 32, 1, 1), np.float32)
    save_pth(tmp_path / "bad.pth", sd)
    with pytest.raises(ConversionError) as e:
        state_dict_to_flax(sd, source="bad.pth")
    msg = str(e.value)
    assert "missing tensors (1)" in msg and "latent.1.attn.qkv.weight" in msg
    assert "unexpected tensors (1)" in msg and "latent.1.attn.extra.weight" in msg
    assert "wrong shape (1)" in msg and "encoder_level2.0.ffn.project_in.weight" in msg

    out = tmp_path / "out"
    assert convert.main(["--torch-checkpoint", str(tmp_path / "bad.pth"),
                         "--output", str(out)]) == 1
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("content,expected", [
    (b"hello, I am not a checkpoint\n", "not a PyTorch checkpoint"),
    (b"\x80\x02}q\x00.", "legacy"),
])
def test_files_that_are_not_checkpoints(tmp_path, content, expected, capsys):
    bad = tmp_path / "x.pth"
    bad.write_bytes(content)
    with pytest.raises(TorchCheckpointError, match=expected):
        load_pth(bad)
    out = tmp_path / "out"
    assert convert.main(["--torch-checkpoint", str(bad), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(bad) in err and "Traceback" not in err
    assert not out.exists()


def test_a_pickle_with_code_is_refused(tmp_path):
    import pickle
    import zipfile

    payload = pickle.dumps({"params": {"w": print}}, protocol=2)  # a global we never load
    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as z:
        z.writestr("evil/data.pkl", payload)
    with pytest.raises(TorchCheckpointError, match="cannot be read without PyTorch"):
        load_pth(tmp_path / "evil.pth")


def test_reader_on_a_real_torch_save_file(fixtures_dir):
    sd = load_pth(fixtures_dir / "torch_tensors.pth")["params"]
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    np.testing.assert_array_equal(sd["f32"], base)
    np.testing.assert_array_equal(sd["f64"], np.arange(5) / 4)
    assert sd["f16"].dtype == np.float16 and (sd["f16"] == np.arange(6) - 2).all()
    assert sd["bf16"].dtype.name == "bfloat16"
    np.testing.assert_array_equal(sd["bf16"].astype(np.float32), np.arange(4) * 0.5)
    assert sd["i64"].dtype == np.int64 and (sd["i64"] == np.arange(-3, 3)).all()
    assert sd["scalar"].shape == () and sd["scalar"] == 2.5
    np.testing.assert_array_equal(sd["view"], base[:, 2])
    np.testing.assert_array_equal(sd["transposed"], base.T)
    assert sd["conv"].shape == (2, 1, 3, 3)


def test_writer_round_trips_and_is_complete(tmp_path):
    sd = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float32(1.5) * np.ones(()),
          "h": np.ones((2, 2), np.float16)}
    save_pth(tmp_path / "x.pth", sd, wrap_key=None)
    back = load_pth(tmp_path / "x.pth")
    assert list(back) == ["a", "s", "h"]
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    assert not list(tmp_path.glob(".*tmp"))


def test_converter_refuses_to_overwrite(small_sd, tmp_path):
    save_pth(tmp_path / "a.pth", small_sd)
    out = tmp_path / "out"
    args = ["--torch-checkpoint", str(tmp_path / "a.pth"), "--output", str(out)]
    assert convert.main(args) == 0
    info = json.loads((out / "config.json").read_text())
    assert info["model"]["use_mefc"] is False and info["converted_from"] == "a.pth"
    assert convert.main(args) == 1
    assert convert.main(args + ["--overwrite"]) == 0


def test_bare_state_dict_is_accepted(small_sd, tmp_path):
    save_pth(tmp_path / "bare.pth", small_sd, wrap_key=None)
    assert convert.main(["--torch-checkpoint", str(tmp_path / "bare.pth"),
                         "--output", str(tmp_path / "o")]) == 0
