"""The tf.data input pipeline: determinism in (seed, step), host split, aligned
crops and dihedral transforms, padding, the evaluation set and layout errors."""

import itertools
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from drsformer_jax.data import pipeline as ip
from drsformer_jax.data import sources
from drsformer_jax.utils import images

CROP = 32
# Train images of the coordinate set: (height, width); the last is smaller than
# the crop in height, so it is padded.
SIZES = [(40, 48), (48, 40), (56, 56), (33, 64), (64, 33), (20, 44)]


def coordinate_image(index: int, height: int, width: int) -> np.ndarray:
    """R = row, G = column, B = 30 * index: every pixel says where it came from."""
    y, x = np.mgrid[:height, :width]
    return np.stack([y, x, np.full_like(y, 30 * index)], axis=-1).astype(np.uint8)


def write_pairs(root: Path, name: str, split: str, pairs: dict[str, tuple]) -> None:
    for file_name, (rainy, clean) in pairs.items():
        images.write_image(root / split / name / "input" / file_name, rainy)
        images.write_image(root / split / name / "target" / file_name, clean)


@pytest.fixture(scope="module")
def coord_root(tmp_path_factory) -> Path:
    """A folder set whose target is 255 - input pixel by pixel."""
    root = tmp_path_factory.mktemp("coord")
    train = {}
    for i, (h, w) in enumerate(SIZES):
        img = coordinate_image(i, h, w)
        train[f"{i}.png"] = (img, 255 - img)
    write_pairs(root, "Rain200H", "train", train)
    test = {f"{n}.png": (coordinate_image(n, 24, 16), coordinate_image(n + 1, 24, 16))
            for n in (10, 2, 1)}
    write_pairs(root, "Rain200H", "test", test)
    return root


def make_config(root: Path, batch: int = 6, seed: int = 0, **dataset) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict({"seed": seed, "global_batch_size": batch,
                                     "crop_size": CROP})
    cfg.dataset = sources.default_dataset_config("Rain200H")
    cfg.dataset.root = str(root)
    cfg.dataset.update(dataset)
    return cfg


def take(cfg, start_step: int, n: int, **kw) -> list[dict]:
    it = ip.create_train_iterator(cfg, start_step=start_step, **kw)
    out = list(itertools.islice(it, n))
    it.close()
    return out


def as_uint8(x: np.ndarray) -> np.ndarray:
    """Back to the file's pixels; checks the batch is exactly images.to_float of them."""
    out = np.rint(x * 255.0).astype(np.uint8)
    assert np.array_equal(images.to_float(out), x)
    return out


def test_batches_have_the_promised_shape_dtype_and_range(coord_root):
    (batch,) = take(make_config(coord_root), 0, 1)
    assert set(batch) == {"input", "target"}
    for x in batch.values():
        assert x.shape == (6, CROP, CROP, 3) and x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0


def test_same_seed_and_step_give_the_same_batch(coord_root):
    a = take(make_config(coord_root), 0, 3)
    b = take(make_config(coord_root), 0, 3)
    c = take(make_config(coord_root, seed=1), 0, 3)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x["input"], y["input"])
        assert np.array_equal(x["target"], y["target"])
    assert not all(np.array_equal(x["input"], z["input"]) for x, z in zip(a, c, strict=True))
    assert not np.array_equal(a[0]["input"], a[1]["input"])


def test_resumed_iterator_sees_the_uninterrupted_runs_batches(coord_root):
    cfg = make_config(coord_root)
    full = take(cfg, 0, 5)
    resumed = take(cfg, 3, 2)
    for x, y in zip(full[3:], resumed, strict=True):
        assert np.array_equal(x["input"], y["input"])
        assert np.array_equal(x["target"], y["target"])


@pytest.mark.parametrize("hosts", [2, 4])
def test_host_shares_concatenate_to_the_global_batch(coord_root, hosts):
    cfg = make_config(coord_root, batch=8)
    single = take(cfg, 1, 2)
    shares = [take(cfg, 1, 2, process_index=p, process_count=hosts) for p in range(hosts)]
    for step in range(2):
        for key in ("input", "target"):
            assert shares[0][step][key].shape[0] == 8 // hosts
            joined = np.concatenate([s[step][key] for s in shares])
            assert np.array_equal(joined, single[step][key])


