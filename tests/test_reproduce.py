"""reproduce: the paper's figures in the code, weights and data found per set, end to end."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from drsformer_jax import inference, reproduce
from drsformer_jax.data import synthetic
from drsformer_jax.evaluation.scores import SCORE_FILE
from drsformer_jax.utils.images import from_float, read_rgb8, to_float, write_image

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT.parent / "shared" / "seed" / "drsformer-cvpr2023.md"
TINY = dict(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 1, 1), use_mefc=False)
SETS = r"Rain200L|Rain200H|DID-Data|DDN-Data|SPA-Data"


def parse_paper_tables(text: str) -> tuple[dict, dict]:
    """Table 1's DRSformer row by set, and Table 2's Rainy Input and Ours columns."""
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("Datasets") and "SPA-Data" in line)
    sets = re.findall(SETS, header)
    row = next(line for line in lines if line.strip().startswith("DRSformer\t"))
    numbers = [float(v) for v in re.findall(r"\d+\.\d+", row)]
    assert len(sets) == 5 and len(numbers) == 10, (sets, numbers)
    table1 = {s: {"psnr": numbers[2 * i], "ssim": numbers[2 * i + 1]}
              for i, s in enumerate(sets)}
    methods = next(line for line in lines if line.startswith("Methods\t")).split("\t")[1:]
    figures = next(line for line in lines if line.startswith("NIQE"))
    pairs = re.findall(r"(\d+\.\d+)\s*/\s*(\d+\.\d+)", figures)
    by_method = {m.strip(): (float(a), float(b))
                 for m, (a, b) in zip(methods, pairs, strict=False)}
    table2 = {key: dict(zip(("niqe", "brisque"), by_method[column], strict=True))
              for key, column in (("input", "Rainy Input"), ("DRSformer", "Ours"))}
    return table1, table2


def test_paper_figures_equal_the_seed_tables(fixtures_dir):
    sources = [fixtures_dir / "paper_tables.md"] + ([SEED] if SEED.exists() else [])
    for source in sources:
        table1, table2 = parse_paper_tables(source.read_text())
        assert table1 == reproduce.PAPER_TABLE1, source
        assert table2 == reproduce.PAPER_TABLE2, source
    assert list(reproduce.PAPER_TABLE1) == list(reproduce.TABLE1_SETS)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_weights_are_matched_by_set_name(tmp_path):
    w = tmp_path / "weights"
    for name in ("Rain200H.pth", "DRSformer_DID-Data.pth", "rain200l.pth", "Rain200L_old.pth",
                 "ddn_a.pth", "ddn_b.pth", "notes.txt"):
        _touch(w / name)
    (w / "spa_export").mkdir()
    find = reproduce.find_weights
    assert find(w, "Rain200H") == (w / "Rain200H.pth", None)
    assert find(w, "DID-Data") == (w / "DRSformer_DID-Data.pth", None)
    assert find(w, "SPA-Data") == (w / "spa_export", None)
    assert find(w, "Rain200L") == (w / "rain200l.pth", None)  # the exact name wins
    with pytest.raises(reproduce.SetSkippedError, match="several checkpoints.*ddn_a.pth"):
        find(w, "DDN-Data")
    path, note = find(w, "Real")  # no real-rain weights: the Rain200H model, with a note
    assert path == w / "Rain200H.pth" and "Rain200H" in note
    (tmp_path / "empty").mkdir()
    with pytest.raises(reproduce.SetSkippedError, match="no weights .* for Rain200H"):
        find(tmp_path / "empty", "Rain200H")
    # A folder with test.py's default name alone: that checkpoint for every set, with a note.
    sole = _touch(tmp_path / "sole" / "deraining.pth")
    assert find(sole.parent, "SPA-Data") == (sole, f"the only checkpoint in {sole.parent}, "
                                                   "deraining.pth, is used")
    # A sole checkpoint named for another set is not used for this one.
    _touch(tmp_path / "other" / "Rain200L.pth")
    with pytest.raises(reproduce.SetSkippedError, match="no weights"):
        find(tmp_path / "other", "Rain200H")
    # One checkpoint for every set: a file, or a weights directory.
    assert find(w / "Rain200H.pth", "DDN-Data") == (w / "Rain200H.pth", None)
    _touch(w / "spa_export" / "config.json")
    assert find(w / "spa_export", "Rain200L") == (w / "spa_export", None)


@pytest.mark.parametrize("layout", ["Datasets/test", "data/test", "test"])
def test_test_sets_are_found_in_either_layout(tmp_path, layout):
    base = tmp_path / layout
    for kind in ("input", "target"):
        _touch(base / "Rain200H" / kind / "1.png")
    _touch(base / "Real" / "input" / "a.png")
    for data in (tmp_path, base):  # the folder above the layout, or its test/ folder
        pairs, note = reproduce.find_test_set(data, "Rain200H")
        assert pairs.input_dir == base / "Rain200H" / "input" and len(pairs) == 1 and not note
        real, _ = reproduce.find_test_set(data, "Real")
        assert real.target_dir is None and real.names == ("a.png",)
        assert reproduce.find_test_set(data, "SPA-Data") is None
    _touch(base / "DID-Data" / "input" / "1.png")  # no target/: unusable, named
    with pytest.raises(reproduce.SetSkippedError, match="target"):
        reproduce.find_test_set(tmp_path, "DID-Data")
    # The release's sample set has an input without its target: the others are scored.
    for name in ("1.png", "2.png", "10.png", "3.jpg"):
        _touch(base / "DDN-Data" / "input" / name)
    for name in ("1.png", "3.png", "10.png", "4.png"):
        _touch(base / "DDN-Data" / "target" / name)
    pairs, note = reproduce.find_test_set(tmp_path, "DDN-Data")
    assert pairs.names == ("1.png", "3.jpg", "10.png")
    assert pairs.target_names == ("1.png", "3.png", "10.png")
    assert note == "2 file(s) without a partner left out: 2.png, target/4.png"


def test_report_differences():
    results = [reproduce.SetResult("Rain200H", "matlab", "w.pth", 2, [],
                                   {"psnr": 30.0, "ssim": 0.9}, 1.0),
               reproduce.SetResult("Real", "niqe,brisque", "w.pth", 3, [],
                                   {"niqe": 4.0, "brisque": 20.0, "input_niqe": 6.0,
                                    "input_brisque": 30.0}, 1.0)]
    md = reproduce.report_markdown(results, {"SPA-Data": "no weights"}, "test")
    assert "| Rain200H | matlab | 2 | 30.00 | 32.17 | -2.17 | 0.9000 | 0.9326 | -0.0326 |" in md
    assert "| rainy inputs | 3 | 6.000 | 5.829 | +0.171 | 30.000 | 33.129 | -3.129 |" in md
    assert "| derained | 3 | 4.000 | 4.095 | -0.095 | 20.000 | 22.730 | -2.730 |" in md
    assert "SPA-Data: not run: no weights" in md
    doc = reproduce.report_document(results, {}, {})
    assert doc["sets"]["Real"]["difference"]["input_niqe"] == pytest.approx(6.0 - 5.829)
    assert doc["sets"]["Rain200H"]["difference"] == pytest.approx({"psnr": -2.17,
                                                                   "ssim": 0.9 - 0.9326})


def test_bad_set_name_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--weights", "w", "--data", "d", "--sets", "Rain200X"])
    assert e.value.code == 2 and "unknown set Rain200X" in capsys.readouterr().err


# --- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def release_like(tmp_path_factory):
    """Two synthetic test sets named like the paper's (same images in both) in the release's
    layout, a third one without weights, and random-weight .pth files in the release's format
    (a tiny architecture, different weights per set)."""
    from drsformer_jax.checkpoints.conversion import write_torch_checkpoint
    from drsformer_jax.model.drsformer import DRSformer, init_params

    base = tmp_path_factory.mktemp("reproduce")
    for name in ("Rain200H", "DID-Data", "Rain200L"):
        synthetic.write_dataset(base / "Datasets", name, 0, 2, (16, 24), "heavy", seed=5)
    # As in the release's sample set, one input has no target: the other one is scored.
    (base / "Datasets" / "test" / "DID-Data" / "target" / "00000.png").unlink()
    model = DRSformer(**TINY)
    weights = base / "weights"
    weights.mkdir()
    write_torch_checkpoint(init_params(model, 1), weights / "Rain200H.pth")
    write_torch_checkpoint(init_params(model, 2), weights / "DRSformer_DID-Data.pth")
    return base, weights


@pytest.fixture(scope="module")
def run(release_like, tmp_path_factory):
    base, weights = release_like
    out = base / "report"
    cache = tmp_path_factory.getbasetemp() / "jax_cache"  # the session's shared cache
    code = reproduce.main(["--weights", str(weights), "--data", str(base), "--sets",
                           "Rain200H,DID-Data,Rain200L,SPA-Data", "--output", str(out),
                           "--cache-dir", str(cache)])
    inference.enable_compilation_cache(None)
    return code, out


def test_end_to_end_scores_each_set_with_its_protocol(run):
    code, out = run
    assert code == 1  # two sets could not run
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["sets"]) == ["DID-Data", "Rain200H"]
    for name, protocol, scored in (("Rain200H", "matlab", ["00000.png", "00001.png"]),
                                   ("DID-Data", "rcdnet", ["00001.png"])):
        entry = report["sets"][name]
        score = json.loads((out / name / SCORE_FILE).read_text())
        assert score["protocol"] == entry["protocol"] == protocol
        assert sorted(score["images"]) == scored
        assert entry["mean"] == score["mean"] and entry["images"] == len(scored)
        assert entry["difference"]["psnr"] == pytest.approx(
            score["mean"]["psnr"] - reproduce.PAPER_TABLE1[name]["psnr"])
        assert read_rgb8(out / name / "00001.png").shape == (16, 24, 3)
    assert set(report["skipped"]) == {"Rain200L", "SPA-Data"}
    assert "no weights" in report["skipped"]["Rain200L"]
    assert "no test data" in report["skipped"]["SPA-Data"]
    md = (out / "report.md").read_text()
    assert re.search(r"\| Rain200H \| matlab \| 2 \| \d+\.\d\d \| 32\.17 \| [-+]\d+\.\d\d \|", md)
    assert "| DID-Data | rcdnet | 1 |" in md
    assert "- DID-Data: 1 file(s) without a partner left out: 00000.png" in md
    assert report["sets"]["DID-Data"]["note"].endswith("00000.png")


def test_each_set_used_its_own_weights(run, release_like, tmp_path_factory):
    """Both sets hold the same images: the PNGs differ only because the weights do, and
    each equals that checkpoint's own restoration."""
    _, out = run
    base, weights = release_like
    a, b = (read_rgb8(out / name / "00001.png") for name in ("Rain200H", "DID-Data"))
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0
    cache = tmp_path_factory.getbasetemp() / "jax_cache"  # the run's program: no compile
    restorer = inference.make_restorer(weights / "DRSformer_DID-Data.pth", cache_dir=cache)
    rainy = read_rgb8(base / "Datasets" / "test" / "DID-Data" / "input" / "00001.png")
    [restored] = restorer.restore([to_float(rainy)], restorer.plan(16, 24))
    inference.enable_compilation_cache(None)
    np.testing.assert_array_equal(from_float(restored), b)


