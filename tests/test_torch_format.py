"""The .pth reader against hostile files: every tensor is checked against its storage before
it is viewed, and a damaged pickle is a TorchCheckpointError, never a crash, a hang or
memory that was not in the file. All hostile files are generated here."""

import io
import random
import struct
import zipfile

import numpy as np
import pytest

from drsformer_jax import convert
from drsformer_jax.checkpoints import torch_format
from drsformer_jax.checkpoints.torch_format import (
    TorchCheckpointError,
    _PickleWriter,
    load_pth,
    save_pth,
)

F32 = "FloatStorage"


def tensor_ops(w, storage, key, numel, offset, size, stride, storage_global=True):
    """The opcodes torch.save writes for one tensor, with any values at all."""
    w.global_("torch._utils", "_rebuild_tensor_v2")
    w.op(b"((")
    w.str_("storage")
    if storage_global:
        w.global_("torch", storage)
    else:
        w.str_(storage)  # not a storage type at all
    w.str_(key)
    w.str_("cpu")
    w.int_(numel)
    w.op(b"tQ")
    value(w, offset)
    value(w, size)
    value(w, stride)
    w.op(b"\x89")
    w.empty_ordered_dict()
    w.op(b"tR")


def value(w, v):
    """Pickles an int, float, str or tuple of them, whatever the values."""
    if isinstance(v, tuple):
        w.op(b"(")
        for x in v:
            value(w, x)
        w.op(b"t")
    elif isinstance(v, float):
        w.op(b"G" + struct.pack(">d", v))
    elif isinstance(v, str):
        w.str_(v)
    else:
        w.int_(v)


def write_pth(path, tensors, records, wrap="params"):
    """tensors: {name: dict(storage=, key=, numel=, offset=, size=, stride=)} (name None:
    the pickle is that one tensor); records: {key: bytes}."""
    w = _PickleWriter()
    w.op(b"\x80\x02")
    if None in tensors:
        tensor_ops(w, **tensors[None])
    else:
        if wrap:
            w.op(b"}")
            w.str_(wrap)
        w.empty_ordered_dict()
        w.op(b"(")
        for name, t in tensors.items():
            w.str_(name)
            tensor_ops(w, **t)
        w.op(b"u")
        if wrap:
            w.op(b"s")
    w.op(b".")
    write_archive(path, w.out.getvalue(), records)


def write_archive(path, pkl, records):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", b"little")
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", b"3\n")


def rewrite_pth(path, out, **replace):
    """A copy of the archive at `path` with members replaced (name suffix -> bytes) or, for
    None, left out."""
    with zipfile.ZipFile(path) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, data in members:
            suffix = name.split("/", 1)[1]
            if suffix in replace:
                if replace[suffix] is None:
                    continue
                data = replace[suffix]
            z.writestr(name, data)


def f32(n, start=0.0):
    return (np.arange(n, dtype=np.float32) + start).tobytes()


def one(size=(4, 6), stride=(6, 1), offset=0, numel=24, storage=F32, key="0", **kw):
    return {"w": dict(storage=storage, key=key, numel=numel, offset=offset, size=size,
                      stride=stride, **kw)}