def test_batch_must_divide_among_hosts(coord_root):
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        ip.create_train_iterator(make_config(coord_root, batch=6), start_step=0,
                                 process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        ip.create_train_iterator(make_config(coord_root), start_step=0, process_index=2,
                                 process_count=2)


def undo(x: np.ndarray, k: int) -> np.ndarray:
    y = x[:, ::-1] if k >= 4 else x
    return np.rot90(y, -(k % 4), axes=(0, 1))


def locate(crop: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Every (example, k, top, left) with crop == dihedral(padded[window], k)."""
    found = []
    for k in range(8):
        u = undo(crop, k)
        index = int(u[0, 0, 2]) // 30
        if index >= len(SIZES):
            continue
        h, w = SIZES[index]
        img = coordinate_image(index, h, w)
        img = np.pad(img, ((0, max(CROP - h, 0)), (0, max(CROP - w, 0)), (0, 0)), "symmetric")
        top, left = int(u[0, 0, 0]), int(u[0, 0, 1])
        if top + CROP <= img.shape[0] and left + CROP <= img.shape[1] and np.array_equal(
                img[top:top + CROP, left:left + CROP], u):
            found.append((index, k, top, left))
    return found


def test_crops_are_aligned_exact_dihedral_images_of_all_8_kinds(coord_root):
    batches = take(make_config(coord_root), 0, 16)  # 96 examples, 16 epochs of 6
    kinds, positions = set(), set()
    for batch in batches:
        for rainy, clean in zip(as_uint8(batch["input"]), as_uint8(batch["target"]),
                                strict=True):
            assert np.array_equal(clean, 255 - rainy)  # target went through the same crop
            (where,) = locate(rainy)  # exactly one transform explains the crop
            kinds.add(where[1])
            positions.add(where)
    assert kinds == set(range(8))
    assert len(positions) > 80  # crops move around


def test_each_epoch_visits_every_example_once(coord_root):
    batches = take(make_config(coord_root, batch=3), 0, 4)  # 2 epochs of 6 examples
    seen = [locate(x)[0][0] for b in batches for x in as_uint8(b["input"])]
    assert sorted(seen[:6]) == sorted(seen[6:]) == list(range(6))
    assert seen[:6] != seen[6:]  # a new permutation each epoch


def test_small_images_are_mirror_padded_like_the_release(coord_root):
    sampler = ip.TrainSampler(seed=0, global_batch_size=1, num_examples=1, crop_size=CROP)
    img = coordinate_image(5, 20, 44)
    rainy, clean = sampler.crop_and_transform(0, 0, img, 255 - img)
    assert rainy.shape == (CROP, CROP, 3) and np.array_equal(clean, 255 - rainy)
    (where,) = locate(rainy)
    rows = undo(rainy, where[1])[:, 0, 0]
    assert list(rows) == list(range(20)) + list(range(19, 7, -1))  # edge pixel repeated


def test_dihedral_gives_the_8_distinct_transforms():
    x = np.arange(2 * 3 * 1).reshape(2, 3, 1)
    outs = [ip.dihedral(x, k) for k in range(8)]
    assert len({(o.shape, o.tobytes()) for o in outs}) == 8
    expected = [np.rot90(x, k) for k in range(4)] + [np.fliplr(np.rot90(x, k)) for k in range(4)]
    for out, exp in zip(outs, expected, strict=True):
        assert np.array_equal(out, exp)


def test_sampler_permutes_each_epoch_and_depends_on_the_seed():
    s = ip.TrainSampler(seed=4, global_batch_size=3, num_examples=7, crop_size=8)
    n = [s.example_index(step, row) for step in range(7) for row in range(3)]  # 3 epochs
    assert all(sorted(n[e * 7:(e + 1) * 7]) == list(range(7)) for e in range(3))
    other = ip.TrainSampler(seed=5, global_batch_size=3, num_examples=7, crop_size=8)
    assert n != [other.example_index(st, r) for st in range(7) for r in range(3)]


def test_eval_set_is_whole_images_in_natural_name_order(coord_root):
    cfg = make_config(coord_root)
    evalset = ip.load_eval_set(cfg)
    assert [name for name, _, _ in evalset] == ["1.png", "2.png", "10.png"]
    for name, rainy, clean in evalset:
        n = int(name.split(".")[0])
        assert rainy.dtype == clean.dtype == np.uint8
        assert np.array_equal(rainy, coordinate_image(n, 24, 16))
        assert np.array_equal(clean, coordinate_image(n + 1, 24, 16))
    cfg.dataset.eval_max_images = 2
    assert [name for name, _, _ in ip.load_eval_set(cfg)] == ["1.png", "2.png"]


def layout(root: Path, inputs: list[str], targets: list[str]) -> Path:
    img = coordinate_image(0, 8, 8)
    for kind, names in (("input", inputs), ("target", targets)):
        (root / "train/Rain200L" / kind).mkdir(parents=True, exist_ok=True)
        for name in names:
            images.write_image(root / "train/Rain200L" / kind / name, img)
    write_pairs(root, "Rain200L", "test", {"1.png": (img, img)})
    return root


def check(root: Path) -> str:
    cfg = make_config(root)
    cfg.dataset.name = "Rain200L"
    with pytest.raises(sources.DatasetError) as info:
        ip.check_dataset(cfg)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_missing_folder_is_a_clear_error(tmp_path):
    msg = check(layout(tmp_path, ["1.png"], []).parent / "nowhere")
    assert "train/Rain200L/input does not exist" in msg
    assert "train/Rain200L/target does not exist" in msg and "data/README.md" in msg


def test_empty_folder_is_a_clear_error(tmp_path):
    msg = check(layout(tmp_path, [], ["1.png"]))
    assert "Rain200L/input has no image files" in msg
    assert "target has no image files" not in msg and "does not exist" not in msg


def test_unpaired_names_are_listed_with_counts(tmp_path):
    inputs = ["1.png", "2.png"] + [f"in{i}.png" for i in range(7)]
    msg = check(layout(tmp_path, inputs, ["1.png", "2.jpg", "only_target.png"]))
    assert "7 of 9 images" in msg and "have no target" in msg
    assert "in0.png, in1.png, in2.png, in3.png, in4.png, and 2 more" in msg
    assert "1 of 3 images" in msg and "only_target.png" in msg
    assert "2.png" not in msg.replace("in2.png", "")  # 2.png pairs with 2.jpg by stem


def test_pairs_of_different_sizes_are_a_clear_error(tmp_path):
    layout(tmp_path, ["1.png"], [])
    images.write_image(tmp_path / "train/Rain200L/target/1.png", coordinate_image(0, 9, 8))
    msg = check(tmp_path)
    assert "8x8" in msg and "8x9" in msg and "one size" in msg


def test_unreadable_image_fails_the_iterator_with_its_name(tmp_path):
    layout(tmp_path, ["1.png", "2.png"], ["1.png", "2.png"])
    (tmp_path / "train/Rain200L/input/2.png").write_bytes(b"not a png")
    cfg = make_config(tmp_path, batch=2)
    cfg.dataset.name = "Rain200L"
    cfg.crop_size = 8
    it = ip.create_train_iterator(cfg, start_step=0)
    with pytest.raises(sources.DatasetError, match="2.png"):
        next(it)


def test_synthetic_source_is_generated_once_and_read_as_folders(tmp_path):
    cfg = ml_collections.ConfigDict({"seed": 0, "global_batch_size": 4, "crop_size": CROP})
    cfg.dataset = sources.default_dataset_config("synthetic")
    cfg.dataset.root = str(tmp_path)
    cfg.dataset.synthetic.update(num_train=5, num_test=2, height=40, width=48)
    ip.check_dataset(cfg)
    (folder,) = (tmp_path / "synthetic").iterdir()
    assert (folder / "COMPLETE.json").exists()
    (batch,) = take(cfg, 0, 1)
    assert batch["input"].shape == (4, CROP, CROP, 3)
    assert not np.array_equal(batch["input"], batch["target"])
    evalset = ip.load_eval_set(cfg)
    assert [n for n, _, _ in evalset] == ["00000.png", "00001.png"]
    from drsformer_jax.data import synthetic

    rainy, clean = synthetic.make_pair(0, "test", 1, 40, 48, "heavy")
    assert np.array_equal(evalset[1][1], rainy) and np.array_equal(evalset[1][2], clean)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data set"):
        sources.default_dataset_config("Rain100X")
    cfg = make_config(tmp_path, source="synthetic")
    with pytest.raises(sources.DatasetError, match="source 'synthetic' makes the data set"):
        ip.check_dataset(cfg)
    cfg = make_config(tmp_path, name="synthetic", source="tfds")
    with pytest.raises(sources.DatasetError, match="no TFDS builder"):
        ip.check_dataset(cfg)
    cfg = make_config(tmp_path, source="s3")
    with pytest.raises(sources.DatasetError, match="unknown data source"):
        ip.check_dataset(cfg)


def test_interpreter_exits_with_an_iterator_left_open(coord_root):
    # tf.data with Python map functions in flight used to hang at shutdown.
    code = (
        "import sys, ml_collections\n"
        "from drsformer_jax.data import pipeline as ip, sources\n"
        "cfg = ml_collections.ConfigDict({'seed': 0, 'global_batch_size': 6, 'crop_size': 32})\n"
        "cfg.dataset = sources.default_dataset_config('Rain200H')\n"
        "cfg.dataset.root = sys.argv[1]\n"
        "it = ip.create_train_iterator(cfg, start_step=0)\n"
        "batch = next(it)  # a batch alive at exit is what made it hang\n"
        "print(batch['input'].shape)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(coord_root)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(6, 32, 32, 3)" in done.stdout