def test_end_to_end_prints_the_table_and_the_missing_sets(run, capsys):
    # The run fixture printed before this test's capture began: check the written report.
    _, out = run
    md = (out / "report.md").read_text()
    assert md.startswith("# DRSformer: the paper's tables reproduced (the release's procedure)")
    assert "Rain200L: not run: no weights" in md and "SPA-Data: not run: no test data" in md


class _SoftenModel:
    """Stands in for DRSformer (no compile): a fixed per-pixel map."""

    dim = 8

    def for_platform(self, platform):
        return self

    def apply(self, variables, x):
        return x * 0.8 + 0.1


def test_real_rain_set_scores_inputs_and_outputs(tmp_path):
    """Table 2's row: NIQE / BRISQUE of the inputs and of the outputs, no targets."""
    for i in range(2):
        rainy, _ = synthetic.make_pair(7, "test", i, 96, 104, "heavy")
        write_image(tmp_path / "test" / "Real" / "input" / f"{i}.png", rainy)
    pairs, note = reproduce.find_test_set(tmp_path, "Real")
    restorer = inference.Restorer(_SoftenModel(), {}, memory_limit=2 ** 50)
    result = reproduce.run_set(restorer, pairs, "Real", "w", tmp_path / "out")
    assert note is None and result.images == 2 and result.protocol == "niqe,brisque"
    assert set(result.mean) == {"niqe", "brisque", "input_niqe", "input_brisque"}
    assert result.mean["niqe"] != result.mean["input_niqe"]  # outputs and inputs both scored
    score = json.loads((tmp_path / "out" / SCORE_FILE).read_text())
    assert score["mean"] == result.mean and sorted(score["images"]) == ["0.png", "1.png"]
    md = reproduce.report_markdown([result], {}, "test")
    assert f"| derained | 2 | {result.mean['niqe']:.3f} | 4.095 |" in md