def refused(tmp_path, tensors, records, match, name="x.pth", **kw):
    path = tmp_path / name
    write_pth(path, tensors, records, **kw)
    with pytest.raises(TorchCheckpointError) as e:
        load_pth(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    assert match in msg, msg
    return msg


def test_the_crafting_helper_writes_what_the_reader_reads(tmp_path):
    write_pth(tmp_path / "ok.pth", {
        **one(),
        "col": dict(storage=F32, key="0", numel=24, offset=2, size=(4,), stride=(6,)),
        "t": dict(storage=F32, key="0", numel=24, offset=0, size=(6, 4), stride=(1, 6)),
        "unsqueezed": dict(storage=F32, key="0", numel=24, offset=5, size=(1, 3),
                           stride=(2**62, 1)),  # a size-1 dimension's stride reaches nothing
        "expanded": dict(storage=F32, key="1", numel=3, offset=0, size=(4, 3), stride=(0, 1)),
    }, {"0": f32(24), "1": f32(3, 100)})
    sd = load_pth(tmp_path / "ok.pth")["params"]
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    np.testing.assert_array_equal(sd["w"], base)
    np.testing.assert_array_equal(sd["col"], base[:, 2])
    np.testing.assert_array_equal(sd["t"], base.T)
    np.testing.assert_array_equal(sd["unsqueezed"], [[5, 6, 7]])
    np.testing.assert_array_equal(sd["expanded"], np.tile([100, 101, 102], (4, 1)))
    assert all(v.flags.owndata and v.flags.writeable for v in sd.values())


@pytest.mark.parametrize("nbytes", [0, 4, 92])
def test_a_record_shorter_than_its_header_says(tmp_path, nbytes):
    msg = refused(tmp_path, one(), {"0": f32(24)[:nbytes]}, "truncated")
    assert "tensor params/w (storage record data/0)" in msg


def test_a_shape_that_needs_more_than_the_storage_holds(tmp_path):
    # Header and record agree (6 floats); the shape wants 24: the old reader copied
    # whatever memory followed.
    msg = refused(tmp_path, one(numel=6), {"0": f32(6)}, "reach element 23")
    assert "tensor params/w" in msg and "storage holds 6" in msg


@pytest.mark.parametrize("offset,size,stride,match", [
    (-1, (4, 6), (6, 1), "negative"),
    (0, (4, 6), (-6, 1), "negative"),
    (0, (4, -6), (6, 1), "negative"),
    (1, (4, 6), (6, 1), "reach element 24"),
    (2**62, (4, 6), (6, 1), "reach element"),
    (2**200, (1,), (1,), "reach element"),
    (0, (4, 6), (2**62, 1), "reach element"),
    (0, (2, 2), (2**63 + 5, 1), "reach element"),
    (0, (4, 6), (6, 2), "reach element"),
    (0, (2**32, 2**32), (0, 0), "more than int64 can count"),
    (0, (3, 2**61, 2**61), (0, 0, 0), "more than int64 can count"),
    (0, (2**31, 2**31), (0, 0), "expanded or repeated view"),  # in bounds, 16 EiB of copy
    (0, (4, 6), (6,), "malformed"),
    (0, 24, (1,), "malformed"),
    (0.5, (24,), (1,), "malformed"),
    (0, ("a",), (1,), "malformed"),
])
def test_offsets_sizes_and_strides_outside_the_storage(tmp_path, offset, size, stride, match):
    msg = refused(tmp_path, one(offset=offset, size=size, stride=stride), {"0": f32(24)},
                  match)
    assert "tensor params/w (storage record data/0)" in msg


def test_too_many_dimensions(tmp_path):
    refused(tmp_path, one(size=(1,) * 65, stride=(1,) * 65), {"0": f32(24)}, "malformed")


def test_zero_size_tensors_are_fine_wherever_they_point(tmp_path):
    write_pth(tmp_path / "z.pth", {
        "a": dict(storage=F32, key="0", numel=0, offset=0, size=(0, 5), stride=(5, 1)),
        "b": dict(storage=F32, key="1", numel=24, offset=10**6, size=(3, 0), stride=(7, 1)),
    }, {"0": b"", "1": f32(24)})
    sd = load_pth(tmp_path / "z.pth")["params"]
    assert sd["a"].shape == (0, 5) and sd["b"].shape == (3, 0)
    assert sd["a"].dtype == np.float32


@pytest.mark.parametrize("storage", ["ComplexFloatStorage", "QInt8Storage", "UInt16Storage"])
def test_a_storage_type_without_a_numpy_reader(tmp_path, storage):
    msg = refused(tmp_path, one(storage=storage), {"0": f32(48)},
                  f"storage type torch.{storage} is not supported")
    assert "tensor params/w" in msg


def test_a_storage_type_that_is_not_a_type(tmp_path):
    refused(tmp_path, one(storage=F32, storage_global=False), {"0": f32(24)},
            "is not a PyTorch storage type")


def test_a_record_that_is_not_whole_items(tmp_path):
    refused(tmp_path, one(numel=2, size=(2,), stride=(1,)), {"0": f32(3)[:10]},
            "not a multiple of the float32 item size (4)")
    refused(tmp_path, one(numel=2, size=(2,), stride=(1,), storage="DoubleStorage"),
            {"0": b"\0" * 20}, "not a multiple of the float64 item size (8)")


def test_a_missing_record_and_a_bad_storage_size(tmp_path):
    refused(tmp_path, one(), {"1": f32(24)}, "storage record is missing")
    refused(tmp_path, one(numel=-1), {"0": f32(24)}, "malformed storage size")


def test_a_tensor_outside_any_dict_is_named_by_its_storage(tmp_path):
    msg = refused(tmp_path, {None: one(numel=6)["w"]}, {"0": f32(6)}, "reach element")
    assert f"{tmp_path / 'x.pth'}: storage record data/0: " in msg


def test_a_longer_record_is_read_as_torch_does(tmp_path):
    write_pth(tmp_path / "x.pth", one(numel=24), {"0": f32(30)})
    np.testing.assert_array_equal(load_pth(tmp_path / "x.pth")["params"]["w"].ravel(),
                                  np.arange(24))


def test_bool_storages_are_booleans(tmp_path):
    write_pth(tmp_path / "b.pth", one(storage="BoolStorage", numel=3, size=(3,), stride=(1,)),
              {"0": b"\x00\x01\x07"})
    got = load_pth(tmp_path / "b.pth")["params"]["w"]
    assert got.dtype == np.bool_ and got.tolist() == [False, True, True]


def test_many_views_of_one_storage_cannot_take_unbounded_memory(tmp_path, monkeypatch):
    # Views may take twice their storages' bytes plus a slack (1 GiB; 0 here, to stay small):
    # a file cannot make the reader copy one storage a thousand times.
    monkeypatch.setattr(torch_format, "_SLACK_BYTES", 0)
    n = 256
    tensors = {f"v{i}": dict(storage=F32, key="0", numel=n, offset=0, size=(n,), stride=(1,))
               for i in range(3)}
    write_pth(tmp_path / "two.pth", dict(list(tensors.items())[:2]), {"0": bytes(4 * n)})
    assert len(load_pth(tmp_path / "two.pth")["params"]) == 2
    msg = refused(tmp_path, tensors, {"0": bytes(4 * n)}, "expanded or repeated view")
    assert "tensor params/v2" in msg


@pytest.mark.parametrize("pickle_bytes,match", [
    (b"\x80\x02}r\xff\xff\xff\x7f.", "memo index"),  # LONG_BINPUT: a 16 GiB memo
    (b"\x80\x02p99999999999\n.", "memo index"),
    (b"\x80\x02B\xff\xff\xff\x7f.", "corrupt"),  # BINBYTES beyond the end
    (b"\x80\x02" + b"]" * 5000 + b"a" * 4999 + b".", "nested more than"),
    (b"\x80\x02]q\x00h\x00a.", "holding themselves"),
    (b"\x80\x02\xff.", "corrupt"),
    (b"\x80\x02ctorch\nFloatStorage\n)R.", "corrupt"),  # calling a storage type
    (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)R}b.", "corrupt"),  # BUILD on a record
    (b"\x80\x02\x8f(ctorch._utils\n_rebuild_tensor_v2\n)R\x90.", "corrupt"),  # a set of them
    (b"\x80\x02K\x01Q.", "unsupported persistent id"),
    (b"\x80\x02(X\x07\x00\x00\x00storageK\x00K\x00K\x00K\x00tQ.", "not a record name"),
    (b"\x80\x02cos\nsystem\n.", "cannot be read without PyTorch"),
])
def test_hostile_pickles(tmp_path, pickle_bytes, match):
    write_archive(tmp_path / "p.pth", pickle_bytes, {})
    with pytest.raises(TorchCheckpointError, match=match) as e:
        load_pth(tmp_path / "p.pth")
    assert "\n" not in str(e.value)


