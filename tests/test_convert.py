"""Name mapping against the official tensor tables, the converter's errors, the .pth reader."""

import json
import re

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


# --- non-finite weights are refused, by convert and by every kind of checkpoint ----------

def _sd_with(small_sd, bad_names, value=np.nan):
    sd = {k: v.copy() for k, v in small_sd.items()}
    for name in bad_names:
        sd[name].flat[0] = value
    return sd


def test_a_nan_weight_is_refused_by_convert_and_load(small_sd, tmp_path, capsys):
    import drsformer_jax
    from drsformer_jax.checkpoints.weights_dir import CheckpointError

    pth = tmp_path / "model.pth"
    save_pth(pth, _sd_with(small_sd, ["output.weight"]))
    out = tmp_path / "out"
    assert convert.main(["--torch-checkpoint", str(pth), "--output", str(out)]) == 1
    assert capsys.readouterr().err == (
        f"error: {pth}: 1 tensor is not finite (NaN or inf): output.weight\n")
    assert not out.exists()
    with pytest.raises(CheckpointError, match=r"1 tensor is not finite .*: output\.weight$"):
        drsformer_jax.load(pth)


def test_many_non_finite_weights_are_counted(small_sd, tmp_path, capsys):
    names = [n for n in small_sd if n.endswith(".weight")][:7]
    pth = tmp_path / "inf.pth"
    save_pth(pth, _sd_with(small_sd, names, np.inf))
    assert convert.main(["--torch-checkpoint", str(pth), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {pth}: 7 tensors are not finite (NaN or inf): ")
    assert err.rstrip().endswith("and 2 more") and err.count("\n") == 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model's config and params, and a weights directory of them."""
    from drsformer_jax.checkpoints.weights_dir import save_weights_dir
    from drsformer_jax.model.drsformer import DRSformer, init_params

    model = DRSformer(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 1, 1), use_mefc=False)
    params = init_params(model, 0)
    weights = tmp_path_factory.mktemp("tiny") / "weights"
    save_weights_dir(weights, model.config(), params)
    return model.config(), params, weights


def _poisoned(params):
    flat = traverse_util.flatten_dict(params)
    flat = {k: np.asarray(v).copy() for k, v in flat.items()}
    flat[("output", "kernel")].flat[3] = np.nan
    flat[("latent_0", "attn", "temperature")].flat[0] = -np.inf
    return traverse_util.unflatten_dict(flat)


def test_non_finite_weights_in_a_weights_dir_and_a_training_checkpoint(tiny, tmp_path, capsys):
    from drsformer_jax.checkpoints import training
    from drsformer_jax.checkpoints.loading import load_params
    from drsformer_jax.checkpoints.weights_dir import CheckpointError, save_weights_dir

    config, params, _ = tiny
    bad = _poisoned(params)
    weights = tmp_path / "weights"
    save_weights_dir(weights, config, bad)
    want = "2 tensors are not finite (NaN or inf): latent_0/attn/temperature, output/kernel"
    with pytest.raises(CheckpointError, match=f"^{re.escape(f'{weights}: {want}')}$"):
        load_params(weights)
    out = tmp_path / "back.pth"
    assert convert.main(["--to-torch", "--checkpoint", str(weights), "--output", str(out)]) == 1
    assert capsys.readouterr().err == f"error: {weights}: {want}\n"
    assert not out.exists()

    workdir = tmp_path / "work"
    manager = training.open_manager(workdir, async_save=False)
    training.save(manager, 3, {"step": 3, "params": bad}, {}, config)
    manager.wait_until_finished()
    manager.close()
    for path in (workdir, workdir / "checkpoints" / "3"):
        with pytest.raises(CheckpointError, match=f": {re.escape(want)}$"):
            load_params(path)


# --- what convert sees ---------------------------------------------------------------

def test_a_data_parallel_state_dict_is_read_with_a_note(small_sd, tmp_path, capsys):
    pth = tmp_path / "ddp.pth"
    save_pth(pth, {f"module.{k}": v for k, v in small_sd.items()})
    out = tmp_path / "out"
    assert convert.main(["--torch-checkpoint", str(pth), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"note: {pth}: every tensor name starts with 'module.'")
    assert err.count("\n") == 1
    from drsformer_jax.checkpoints.loading import load_params

    _, params = load_params(out)
    _, want = state_dict_to_flax(small_sd)
    got, want = traverse_util.flatten_dict(params), traverse_util.flatten_dict(want)
    assert set(got) == set(want)
    assert all(np.array_equal(np.asarray(got[k]), want[k]) for k in want)


def test_a_partly_prefixed_state_dict_is_not_stripped(small_sd, tmp_path, capsys):
    sd = {(f"module.{k}" if i % 2 else k): v for i, (k, v) in enumerate(small_sd.items())}
    save_pth(tmp_path / "half.pth", sd)
    assert convert.main(["--torch-checkpoint", str(tmp_path / "half.pth"),
                         "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'half.pth'}: cannot infer the architecture")
    assert err.count("\n") == 1 and f"of the {len(sd)} names start with 'module.'" in err


def test_another_architecture_says_so(tmp_path, capsys):
    pth = tmp_path / "resnet.pth"
    save_pth(pth, {f"layer{i}.conv.weight": np.zeros((2, 2, 3, 3), np.float32)
                   for i in range(8)}, wrap_key=None)
    assert convert.main(["--torch-checkpoint", str(pth), "--output", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err == (
        f"error: {pth}: no DRSformer tensors; first names: layer0.conv.weight, "
        "layer1.conv.weight, layer2.conv.weight, layer3.conv.weight, layer4.conv.weight, "
        "and 3 more\n")


def test_a_directory_as_torch_checkpoint(tmp_path, capsys):
    assert convert.main(["--torch-checkpoint", str(tmp_path), "--output",
                         str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}: is a directory; --torch-checkpoint takes a "
                          "release .pth file")
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv,match", [
    (["--checkpoint", "x", "--output", "o"], "--checkpoint applies only with --to-torch"),
    (["--to-torch", "--torch-checkpoint", "a.pth", "--checkpoint", "x", "--output", "o.pth"],
     "--torch-checkpoint does not apply with --to-torch"),
    (["--to-torch", "--output", "o.pth"], "--to-torch needs --checkpoint"),
    (["--output", "o"], "give --torch-checkpoint FILE"),
    (["--torch-checkpoint", "a.pth"], "--output"),
    (["--torch-checkpoint", "a.pth", "--output", "o", "--tile", "8"], "unrecognized"),
])
def test_flags_that_do_not_apply_are_refused(argv, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        convert.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error:" in line][0].endswith(
        err.splitlines()[-1]) and match in err.splitlines()[-1]
    assert not list(tmp_path.iterdir())  # nothing read, nothing written


# --- --to-torch (and forward) refusals: one error line, before anything is read -------------

@pytest.fixture()
def no_reading(monkeypatch):
    """Fails the test if a checkpoint is read: the cheap checks must come first."""
    def boom(*args, **kwargs):
        raise AssertionError("read a checkpoint before checking the paths")

    monkeypatch.setattr(convert, "load_params", boom)


def _one_error(capsys, start):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {start}"), err
    return err


def test_to_torch_refusals(tiny, tmp_path, capsys, no_reading):
    _, _, weights = tiny
    missing = tmp_path / "nope"
    cases = [
        ([str(missing), str(tmp_path / "a.pth")], f"{missing}: no such checkpoint"),
        ([str(weights / "params"), str(tmp_path / "a.pth")],
         f"{weights / 'params'}: is the params/ folder of the weights directory {weights}; "
         f"give {weights} itself"),
        ([str(weights), str(tmp_path)], f"--output {tmp_path}: is a folder; --to-torch writes "
                                       f"a .pth file (e.g. {tmp_path / 'model.pth'})"),
    ]
    pth = tmp_path / "release.pth"
    save_pth(pth, {"w": np.zeros(2, np.float32)})
    cases.append(([str(pth), str(tmp_path / "b.pth")], f"{pth}: is a file; --to-torch reads a "
                                                       "Flax checkpoint"))
    existing = tmp_path / "old.pth"
    existing.write_bytes(b"old")
    cases.append(([str(weights), str(existing)], f"--output {existing}: exists; pass "
                                                "--overwrite"))
    (tmp_path / "afile").write_text("")
    cases.append(([str(weights), str(tmp_path / "afile" / "x.pth")],
                  f"--output {tmp_path / 'afile' / 'x.pth'}: cannot write in "))
    for (checkpoint, output), start in cases:
        assert convert.main(["--to-torch", "--checkpoint", checkpoint, "--output", output]) == 1
        _one_error(capsys, start)
    assert existing.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "old.pth", "release.pth"]


def test_to_flax_refusals(small_sd, tmp_path, capsys, no_reading):
    pth = tmp_path / "a.pth"
    save_pth(pth, small_sd)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("")
    cases = [
        (tmp_path / "missing.pth", tmp_path / "o", f"{tmp_path / 'missing.pth'}: no such file"),
        (pth, a_file, f"--output {a_file}: is a file; convert writes a weights directory "
                      "(a folder)"),
        (pth, full, f"--output {full}: exists and is not empty; pass --overwrite"),
        (pth, a_file / "o", f"--output {a_file / 'o'}: cannot write in {a_file} "),
    ]
    for source, output, start in cases:
        assert convert.main(["--torch-checkpoint", str(source), "--output", str(output)]) == 1
        _one_error(capsys, start)
    assert convert.main(["--torch-checkpoint", str(pth), "--output", str(a_file),
                         "--overwrite"]) == 1  # a file is not replaced by a folder
    _one_error(capsys, f"--output {a_file}: is a file")
    assert a_file.read_text() == "x" and (full / "keep").exists()


def _read_only(folder, monkeypatch, err):
    """Makes `folder` read-only; as root, where chmod does not stop writes, makes creating a
    file there fail with `err` instead."""
    import errno
    import os
    import tempfile

    folder.chmod(0o555)
    probe = folder / ".probe"
    try:
        probe.write_text("")
    except PermissionError:
        return
    probe.unlink()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.realpath(dir) == os.path.realpath(folder):
            raise OSError(err, os.strerror(err))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert err in (errno.EACCES, errno.EROFS)


@pytest.mark.parametrize("direction", ["to-flax", "to-torch"])
@pytest.mark.parametrize("errno_name", ["EACCES", "EROFS"])
def test_a_read_only_output_folder(direction, errno_name, small_sd, tiny, tmp_path,
                                   monkeypatch, capsys, no_reading):
    import errno
    import os

    code = getattr(errno, errno_name)
    folder = tmp_path / "ro"
    folder.mkdir()
    pth = tmp_path / "a.pth"
    save_pth(pth, small_sd)
    if direction == "to-flax":
        argv = ["--torch-checkpoint", str(pth), "--output", str(folder / "weights")]
        out = folder / "weights"
    else:
        argv = ["--to-torch", "--checkpoint", str(tiny[2]), "--output", str(folder / "m.pth")]
        out = folder / "m.pth"
    _read_only(folder, monkeypatch, code)
    try:
        assert convert.main(argv) == 1
        err = _one_error(capsys, f"--output {out}: cannot write in {folder} (")
        if os.geteuid() == 0:
            assert os.strerror(code) in err
    finally:
        folder.chmod(0o755)
    assert not list(folder.iterdir())


@pytest.mark.parametrize("direction", ["to-flax", "to-torch"])
def test_a_write_failing_midway_is_reported_and_cleaned_up(direction, small_sd, tiny, tmp_path,
                                                            monkeypatch, capsys):
    """The disk fills (or the file system turns read-only) after the checks: the real error
    is the one reported, and no temporary file is left."""
    import errno
    import os

    from drsformer_jax.checkpoints import torch_format, weights_dir

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    folder = tmp_path / "out"
    folder.mkdir()
    if direction == "to-flax":
        pth = tmp_path / "a.pth"
        save_pth(pth, small_sd)
        monkeypatch.setattr(weights_dir.ocp, "StandardCheckpointer", fail)
        argv = ["--torch-checkpoint", str(pth), "--output", str(folder / "weights")]
        out = folder / "weights"
    else:
        monkeypatch.setattr(torch_format, "_write_aligned", fail)
        argv = ["--to-torch", "--checkpoint", str(tiny[2]), "--output", str(folder / "m.pth")]
        out = folder / "m.pth"
    assert convert.main(argv) == 1
    _one_error(capsys, f"--output {out}: cannot write (No space left on device)")
    assert not list(folder.iterdir())