def test_a_tensor_as_a_dict_key_is_refused(tmp_path):
    w = _PickleWriter()
    w.op(b"\x80\x02}")
    tensor_ops(w, **one()["w"])
    w.op(b"K\x01s.")
    write_archive(tmp_path / "k.pth", w.out.getvalue(), {"0": f32(24)})
    with pytest.raises(TorchCheckpointError, match="corrupt"):
        load_pth(tmp_path / "k.pth")


@pytest.fixture(scope="module")
def valid_pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "valid.pth"
    rng = np.random.default_rng(0)
    save_pth(path, {"a.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                    "a.bias": np.ones(4, np.float16), "n": np.arange(5, dtype=np.int64),
                    "s": np.float32(2.0) * np.ones(()), "z": np.zeros((0, 3), np.float32)})
    return path


def _load_or_refuse(data, tmp_path, i):
    path = tmp_path / f"case{i}.pth"
    path.write_bytes(data)
    try:
        loaded = load_pth(path)
    except TorchCheckpointError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return "refused"
    # Whatever loads is made of real values (every array owns memory copied from the file).
    stack = [loaded]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, np.ndarray):
            obj.tobytes()
    return "loaded"


def test_random_byte_flips_in_the_pickle(valid_pth, tmp_path):
    with zipfile.ZipFile(valid_pth) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    pkl_index = next(i for i, (n, _) in enumerate(members) if n.endswith("data.pkl"))
    pkl = members[pkl_index][1]
    rng = random.Random(1234)
    outcomes = {"refused": 0, "loaded": 0}
    for case in range(400):
        damaged = bytearray(pkl)
        for _ in range(rng.choice([1, 1, 2, 4])):
            pos = rng.randrange(len(damaged))
            damaged[pos] = rng.randrange(256) if rng.random() < 0.7 else damaged[pos] ^ (
                1 << rng.randrange(8))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for i, (name, data) in enumerate(members):
                z.writestr(name, bytes(damaged) if i == pkl_index else data)
        outcomes[_load_or_refuse(buf.getvalue(), tmp_path, case)] += 1
    assert outcomes["refused"] > 100  # the flips do damage; none of it crashed


def test_random_byte_flips_anywhere_in_the_file(valid_pth, tmp_path):
    raw = valid_pth.read_bytes()
    rng = random.Random(99)
    for case in range(150):
        damaged = bytearray(raw)
        for _ in range(rng.choice([1, 3, 8])):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        _load_or_refuse(bytes(damaged), tmp_path, case)


def test_truncated_files(valid_pth, tmp_path):
    raw = valid_pth.read_bytes()
    for case, n in enumerate(range(0, len(raw), max(1, len(raw) // 60))):
        _load_or_refuse(raw[:n], tmp_path, case)


def test_shortened_record_of_a_release_file_is_refused_by_convert(valid_pth, tmp_path,
                                                                   capsys):
    # save_pth numbers records in state-dict order: a.weight is data/0.
    out = tmp_path / "short.pth"
    rewrite_pth(valid_pth, out, **{"data/0": f32(10)})
    with pytest.raises(TorchCheckpointError, match=r"tensor params/a\.weight .*truncated"):
        load_pth(out)
    assert convert.main(["--torch-checkpoint", str(out), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {out}: tensor params/a.weight")
    assert not (tmp_path / "o").exists()


def test_huge_stride_is_an_error_line_not_a_segfault(tmp_path, capsys):
    path = tmp_path / "stride.pth"
    write_pth(path, {"output.weight": dict(storage=F32, key="0", numel=24, offset=0,
                                           size=(3, 8, 1, 1), stride=(2**60, 1, 1, 1))},
              {"0": f32(24)})
    assert convert.main(["--torch-checkpoint", str(path), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: tensor params/output.weight (storage record data/0)")
    assert "reach element" in err and err.count("\n") == 1


def test_big_endian_files_are_read_in_native_order(tmp_path):
    from ml_dtypes import bfloat16

    w = _PickleWriter()
    w.op(b"\x80\x02")
    w.empty_ordered_dict()
    w.op(b"(")
    w.str_("a")
    tensor_ops(w, F32, "0", 3, 0, (3,), (1,))
    w.str_("b")
    tensor_ops(w, "BFloat16Storage", "1", 2, 0, (2,), (1,))
    w.op(b"u.")
    bf16 = np.array([1.5, -2], np.float32).astype(bfloat16).view(np.uint16).astype(">u2")
    with zipfile.ZipFile(tmp_path / "be.pth", "w") as z:
        z.writestr("be/data.pkl", w.out.getvalue())
        z.writestr("be/byteorder", b"big")
        z.writestr("be/data/0", np.arange(3, dtype=">f4").tobytes())
        z.writestr("be/data/1", bf16.tobytes())
    sd = load_pth(tmp_path / "be.pth")
    assert sd["a"].dtype.isnative and sd["a"].tolist() == [0, 1, 2]
    assert sd["b"].dtype.name == "bfloat16" and sd["b"].astype(np.float32).tolist() == [1.5, -2]
